#!/usr/bin/env bash
# The main job on a built-in default: install, build, generate a synthetic trace and replay it
# through libkvrt with exact, flat top-k, attention-aware and cluster retrieval, printing the report
# of each.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/build.sh
mkdir -p traces
trace=traces/demo.safetensors
[ -f "$trace" ] || ./build/tools/kvrt gen-trace -o "$trace" --tokens 16384 --steps 32 --layers 2 \
  --q-heads 8 --kv-heads 2 --head-dim 128 --seed 1
./build/tools/kvrt inspect "$trace" | head -n 12
./build/tools/kvrt replay "$trace" --index exact --window 512
./build/tools/kvrt replay "$trace" --index flat --top-k 100 --window 512 --json traces/demo-flat.json
./build/tools/kvrt replay "$trace" --index attention-aware --top-k 100 --window 512
./build/tools/kvrt replay "$trace" --index cluster --top-k 100 --window 512
