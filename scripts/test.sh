#!/usr/bin/env bash
# Install, build and run every test (the command CI runs).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/build.sh
ctest --test-dir "${KVRT_BUILD_DIR:-build}" --output-on-failure -j "$(nproc)"

# The installed library, as a decoder would use it: find_package(kvrt) from a separate project.
build=${KVRT_BUILD_DIR:-build}
cmake --install "$build" --prefix "$build/install" >/dev/null
cmake -S examples/c_replay -B "$build/example" -DCMAKE_PREFIX_PATH="$PWD/$build/install" >/dev/null
cmake --build "$build/example" >/dev/null
"$build/tools/kvrt" gen-trace -o "$build/example/small.safetensors" --tokens 1024 --steps 4 \
  --layers 2 --q-heads 8 --kv-heads 2 --head-dim 64 --seed 3 --quiet
"$build/example/c_replay" "$build/example/small.safetensors"
