#!/usr/bin/env bash
# Fidelity report: `kvrt replay --per-head` of every index kind over the real-model traces
# (scripts/record-traces.sh 8k makes them), then one per-head table per trace
# (tools/record/fidelity_table.py). docs/fidelity.md quotes what it prints.
#   scripts/fidelity-replays.sh [TRACE ...]     default: traces/gemma3_*_8k.safetensors
# Env: KVRT (the CLI, default build/tools/kvrt), TOPK (100), KINDS, THREADS (0 = all).
set -euo pipefail
cd "$(dirname "$0")/.."
KVRT=${KVRT:-build/tools/kvrt}
TOPK=${TOPK:-100}
KINDS=${KINDS:-flat ivf hnsw landmark attention-aware}
[[ -x $KVRT ]] || { echo "no $KVRT: build first (scripts/build.sh) or set KVRT" >&2; exit 1; }
traces=("$@")
[[ ${#traces[@]} -gt 0 ]] || traces=(traces/gemma3_*_8k.safetensors)
for t in "${traces[@]}"; do
  [[ -f $t ]] || { echo "no trace $t (scripts/record-traces.sh 8k)" >&2; exit 1; }
  base=traces/replay_$(basename "$t" .safetensors)
  reports=()
  for k in $KINDS; do
    echo "replay $t --index $k" >&2
    "$KVRT" replay "$t" --index "$k" --top-k "$TOPK" --threads "${THREADS:-0}" --per-head --quiet \
      --json "${base}_${k}_k${TOPK}.json" > "${base}_${k}_k${TOPK}.txt"
    reports+=("${base}_${k}_k${TOPK}.json")
  done
  python3 tools/record/fidelity_table.py "${reports[@]}" | tee "${base}_k${TOPK}.md"
done
