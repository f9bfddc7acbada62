#!/usr/bin/env bash
# GPU tests and benchmark of the gpu/ kernels, built here and run on the GPU machine.
#
# Here (no GPU needed; nvcc must be installed):
#   scripts/gpu-tests.sh
# builds build-gpu/ for sm_90 (H100/H200) with the static CUDA runtime, bundles test_gpu and
# gpu_bench with every shared library they load into .bundle/ (git-ignored, carried to the device
# machine), and prints the device `run` call to make. There (the same script, --device):
#   the GPU tests, compute-sanitizer memcheck and racecheck on them (small sizes), gpu_bench and
#   tools/gpu_bench/sdpa_peer.py (PyTorch SDPA peer), each logged under $OUT.
# Environment: BUILD_DIR (default build-gpu), CUDA_ARCH (default 90), JOBS (default 2).
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ "${1:-}" == "--device" ]]; then
  out=${OUT:-out}
  mkdir -p "$out"
  export LD_LIBRARY_PATH=.bundle/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
  {
    nvidia-smi || true
    echo "--- ls /usr/local/cuda*/bin"; ls -d /usr/local/cuda*/bin 2>&1; ls /usr/local/cuda*/bin 2>&1 | tr '\n' ' '; echo
    python3 -c 'import torch; print("torch", torch.__version__, torch.cuda.is_available())' 2>&1 || true
  } > "$out/device.log" 2>&1
  rc=0
  timeout 120 .bundle/bin/test_gpu 2>&1 | tee "$out/test_gpu.log" | tail -25 || rc=1
  timeout 300 .bundle/bin/gpu_bench ${BENCH_ARGS:-} 2>&1 | tee "$out/gpu_bench.log" || rc=1
  if python3 -c 'import torch' 2>/dev/null; then
    PYTHONUNBUFFERED=1 timeout 120 python3 tools/gpu_bench/sdpa_peer.py 2>&1 | tee "$out/sdpa_peer.log" || rc=1
  else
    echo "no torch on this machine: SDPA peer not run" | tee "$out/sdpa_peer.log"
  fi
  san=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -1 || true)
  if [[ -n "$san" ]]; then
    for tool in memcheck racecheck; do
      KVRT_GPU_TEST_SMALL=1 timeout 150 "$san" --tool "$tool" --error-exitcode 3 \
        .bundle/bin/test_gpu --gtest_filter='GpuKernels.*' > "$out/$tool.log" 2>&1 || rc=1
      echo "$tool: $(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY|PASSED|FAILED' "$out/$tool.log" | tr '\n' ' ')"
    done
  else
    echo "compute-sanitizer not found under /usr/local/cuda*/bin" | tee "$out/memcheck.log"
  fi
  exit $rc
fi

build=${BUILD_DIR:-build-gpu}
cmake -S . -B "$build" -DCMAKE_BUILD_TYPE=Release -DCMAKE_CUDA_ARCHITECTURES="${CUDA_ARCH:-90}" \
  -DKVRT_CUDA=ON >/dev/null
# NOTE: the bundle uses test_gpu_kernels (the same tests linked against gpu/ alone) under the name
# test_gpu: it needs none of FAISS/TBB, which the GPU machine lacks, and builds even while other
# folders of the tree are being changed. CI builds and runs the kvrt_add_test target test_gpu.
cmake --build "$build" -j"${JOBS:-2}" --target test_gpu_kernels gpu_bench
rm -rf .bundle/bin .bundle/lib .bundle/stage
mkdir -p .bundle/stage
cp "$build/tests/gpu/test_gpu_kernels" .bundle/stage/test_gpu
cp "$build/tools/gpu_bench/gpu_bench" .bundle/stage/gpu_bench
bash scripts/bundle.sh .bundle .bundle/stage/test_gpu .bundle/stage/gpu_bench
rm -rf .bundle/stage
cat <<MSG

Bundle ready in .bundle/. On the GPU machine (device tool), one call:
  run(command="bash scripts/gpu-tests.sh --device", carry=[".bundle"], timeout_s=600)
Logs come back from \$OUT: device.log test_gpu.log gpu_bench.log sdpa_peer.log memcheck.log racecheck.log
Single pieces there: LD_LIBRARY_PATH=.bundle/lib .bundle/bin/test_gpu
                     LD_LIBRARY_PATH=.bundle/lib .bundle/bin/gpu_bench [--iters N] [--quick]
MSG
