#!/usr/bin/env bash
# Device run: GPU tests of the kernels, the transfer wrappers and the runtime's GPU
# backend (memcheck on a small case), then `kvrt bench decode` with its peers (gpu_bench: all-GPU
# attention over the full cache and naive offload; sdpa_peer.py: PyTorch SDPA; hf_offload_peer.py:
# Hugging Face's offloaded KV cache). docs/benchmarks.md
# "Decode" quotes what it prints.
#
# Here (nvcc needed, no GPU):   scripts/decode-bench.sh
#   builds build-gpu2 (sm_90, static cudart) and bundles the programs with their shared libraries
#   (TBB, OpenBLAS, Abseil, gtest...) into .bundle/ (git-ignored).
#   The bundle (~63 MiB) is over the device tool's 64 MiB carry limit with the tree, so it also
#   goes into .bundlez/bundle.tgz (~20 MiB, git-ignored), which the device side unpacks.
# There, one device call:       run(command="bash scripts/decode-bench.sh --device", carry=[".bundlez"])
#   logs under $OUT: device.log tests.log memcheck.log racecheck.log bench_decode.log gpu_bench.log
#   sdpa_peer.log hf_offload_peer.log. BENCH_ARGS adds options to every bench decode invocation.
set -uo pipefail
cd "$(dirname "$0")/.."

if [[ "${1:-}" == "--device" ]]; then
  bash scripts/unpack-bundle.sh || exit 1
  out=${OUT:-out}
  mkdir -p "$out"
  export LD_LIBRARY_PATH=.bundle/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
  b=.bundle/bin
  { nvidia-smi; nproc; free -g; } > "$out/device.log" 2>&1
  rc=0
  for t in test_gpu test_transfer test_runtime_gpu; do
    echo "=== $t" >> "$out/tests.log"
    timeout 100 $b/$t >> "$out/tests.log" 2>&1 || rc=1
  done
  grep -E '^=== |^\[  (PASSED|FAILED) |^\[==========\]|Failure' "$out/tests.log" | head -60
  bd="$b/kvrt bench decode --steps 30 --warmup 3 --max-seconds 6 --keys random --accuracy-steps 0 ${BENCH_ARGS:-}"
  {
    echo "=== flat"; timeout 150 $bd --index flat --cold 4096,32768,131072 --batch 1,16 --max-cold-batch 32768 \
      --cold-attention cpu,fetch
    echo "=== landmark"; timeout 240 $bd --index landmark --cold 4096,32768,131072,524288,1048576 --batch 1,16
    echo "=== landmark, fetch mode and auto"; timeout 150 $bd --index landmark --cold 131072,1048576 --batch 1,16 \
      --cold-attention fetch,auto
    echo "=== landmark, k=2000"; timeout 90 $bd --index landmark --cold 131072 --batch 1 --top-k 2000 \
      --cold-attention cpu,fetch
    echo "=== landmark, B=16: one thread per sequence vs kvrt_attend_batch, per-head vs group search"
    for g in 0 1; do timeout 90 $bd --index landmark --cold 32768,131072 --batch 16 --attend threads,batch --group-search $g; done
    echo "=== landmark, host pointers"; timeout 60 $bd --index landmark --cold 131072 --batch 1,16 --memory host
  } > "$out/bench_decode.log" 2>&1 || rc=1
  cat "$out/bench_decode.log"
  timeout 100 $b/gpu_bench --iters 100 > "$out/gpu_bench.log" 2>&1 || rc=1
  tail -30 "$out/gpu_bench.log"
  PYTHONUNBUFFERED=1 timeout 60 python3 tools/gpu_bench/sdpa_peer.py --iters 100 > "$out/sdpa_peer.log" 2>&1 || rc=1
  cat "$out/sdpa_peer.log"
  PYTHONUNBUFFERED=1 timeout 150 python3 tools/gpu_bench/hf_offload_peer.py > "$out/hf_offload_peer.log" 2>&1 || rc=1
  cat "$out/hf_offload_peer.log"
  san=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -1)
  if [[ -n "$san" ]]; then
    for tool in memcheck racecheck; do
      KVRT_GPU_TEST_SMALL=1 timeout 80 "$san" --tool $tool --error-exitcode 3 $b/test_runtime_gpu \
        --gtest_filter='All/GpuBackend.MatchesHostBackend/flat_device_bf16:All/GpuBackend.MatchesHostBackend/exact_host_f32:All/GpuBackend.MatchesHostBackend/flat_device_bf16_fetch' \
        > "$out/$tool.log" 2>&1 || rc=1
      echo "$tool: $(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY|PASSED|FAILED' "$out/$tool.log" | tr '\n' ' ')"
    done
  fi
  exit $rc
fi

build=${BUILD_DIR:-build-gpu2}
cmake -S . -B "$build" -DCMAKE_BUILD_TYPE=Release -DCMAKE_CUDA_ARCHITECTURES="${CUDA_ARCH:-90}" \
  -DKVRT_CUDA=ON >/dev/null || exit 1
cmake --build "$build" -j"${JOBS:-2}" --target kvrt_cli test_transfer test_runtime_gpu \
  test_gpu_kernels gpu_bench || exit 1
rm -rf .bundle/bin .bundle/lib .bundle/stage
mkdir -p .bundle/stage
cp "$build/tools/kvrt" "$build/tests/transfer/test_transfer" "$build/tests/runtime_gpu/test_runtime_gpu" \
  "$build/tools/gpu_bench/gpu_bench" .bundle/stage/
cp "$build/tests/gpu/test_gpu_kernels" .bundle/stage/test_gpu
bash scripts/bundle.sh .bundle .bundle/stage/*
rm -rf .bundle/stage
# The other packing (device-check.sh's .txz) removed: unpack-bundle.sh would take it first.
mkdir -p .bundlez && rm -f .bundlez/bundle.txz && tar czf .bundlez/bundle.tgz .bundle &&
  du -sh .bundlez/bundle.tgz
