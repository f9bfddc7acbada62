#!/usr/bin/env bash
# python-test.sh BUILD_DIR LIBKVRT_PREFIX: installs the kvrt Python package into BUILD_DIR/venv,
# linked against the libkvrt installed in LIBKVRT_PREFIX (cmake --install), and runs its pytest
# suite. KVRT_PY_TORCH=0: no torch/transformers/accelerate (their tests are skipped).
set -euo pipefail
cd "$(dirname "$0")/.."
build=$(mkdir -p "$1" && cd "$1" && pwd)
prefix=$(cd "$2" && pwd)
venv=$build/venv
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
pip=("$venv/bin/python" -m pip install -q --disable-pip-version-check)
"${pip[@]}" nanobind scikit-build-core numpy pytest
if [ "${KVRT_PY_TORCH:-1}" = 1 ]; then
  t0=$SECONDS
  # accelerate: transformers' tensor-parallel loading (tp_plan) needs it (python/tests/test_tp.py).
  "$venv/bin/python" -c "import torch, transformers, tqdm, accelerate" 2>/dev/null ||
    { "${pip[@]}" torch transformers tqdm accelerate; echo "python-test: torch + transformers installed in $((SECONDS - t0)) s"; }
fi
t0=$SECONDS
"${pip[@]}" --no-build-isolation ./python \
  --config-settings=build-dir="$build/python" \
  --config-settings=cmake.define.KVRT_PY_LIBKVRT=installed \
  --config-settings=cmake.define.CMAKE_PREFIX_PATH="$prefix" \
  --config-settings=cmake.define.KVRT_PY_WERROR=ON
echo "python-test: kvrt package built and installed in $((SECONDS - t0)) s"
# From the build dir, so that python/kvrt (sources without the extension) is not on sys.path.
(cd "$build" && "$venv/bin/python" -m pytest -q -p no:cacheprovider "$OLDPWD/python/tests")
