#!/usr/bin/env bash
# Builds the libFuzzer targets with clang (ASan + UBSan, project code coverage-instrumented) into
# build-fuzz/ and runs each for a fixed time, one after the other, on one core, starting from the
# committed corpus (tests/fuzz/corpus/<target>). New inputs go to build-fuzz/corpus/<target>, so
# the committed corpus only changes when someone copies inputs back on purpose.
#
#   bash scripts/fuzz.sh [seconds per target, default 60] [target ...]
# Env: KVRT_FUZZ_BUILD_DIR (default build-fuzz), KVRT_JOBS (build jobs), KVRT_FUZZ_NICE (niceness, 10).
# Exit status: non-zero if a target crashed; the reproducer is build-fuzz/crash-* / leak-* / ...
# and `build-fuzz/tests/fuzz/<target> <file>` replays it.
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-60}
shift || true
targets=("$@")
[ ${#targets[@]} -eq 0 ] && targets=(fuzz_trace fuzz_api)
build=${KVRT_FUZZ_BUILD_DIR:-build-fuzz}
jobs=${KVRT_JOBS:-$(nproc)}
nice_n=${KVRT_FUZZ_NICE:-10}

command -v clang++ >/dev/null || { echo "fuzz: clang++ not found (apt-get install clang libclang-rt-14-dev)" >&2; exit 1; }
CC=clang CXX=clang++ cmake -S . -B "$build" -DCMAKE_BUILD_TYPE=RelWithDebInfo -DKVRT_CUDA=OFF \
  -DKVRT_WERROR=OFF -DKVRT_FUZZ=ON -DKVRT_SANITIZE=address,undefined,fuzzer-no-link >/dev/null
nice -n "$nice_n" cmake --build "$build" -j "$jobs" --target "${targets[@]}"

status=0
for t in "${targets[@]}"; do
  name=${t#fuzz_}
  work="$build/corpus/$name"
  mkdir -p "$work" "$build/artifacts"
  dict=()
  [ -f "tests/fuzz/$name.dict" ] && dict=(-dict="tests/fuzz/$name.dict")
  echo "fuzz: $t for ${secs}s"
  # -rss_limit_mb: a hostile input must not make the reader allocate gigabytes.
  # (No -jobs: one fuzzing process on one core is the default; -jobs would fork and log to ./fuzz-N.log.)
  # -timeout: one input taking longer than 10 s is a hang.
  if ! ASAN_OPTIONS=detect_leaks=1:allocator_may_return_null=1 UBSAN_OPTIONS=print_stacktrace=1 \
      nice -n "$nice_n" "$build/tests/fuzz/$t" "$work" "tests/fuzz/corpus/$name" "${dict[@]}" \
      -max_total_time="$secs" -rss_limit_mb=2048 -timeout=10 -max_len=4096 \
      -print_final_stats=1 -artifact_prefix="$build/artifacts/$t-" 2>"$build/$t.log"; then
    echo "fuzz: $t FAILED, see $build/$t.log and $build/artifacts/" >&2
    tail -40 "$build/$t.log" >&2
    status=1
  fi
  grep -E "stat::number_of_executed_units|stat::peak_rss_mb|stat::new_units_added" "$build/$t.log" | sed "s/^/fuzz: $t /"
done
exit $status
