#!/usr/bin/env bash
# Install, build and run every test (the command CI runs).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/build.sh
ctest --test-dir "${KVRT_BUILD_DIR:-build}" --output-on-failure -j "$(nproc)"
