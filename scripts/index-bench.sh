#!/usr/bin/env bash
# Device run: `kvrt bench index` on a generated 128K-token trace (32 q / 8 kv heads,
# d=128, bf16) on the GPU machine's 16-core CPU. docs/benchmarks.md "Indexes" quotes what it prints.
#
# Here:   scripts/index-bench.sh            builds build/, bundles kvrt into .bundle-index/ and
#                                           compresses it to .bundlez-index/bundle.tgz (the
#                                           uncompressed bundle is too large to carry)
# There:  run(command="bash scripts/index-bench.sh --device", carry=[".bundlez-index"])
#         writes $OUT/index_bench.{log,csv,json,svg}. INDEX_BENCH_ARGS adds options.
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ "${1:-}" == "--device" ]]; then
  out=${OUT:-out}
  mkdir -p "$out"
  [[ -d .bundle-index ]] || tar xzf .bundlez-index/bundle.tgz
  export LD_LIBRARY_PATH=.bundle-index/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
  kvrt=.bundle-index/bin/kvrt
  { nproc; lscpu | grep -E 'Model name|^CPU\(s\)|L3'; } > "$out/index_bench.log"
  trace=/tmp/t128k.safetensors
  $kvrt gen-trace -o $trace --tokens 131072 --steps 16 --layers 1 --q-heads 32 --kv-heads 8 \
    --head-dim 128 --seed 11 --quiet
  $kvrt bench index --trace $trace --index flat,ivf,hnsw,landmark,attention-aware --top-k 100 \
    --steps 16 --csv "$out/index_bench.csv" --json "$out/index_bench.json" \
    --plot "$out/index_bench.svg" --quiet ${INDEX_BENCH_ARGS:-} 2>&1 | tee -a "$out/index_bench.log"
  exit 0
fi
build=${KVRT_BUILD_DIR:-build}
cmake -S . -B "$build" -DCMAKE_BUILD_TYPE=Release >/dev/null
cmake --build "$build" -j"${JOBS:-2}" --target kvrt_cli
rm -rf .bundle-index .bundlez-index
bash scripts/bundle.sh .bundle-index "$build/tools/kvrt"
mkdir -p .bundlez-index && tar czf .bundlez-index/bundle.tgz .bundle-index
