#!/usr/bin/env bash
# GQA group search vs one search per q head (config.group_search), on the GPU machine, one call:
# `kvrt bench index` (attention-aware and landmark, both modes) on the 128K trace of
# scripts/index-bench.sh, then `kvrt bench decode` (landmark and attention-aware, both modes), plus
# the runtime's GPU tests (the cold-tier code both backends share changed). docs/benchmarks.md
# quotes what it prints.
#
# Here:   scripts/decode-bench.sh              builds build-gpu2 and the bundle .bundlez/bundle.tgz
# There:  run(command="bash scripts/group-search-bench.sh --device", carry=[".bundlez"])
#         logs under $OUT: group_index.{log,csv}, group_decode.log, tests.log
set -uo pipefail
cd "$(dirname "$0")/.."
[[ "${1:-}" == "--device" ]] || { echo "usage: $0 --device (build the bundle with scripts/decode-bench.sh)" >&2; exit 2; }
bash scripts/unpack-bundle.sh || exit 1
out=${OUT:-out}
mkdir -p "$out"
export LD_LIBRARY_PATH=.bundle/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
b=.bundle/bin
rc=0
timeout 100 $b/test_runtime_gpu > "$out/tests.log" 2>&1 || rc=1
grep -E '^\[  (PASSED|FAILED) |Failure' "$out/tests.log" | head
{ nproc; lscpu | grep -E 'Model name|L3'; } > "$out/group_index.log"
trace=/tmp/t128k.safetensors
$b/kvrt gen-trace -o $trace --tokens 131072 --steps 16 --layers 1 --q-heads 32 --kv-heads 8 \
  --head-dim 128 --seed 11 --quiet
timeout 300 $b/kvrt bench index --trace $trace --index attention-aware,landmark --group-search 0,1 \
  --top-k 100 --steps 16 --csv "$out/group_index.csv" --quiet ${GROUP_INDEX_ARGS:-} 2>&1 | tee -a "$out/group_index.log" || rc=1
bd="$b/kvrt bench decode --steps 30 --warmup 3 --max-seconds 4 --keys random --accuracy-steps 0 ${BENCH_ARGS:-}"
{
  for g in 1 0; do
    echo "=== landmark, group_search $g"
    timeout 100 $bd --index landmark --cold 131072,1048576 --batch 1,16 --group-search $g
    echo "=== attention-aware, group_search $g"
    timeout 60 $bd --index attention-aware --cold 131072 --batch 1 --layers 1 --group-search $g
  done
} > "$out/group_decode.log" 2>&1 || rc=1
cat "$out/group_decode.log"
exit $rc
