#!/usr/bin/env bash
# Call 3 of docs/runs/mma-device-2026-12-04-s18: kvrt_before (fe5cff6), kvrt (the tensor-core kernel) and kvrt_3cta (three_ctas.patch) alternating; bundled with EXTRA_PROGRAMS="kvrt_3cta direct_attend_parts_3cta" BEFORE=... bash scripts/device-check.sh, run there from the repository root.
tar xzf .bundlez/bundle.tgz
export LD_LIBRARY_PATH=$PWD/.bundle/lib
b=.bundle/bin
for p in direct_attend_parts direct_attend_parts_3cta direct_attend_parts direct_attend_parts_3cta; do echo "== $p"; timeout 30 $b/$p; done
trace=/tmp/t128k.safetensors
timeout 200 $b/kvrt gen-trace -o $trace --tokens 133200 --steps 40 --layers 1 --q-heads 32 --kv-heads 8 --head-dim 128 --seed 3 --quiet
args="bench decode --steps 30 --warmup 3 --max-seconds 4 --trace $trace --index cluster --cold 131072 --accuracy-steps 0 --pipeline"
for r in 1 2 3; do
  for prog in kvrt_before kvrt kvrt_3cta; do
    echo "=== $prog, round $r: 128K B=16 4 layers"
    timeout 100 $b/$prog $args --batch 16 --attend batch --layers 4
  done
done
for r in 1 2; do
  for prog in kvrt_before kvrt kvrt_3cta; do
    echo "=== $prog, round $r: 128K B=1 8 layers"
    timeout 100 $b/$prog $args --batch 1 --layers 8
  done
done
timeout 60 python3 tools/gpu_bench/sdpa_peer.py --iters 100
