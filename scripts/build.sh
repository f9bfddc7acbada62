#!/usr/bin/env bash
# Configures and builds kvrt into build/ (Release, -Werror). Extra arguments go to cmake's
# configure step, e.g. -DKVRT_CUDA=OFF or -DKVRT_SANITIZE=address,undefined.
set -euo pipefail
cd "$(dirname "$0")/.."
build=${KVRT_BUILD_DIR:-build}
jobs=${KVRT_JOBS:-$(nproc)}
cmake -S . -B "$build" -DCMAKE_BUILD_TYPE=${KVRT_BUILD_TYPE:-Release} "$@" >/dev/null
cmake --build "$build" -j "$jobs"
