#!/usr/bin/env bash
# Builds the test suite with sanitizers and runs ctest (docs/reliability.md).
#   bash scripts/sanitize.sh          ASan + UBSan (and LeakSanitizer) into build-asan/
#   bash scripts/sanitize.sh --tsan   TSan into build-tsan/, with scripts/tsan.supp
# Extra arguments after the mode go to ctest (e.g. -R Soak). Env: KVRT_JOBS (build jobs),
# KVRT_SOAK_SECONDS (soak length per test case, default 2), KVRT_SANITIZE_BUILD_DIR,
# KVRT_SANITIZE_TARGETS (e.g. "test_soak test_api": build and run only those test binaries).
# The compiler is the default one (GCC on Debian 12); CC/CXX pick another.
set -euo pipefail
cd "$(dirname "$0")/.."
mode=asan
if [ "${1:-}" = "--tsan" ]; then mode=tsan; shift; fi
if [ "${1:-}" = "--asan" ]; then shift; fi
jobs=${KVRT_JOBS:-$(nproc)}
supp="$PWD/scripts/sanitizers"
if [ $mode = asan ]; then
  build=${KVRT_SANITIZE_BUILD_DIR:-build-asan}
  sanitize=address,undefined
  export ASAN_OPTIONS="detect_leaks=1:abort_on_error=0:strict_string_checks=1:detect_stack_use_after_return=1:check_initialization_order=1${ASAN_OPTIONS:+:$ASAN_OPTIONS}"
  export LSAN_OPTIONS="suppressions=$supp/lsan.supp:print_suppressions=0${LSAN_OPTIONS:+:$LSAN_OPTIONS}"
  export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1${UBSAN_OPTIONS:+:$UBSAN_OPTIONS}"
else
  build=${KVRT_SANITIZE_BUILD_DIR:-build-tsan}
  sanitize=thread
  # NOTE: oneTBB and OpenMP (FAISS) are prebuilt without TSan instrumentation, so TSan cannot see
  # their synchronisation; scripts/sanitizers/tsan.supp silences reports whose frames lie only in
  # them (each entry says why). Races in kvrt's own code are never suppressed.
  export TSAN_OPTIONS="suppressions=$supp/tsan.supp:halt_on_error=1:second_deadlock_stack=1:report_signal_unsafe=0${TSAN_OPTIONS:+:$TSAN_OPTIONS}"
fi
# Debug info with optimisation (the suites do real attention work); no CUDA (host paths only).
if [ -z "${KVRT_SANITIZE_TARGETS:-}" ]; then
  KVRT_BUILD_DIR=$build KVRT_BUILD_TYPE=RelWithDebInfo KVRT_JOBS=$jobs bash scripts/build.sh \
    -DKVRT_CUDA=OFF -DKVRT_SANITIZE=$sanitize
  filter=()
else
  cmake -S . -B "$build" -DCMAKE_BUILD_TYPE=RelWithDebInfo -DKVRT_CUDA=OFF -DKVRT_SANITIZE=$sanitize >/dev/null
  # shellcheck disable=SC2086
  cmake --build "$build" -j "$jobs" --target $KVRT_SANITIZE_TARGETS
  filter=(-E _NOT_BUILT)  # tests of the binaries not built
fi
echo "sanitize($mode): running ctest in $build"
ctest --test-dir "$build" --output-on-failure -j "$jobs" --timeout 900 "${filter[@]}" "$@"
