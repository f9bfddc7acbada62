#!/usr/bin/env bash
# Install, build and run every test (the command CI runs).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --test
bash scripts/build.sh
ctest --test-dir "${KVRT_BUILD_DIR:-build}" --output-on-failure -j "$(nproc)"

# The installed library, as a decoder would use it, from a prefix other than /usr/local: a C
# program built with find_package(kvrt) (which must need none of kvrt's build dependencies: they
# are disabled here) and with pkg-config.
build=${KVRT_BUILD_DIR:-build}
prefix=$PWD/$build/install
cmake --install "$build" --prefix "$prefix" >/dev/null
cmake -S examples/c_replay -B "$build/example" -DCMAKE_PREFIX_PATH="$prefix" --no-warn-unused-cli \
  -DCMAKE_DISABLE_FIND_PACKAGE_{Threads,OpenMP,faiss,TBB,absl,CUDAToolkit}=ON >/dev/null
cmake --build "$build/example" >/dev/null
# pkg-config from a copy of the prefix elsewhere: kvrt.pc names the prefix it sits in.
rm -rf "$build/install-moved"
cp -r "$prefix" "$build/install-moved"
export PKG_CONFIG_PATH="$build/install-moved/lib/pkgconfig"
[ "$(pkg-config --variable=libdir kvrt)" -ef "$build/install-moved/lib" ] ||
  { echo "kvrt.pc does not name the prefix it is in"; exit 1; }
cc -std=c99 -Wall -Wextra -Werror examples/c_replay/c_replay.c -o "$build/example/c_replay_pc" \
  $(pkg-config --cflags --libs kvrt) -Wl,-rpath,"$(pkg-config --variable=libdir kvrt)" -lm
"$build/tools/kvrt" gen-trace -o "$build/example/small.safetensors" --tokens 1024 --steps 4 \
  --layers 2 --q-heads 8 --kv-heads 2 --head-dim 64 --seed 3 --quiet
"$build/example/c_replay" "$build/example/small.safetensors"
"$build/example/c_replay_pc" "$build/example/small.safetensors" >/dev/null

# The Python package (python/), installed into a venv under the build dir (the system Python stays
# clean) against the libkvrt installed above (KVRT_PY_LIBKVRT=installed: the library is not
# compiled a second time), then pytest. torch + transformers (several GB from PyPI, ~2.5-4 min)
# and accelerate are installed for the tiny-random model tests (test_tp.py: two ranks on gloo)
# unless KVRT_PY_TORCH=0; without them those tests are skipped.
bash scripts/python-test.sh "$build" "$prefix"

# Reliability (docs/reliability.md): the API, runtime, soak and trace-reader suites under
# ASan + UBSan + LeakSanitizer, then a short fuzz run with clang's libFuzzer (installed by
# `setup.sh --test`). KVRT_CI_QUICK=1 skips all of this for local use.
if [ "${KVRT_CI_QUICK:-0}" != 1 ]; then
  KVRT_SANITIZE_TARGETS="test_api test_api_status test_api_cpu_binding test_runtime test_soak test_tools test_c_api test_cpu_index test_cluster test_cluster_codes kvrt_cli" \
    bash scripts/sanitize.sh
  if command -v clang++ >/dev/null && ls /usr/lib/llvm-*/lib/clang/*/lib/linux/libclang_rt.fuzzer-x86_64.a >/dev/null 2>&1; then
    bash scripts/fuzz.sh 45  # two targets: 90 s of fuzzing in all
  else
    echo "test: clang/libFuzzer not installed, short fuzz run skipped (bash scripts/fuzz.sh)"
  fi
fi
