#!/usr/bin/env bash
# Builds the test suite with sanitizers and runs ctest (docs/reliability.md).
#   bash scripts/sanitize.sh          ASan + UBSan (and LeakSanitizer) into build-asan/
#   bash scripts/sanitize.sh --tsan   TSan into build-tsan/, with scripts/sanitizers/tsan.supp
#   TBB_SRC=/path/to/oneTBB bash scripts/sanitize.sh --tsan
#                                     TSan against a oneTBB built from that source with
#                                     -fsanitize=thread (build-tsan-tbb/: the library in install/,
#                                     kvrt in kvrt/); docs/reliability.md says how to get the source.
# Extra arguments after the mode go to ctest (e.g. -R Soak). Env: KVRT_JOBS (build jobs),
# KVRT_SOAK_SECONDS (soak length per test case, default 2), KVRT_SANITIZE_BUILD_DIR,
# KVRT_SANITIZE_TARGETS (e.g. "test_soak test_api": build and run only those test binaries),
# TBB_SRC (--tsan only: a oneTBB source tree, see above).
# The compiler is the default one (GCC on Debian 12); CC/CXX pick another.
set -euo pipefail
if [ -n "${TBB_SRC:-}" ]; then  # before the cd below: a relative path is the caller's
  [ -f "$TBB_SRC/CMakeLists.txt" ] || { echo "sanitize: TBB_SRC=$TBB_SRC is not a oneTBB source tree" >&2; exit 2; }
  TBB_SRC=$(cd "$TBB_SRC" && pwd)
fi
cd "$(dirname "$0")/.."
mode=asan
if [ "${1:-}" = "--tsan" ]; then mode=tsan; shift; fi
if [ "${1:-}" = "--asan" ]; then shift; fi
jobs=${KVRT_JOBS:-$(nproc)}
supp="$PWD/scripts/sanitizers"
tbb_args=()
if [ $mode = asan ]; then
  build=${KVRT_SANITIZE_BUILD_DIR:-build-asan}
  sanitize=address,undefined
  export ASAN_OPTIONS="detect_leaks=1:abort_on_error=0:strict_string_checks=1:detect_stack_use_after_return=1:check_initialization_order=1${ASAN_OPTIONS:+:$ASAN_OPTIONS}"
  export LSAN_OPTIONS="suppressions=$supp/lsan.supp:print_suppressions=0${LSAN_OPTIONS:+:$LSAN_OPTIONS}"
  export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1${UBSAN_OPTIONS:+:$UBSAN_OPTIONS}"
else
  sanitize=thread
  if [ -z "${TBB_SRC:-}" ]; then
    build=${KVRT_SANITIZE_BUILD_DIR:-build-tsan}
    # NOTE: Debian's oneTBB and OpenMP (FAISS) are prebuilt without TSan instrumentation, so TSan
    # cannot see their synchronisation; tsan-debian-tbb.supp silences reports whose frames lie in
    # TBB's hand-off (each entry says why). Still leaves false reports (2026-11-25: Soak.MemoryBudgets,
    # RuntimeGroupSearch) and is slow (Soak.IndexKinds hit the 900 s timeout); docs/reliability.md.
    echo "sanitize(tsan): TBB_SRC not set: using Debian's uninstrumented libtbb with" \
      "scripts/sanitizers/tsan-debian-tbb.supp (false positives possible; docs/reliability.md)"
    supp_files="$supp/tsan.supp $supp/tsan-debian-tbb.supp"
  else
    tbb_root=${KVRT_TSAN_TBB_DIR:-$PWD/build-tsan-tbb}
    build=${KVRT_SANITIZE_BUILD_DIR:-$tbb_root/kvrt}
    tbb_prefix=$tbb_root/install
    # oneTBB's own switch for this (cmake/sanitize.cmake): -fsanitize=thread on the library, IPO
    # off. Only libtbb: no tests, examples or tbbmalloc (kvrt does not use the allocator).
    # TBB_STRICT=OFF: the release's -Werror is for its own CI's compilers, not GCC 12 + TSan.
    # Built once; delete build-tsan-tbb/ to rebuild (e.g. from another TBB_SRC).
    if [ ! -f "$tbb_prefix/lib/cmake/TBB/TBBConfig.cmake" ]; then
      echo "sanitize(tsan): building oneTBB from $TBB_SRC with -fsanitize=thread into $tbb_prefix"
      cmake -S "$TBB_SRC" -B "$tbb_root/build" -DCMAKE_BUILD_TYPE=RelWithDebInfo \
        -DTBB_SANITIZE=thread -DTBB_TEST=OFF -DTBB_EXAMPLES=OFF -DTBBMALLOC_BUILD=OFF \
        -DTBB_STRICT=OFF -DCMAKE_INSTALL_PREFIX="$tbb_prefix" -DCMAKE_INSTALL_LIBDIR=lib >/dev/null
      cmake --build "$tbb_root/build" -j "$jobs"
      cmake --install "$tbb_root/build" >/dev/null
    fi
    # find_package(TBB) must take this one, not /usr/lib's: TBB_DIR pins it. CMake puts the
    # imported library's directory in the test binaries' build RPATH, so they load it at run time
    # (checked below with ldd).
    tbb_args=(-DTBB_DIR="$tbb_prefix/lib/cmake/TBB")
    echo "sanitize(tsan): using the TSan-instrumented oneTBB in $tbb_prefix"
    supp_files="$supp/tsan.supp"
  fi
  # Races in kvrt's own code are never suppressed; see the comments in each file.
  # Absolute: test discovery and ctest run the binaries from other directories.
  mkdir -p "$build"
  supp_merged="$(cd "$build" && pwd)/tsan.supp"
  # shellcheck disable=SC2086
  cat $supp_files >"$supp_merged"
  export TSAN_OPTIONS="suppressions=$supp_merged:halt_on_error=1:second_deadlock_stack=1:report_signal_unsafe=0${TSAN_OPTIONS:+:$TSAN_OPTIONS}"
fi
# -O1 with line tables (-g1): the level the sanitizers' documentation recommends, and the reports
# still name file and line; the suites do real attention work, so not -O0. Against -O2 -g it halves
# the build of the CI's targets on 2 cores (5.8 against 10.9 min, 2026-12-02). No CUDA (host paths
# only).
opt=(-DCMAKE_BUILD_TYPE=RelWithDebInfo "-DCMAKE_CXX_FLAGS_RELWITHDEBINFO=-O1 -g1 -DNDEBUG")
if [ -z "${KVRT_SANITIZE_TARGETS:-}" ]; then
  KVRT_BUILD_DIR=$build KVRT_BUILD_TYPE=RelWithDebInfo KVRT_JOBS=$jobs bash scripts/build.sh \
    "${opt[@]}" -DKVRT_CUDA=OFF -DKVRT_SANITIZE=$sanitize "${tbb_args[@]}"
  filter=()
else
  cmake -S . -B "$build" "${opt[@]}" -DKVRT_CUDA=OFF -DKVRT_SANITIZE=$sanitize \
    "${tbb_args[@]}" >/dev/null
  # shellcheck disable=SC2086
  cmake --build "$build" -j "$jobs" --target $KVRT_SANITIZE_TARGETS
  # Tests of binaries not built: gtest's _NOT_BUILT placeholders, the C test and the CLI tests
  # (they run tools/kvrt), unless those targets were asked for.
  skip=_NOT_BUILT
  [[ " $KVRT_SANITIZE_TARGETS " == *" test_c_api "* ]] || skip+='|^CApi\.'
  # The ABI program is built without sanitizers (it stands for a program built elsewhere) and
  # cannot load a sanitized libkvrt; the plain build's ctest runs it.
  [[ " $KVRT_SANITIZE_TARGETS " == *" test_abi_0_2 "* ]] || skip+='|^CApi\.ProgramCompiledAgainst0_2'
  [[ " $KVRT_SANITIZE_TARGETS " == *" kvrt_cli "* ]] || skip+='|^Cli\.'
  filter=(-E "$skip")
fi
if [ -n "${tbb_prefix:-}" ]; then
  # Every test binary built must resolve libtbb to the instrumented copy, not /usr/lib's.
  checked=0
  for bin in $(find "$build/tests" -maxdepth 2 -type f -name 'test_*' -perm -u+x); do
    # (ldd's output is kept: `ldd | grep -q` can fail under pipefail when grep exits first.)
    libs=$(ldd "$bin")
    if ! grep -q "libtbb.so.* => $tbb_prefix/lib/" <<<"$libs"; then
      echo "sanitize(tsan): $bin does not load libtbb from $tbb_prefix/lib:" >&2
      grep libtbb <<<"$libs" >&2 || true
      exit 1
    fi
    checked=$((checked + 1))
  done
  echo "sanitize(tsan): ldd: $checked test binaries load libtbb from $tbb_prefix/lib"
fi
echo "sanitize($mode): running ctest in $build"
ctest_args=(--test-dir "$build" --output-on-failure -j "$jobs" --timeout 900)
if [ $mode = asan ]; then
  ctest "${ctest_args[@]}" "${filter[@]}" "$@"
  exit 0
fi
# TSan: Soak.IndexKinds runs in a second ctest call with TSan's deadlock detector off. hnswlib's
# addPoint takes a new element's mutex before its `global` mutex, and later, holding `global`,
# the mutexes of elements it searches: a lock-order cycle TSan reports although no deadlock is
# possible (a new element is unreachable until linked). Some of these reports come with no
# restorable stacks or mutex addresses, so no suppression can match them (docs/reliability.md).
# Every other test keeps the deadlock detector. ctest keeps only the last -E, so the user's -E is
# merged into ours.
nodd='Soak\.IndexKinds'
exclude=${filter[1]:-}
user=()
while [ $# -gt 0 ]; do
  case "$1" in
    -E|--exclude-regex) exclude="${exclude:+$exclude|}$2"; shift 2 ;;
    *) user+=("$1"); shift ;;
  esac
done
rc=0
ctest "${ctest_args[@]}" "${user[@]}" -E "${exclude:+$exclude|}$nodd" || rc=$?
# Only when the user's selection includes it (ctest keeps only the last -R, so ours goes last).
selected=$(ctest --test-dir "$build" -N "${user[@]}" ${exclude:+-E "$exclude"})
if grep -q 'Soak\.IndexKinds' <<<"$selected"; then
  echo "sanitize(tsan): $nodd with detect_deadlocks=0 (hnswlib lock order, see above)"
  TSAN_OPTIONS="$TSAN_OPTIONS:detect_deadlocks=0" ctest "${ctest_args[@]}" "${user[@]}" \
    ${exclude:+-E "$exclude"} -R "$nodd" || rc=$?
fi
exit $rc
