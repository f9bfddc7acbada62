#!/usr/bin/env bash
# Installs the Debian 12 packages kvrt builds with. Idempotent; works as root or through sudo.
# The CUDA Toolkit is not a Debian package here: it is used from /usr/local/cuda when present
# (KVRT_CUDA=AUTO), and the build works without it.
set -euo pipefail
packages=(
  build-essential cmake pkg-config
  libfaiss-dev libopenblas-dev liblapack-dev   # FAISS (a static library) and the BLAS it links
  libdnnl-dev                                  # oneDNN: the k-means' bf16 products on AMX
  ocl-icd-opencl-dev                           # what oneDNN's CMake config looks for (only
                                               # recommended by libdnnl-dev, not installed here)
  libhnswlib-dev libtbb-dev libabsl-dev
  googletest libgtest-dev libgmock-dev
  libcli11-dev nlohmann-json3-dev
  python3-dev python3-venv                     # the Python package (python/): headers, a venv
)
# --test: also what the test command's reliability part needs (clang's libFuzzer for the short fuzz
# run; the ASan/UBSan runtimes come with g++).
if [ "${1:-}" = "--test" ]; then
  packages+=(clang libclang-rt-14-dev)
fi
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then
  echo "setup: all ${#packages[@]} packages already installed"
  exit 0
fi
sudo=""
if [ "$(id -u)" -ne 0 ]; then
  command -v sudo >/dev/null || { echo "setup: need root or sudo to install: ${missing[*]}" >&2; exit 1; }
  sudo="sudo"
fi
echo "setup: installing ${missing[*]}"
$sudo apt-get update -qq
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
echo "setup: done"
