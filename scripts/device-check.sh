#!/usr/bin/env bash
# The runtime on the GPU machine, in one device call: the kernel, transfer and GPU-backend tests
# (every kernel against its host reference, the GPU backend against the host backend), memcheck and
# racecheck of the GPU backend, then `kvrt bench decode` of this build beside a previous build
# (BEFORE, optional: run-to-run spread against a change), alternating, with PyTorch SDPA over a
# resident cache as the peer of the same run. BENCH=hot (on the device) measures the cluster kind's
# GPU hot cache instead of the before/after comparison (at 128K, B=1), BENCH=hot-scale at B=16 and
# 1M, BENCH=serve runs `kvrt bench serve` beside the dense peer, BENCH=prefill times kvrt_prefill
# beside causal SDPA, BENCH=bytes the cluster kind's GPU bytes from 32K to 512K, BENCH=direct the
# direct step against the CPU-ordered hot cache, BENCH=binding the Python package's cost per
# layer-step beside bench decode on one trace, BENCH=parts the direct step's and the cluster
# step's kernels taken apart (tools/gpu_bench/*_parts.cu), BENCH=mix the direct step's kernel with
# part of its rows from the host store (tools/gpu_bench/direct_attend_mix.cu), BENCH=ab-trace the build before
# (BEFORE) against this one on one generated 128K trace, BENCH=ab-1m the same at 1M on generated
# keys, BENCH=group the cluster selection per q head against one per kv head (128K trace, 1M),
# BENCH=ab-pipe the build before against this one pipelined (1M and 128K B=1 per AB_CONFIGS, 128K
# B=16), BENCH=acc one 128K trace with accuracy at the defaults, BENCH=penalty the residency-aware
# selection (cluster_miss_penalty 0, 0.5, 1) at 128K B=1 and B=16 with accuracy, BENCH=scale
# B=64 x 128K, B=8 x 1M (one layer each), 1M B=1 and the 128K step pipelined, per penalty, BENCH=pipe bench decode --pipeline (layer-steps back to back, as a decoder runs them)
# beside the same runs synced per layer-step, BENCH=timeline the host's time per span
# (KVRT_TIMELINE) at 128K B=16 and 1M B=1, BENCH=rescore the two-stage cluster selection (RESCORE select:rescore[:bits] triples) beside the
# default at 128K B=1 with accuracy, BENCH=ab-batch the build before against this one at
# 128K per AB_BATCHES (batch:layers, default 16:4) in AB_ROUNDS alternating rounds, BENCH=keys
# config.cluster_keys per KEYS (default 16 8) at 128K and 1M, BENCH=codes the selection on codes
# (cluster_rescore_bits per CODE_BITS, default "0 2") at 128K B=1 and B=16 and 1M, BENCH=ab-codes the
# build before against this one with the selection on codes (its kernel alone and the 128K step),
# BENCH=rest the rest from value codes (its kernel tests, timing and ncu; with BENCH="rest codes"
# CODE_BITS="2 2:2" the 128K step with and without value codes too), BENCH=rest-ab forms of the
# rest kernel chosen by env knobs in an experiment's build (REST_VARIANTS, REST_ROUNDS),
# BENCH=ncu-step each decode-step
# kernel's device time (ncu) at 128K B=1 and B=16, BENCH=ab-scalar the direct step's tensor-core
# kernel against its scalar one (KVRT_DIRECT_SCALAR=1) in this build at 128K B=16 (with
# KVRT_TIMELINE) and B=1, BENCH=ab-knob an environment knob (AB_KNOB, default
# KVRT_DIRECT_SCALAR, over AB_VALUES) alternated in this build at 128K B=1 and B=16 and 1M B=1
# (AB_RUNS), BENCH=configs bench decode options alternated the same way (CONFIGS),
# BENCH=gpu-busy the GPU's busy time per layer-step (CUPTI; BUSY_CONFIGS, BUSY_RUNS) at 128K B=1, 16, 64,
# BENCH=shapes the cluster kind at 128K B=1 per model shape (SHAPES, q:kv:d) beside SDPA of that shape,
# BENCH=host-latent the host backend at MLA latent shapes (HOST_SHAPES), the build before against this,
# BENCH=host-prefill the host backend's prompt build at the latent shape with and without the
# prompt's queries (PREFILL_PROGRAMS alternated, then KVRT_TIMELINE at PREFILL_THREADS),
# BENCH=api-count the CUDA calls per member and layer-step (nsys) at 128K B=16 and B=1, before
# and this build, BENCH=step-profile a pipelined 128K B=1 layer-step's host and device time (torch.profiler
# through the package, trace_gaps.py --steps; KVRT_TIMELINE), BENCH=pytest the Python package's
# tests that need CUDA (PYTEST_ARGS, default: the transformers families' GPU tests), BENCH=none no benchmark (BENCH
# takes a list); TESTS="" and SANITIZE="" skip the tests and compute-sanitizer, SANITIZE_TOOLS
# picks the tools. Every --device run first prints the machine's host-read rates (pcie_gather;
# PROBE="" skips) into pcie.log.
#
# Here (nvcc, no GPU):  BEFORE=/path/to/old/kvrt scripts/device-check.sh
#   uses build/ (sm_90, KVRT_CUDA=AUTO), bundles the programs with their shared libraries into
#   .bundle/ and packs it into .bundlez/bundle.txz (.tgz without xz; both git-ignored).
#   EXTRA_PROGRAMS adds programs (e.g. an older build's test_gpu_kernels copied as
#   test_gpu_before), LEAVE_OUT drops programs and "trace" (CUPTI) a call does not need; SLIM=1 leaves
#   out the kernels-apart tools and the install prefix when the carry would pass 64 MiB,
#   SLIM=parts the tools only (the prefix stays: BENCH=e2e, binding, pytest).
# There:                run(command="bash scripts/device-check.sh --device", carry=[".bundlez"])
#   logs under $OUT: tests.log memcheck.log racecheck.log bench.log sdpa_peer.log
# BENCH=e2e (there): the Python package built against the bundle's libkvrt (.bundle/prefix), then
#   tools/gpu_bench/e2e_bench.py (DynamicCache, offloaded cache, kvrt; E2E_ARGS adds options):
#   run(command="TESTS='' SANITIZE='' BENCH=e2e bash scripts/device-check.sh --device", carry=[".bundlez"])
#   table in bench.log, one JSON line per (cache, context) in e2e.jsonl, the build in e2e-pip.log;
#   E2E_TIMEOUT (s, default 400) bounds the benchmark. BENCH=binding: BINDING_ARGS adds options
#   to binding_overhead.py (e.g. --profile-dir "$OUT/traces": a timeline of a few layer-steps)
set -uo pipefail
cd "$(dirname "$0")/.."

if [[ "${1:-}" == "--device" ]]; then
  bash scripts/unpack-bundle.sh || exit 1
  out=${OUT:-out}
  mkdir -p "$out"
  export LD_LIBRARY_PATH=.bundle/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
  b=.bundle/bin
  rc=0
  nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
  # The machine's host reads (PROBE="" skips): SM reads of scattered host memory run at 30 GB/s
  # on some machines and ~50 on others (docs/benchmarks.md, thirty-second session), which moves
  # every figure that counts misses; one line each for the link and the SMs' scattered reads.
  if [[ -x $b/pcie_gather && -n "${PROBE-1}" ]]; then
    timeout 60 $b/pcie_gather --mb 56 --reps 5 2>&1 |
      grep -E "contiguous \(the link\)|gather kernel, +8 CTAs x 1024" | tee "$out/pcie.log"
  fi
  for t in ${TESTS-test_gpu test_transfer test_runtime_gpu ${EXTRA_TESTS:-}}; do
    [[ -x $b/$t ]] || continue
    echo "=== $t" >> "$out/tests.log"
    timeout 150 $b/$t >> "$out/tests.log" 2>&1 || rc=1
  done
  # The batch's selections one launch per member (KVRT_BATCH_SELECT=0; by default one launch per
  # kernel for the whole batch): the GPU backend's batch tests again that way.
  if [[ " ${TESTS-test_runtime_gpu} " == *" test_runtime_gpu "* && -x $b/test_runtime_gpu ]]; then
    echo "=== test_runtime_gpu with KVRT_BATCH_SELECT=0" >> "$out/tests.log"
    KVRT_BATCH_SELECT=0 timeout 150 $b/test_runtime_gpu \
      --gtest_filter='GpuBackendBatch.*:GpuBackendCluster.*' >> "$out/tests.log" 2>&1 || rc=1
    # And the decode evictions in pinned blocks (KVRT_IN_PLACE_EVICT=0; in place into the stores
    # is the default since 0.3.36, docs/gpu.md).
    echo "=== test_runtime_gpu with KVRT_IN_PLACE_EVICT=0" >> "$out/tests.log"
    KVRT_IN_PLACE_EVICT=0 timeout 150 $b/test_runtime_gpu \
      --gtest_filter='GpuBackendBatch.*:GpuBackendCluster.*' >> "$out/tests.log" 2>&1 || rc=1
  fi
  grep -E '^=== |^\[  (PASSED|FAILED) |^\[==========\]|Failure' "$out/tests.log" | head -40
  san=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -1)
  if [[ -n "$san" && -n "${SANITIZE-1}" ]]; then
    filter='All/GpuBackend.MatchesHostBackend/flat_device_bf16:All/GpuBackend.MatchesHostBackend/exact_host_f32:All/GpuBackend.MatchesHostBackend/flat_device_bf16_fetch:GpuBackendBatch.*:GpuBackendCluster.*'
    # racecheck: 320 s (GpuSelectMatchesCpuSelect alone took 74-78 s under it; the whole filter ran past 240 s in the thirty-third session).
    for tool in ${SANITIZE_TOOLS:-memcheck racecheck}; do
      KVRT_GPU_TEST_SMALL=1 timeout $([[ $tool == racecheck ]] && echo 320 || echo 100) "$san" --tool $tool --error-exitcode 3 $b/test_runtime_gpu \
        --gtest_filter="$filter" > "$out/$tool.log" 2>&1 || rc=1
      echo "$tool: $(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY|PASSED|FAILED' "$out/$tool.log" | tr '\n' ' ')"
    done
  fi
  # A generated 128K trace of the 8B shape (one layer, 40 decode steps) at $1, for the benches
  # that compare bench decode runs on the same keys.
  trace_128k() {
    timeout 200 $b/kvrt gen-trace -o "$1" --tokens 133200 --steps 40 --layers 1 --q-heads 32 \
      --kv-heads 8 --head-dim 128 --seed 3 --quiet
  }
  # The --attend values for a B > 1 run of program $1: AB_ATTEND (default batch,batch-serial), or
  # batch for a build before batch-serial.
  attend_of() {
    if $b/$1 bench decode --help 2>/dev/null | grep -q batch-serial; then
      echo "${AB_ATTEND:-batch,batch-serial}"
    else
      echo batch
    fi
  }
  # The runs of BENCH=ab-knob and BENCH=configs, pipelined, on the 128K trace in $trace: B=1 (8
  # layers), B=16 (kvrt_attend_batch, 4 layers), 1M B=1 (4 layers, generated keys), and on request
  # B=64 (b64: 1 layer) and B=16 with accuracy against exact attention (b16acc: 1 layer); AB_RUNS
  # picks among them (default "b1 b16 1m"). $1: the label, $2: an environment assignment (or ""),
  # $3: more bench decode options (unquoted: split into words).
  knob_runs() {
    local label=$1 envset=$2 extra=$3 runs=" ${AB_RUNS:-b1 b16 1m} " st=0
    if [[ $runs == *" b1 "* ]]; then
      echo "=== kvrt $label: cluster 128K --trace B=1, 8 layers --pipeline"
      env $envset timeout 150 $b/kvrt $args $extra --trace $trace --index cluster --cold 131072 \
        --batch 1 --layers 8 --pipeline --accuracy-steps 0 || st=1
    fi
    if [[ $runs == *" b16 "* ]]; then
      echo "=== kvrt $label: cluster 128K --trace B=16 (kvrt_attend_batch), 4 layers --pipeline"
      env $envset timeout 300 $b/kvrt $args $extra --trace $trace --index cluster --cold 131072 \
        --batch 16 --attend $(attend_of kvrt) --layers 4 --pipeline --accuracy-steps 0 || st=1
    fi
    if [[ $runs == *" b64 "* ]]; then
      echo "=== kvrt $label: cluster 128K --trace B=64 (kvrt_attend_batch), 1 layer --pipeline"
      env $envset timeout 300 $b/kvrt $args $extra --trace $trace --index cluster --cold 131072 \
        --batch 64 --attend batch --layers 1 --pipeline --accuracy-steps 0 || st=1
    fi
    if [[ $runs == *" b16acc "* ]]; then
      echo "=== kvrt $label: cluster 128K --trace B=16 (kvrt_attend_batch), 1 layer, accuracy"
      env $envset timeout 300 $b/kvrt $args $extra --trace $trace --index cluster --cold 131072 \
        --batch 16 --attend batch --layers 1 || st=1
    fi
    if [[ $runs == *" 1m "* ]]; then
      echo "=== kvrt $label: cluster 1M B=1, 4 layers --pipeline"
      env $envset timeout 200 $b/kvrt $args $extra --index cluster --cold 1048576 --batch 1 \
        --layers 4 --pipeline --accuracy-steps 0 || st=1
    fi
    return $st
  }
  # CODE_BITS' entry KEY[:VALUE] as bench decode's options (copts).
  code_opts() {
    copts="--cluster-rescore-bits ${1%%:*}"
    [[ $1 == *:* ]] && copts+=" --cluster-value-bits ${1#*:}"
  }
  # The Python package built against the bundle's installed libkvrt with the machine's python3
  # and its build tools (no network), once: sets site (its PYTHONPATH) and built (how, or "").
  py_package() {
    [[ -n ${built:-} ]] && return 0
    site=/tmp/kvrt-site pybuild=/tmp/kvrt-py-build prefix=$PWD/.bundle/prefix built=""
    rm -rf "$site" "$pybuild"
    echo "=== python package: $(python3 --version 2>&1), $(cmake --version | head -1), C++ compiler:" \
      "$(command -v c++ g++ clang++ | head -1)"
    t0=$SECONDS
    if [[ ! -d $prefix/lib/cmake/kvrt ]]; then
      echo "python package: .bundle/prefix is missing: bundle again with this scripts/device-check.sh"
    elif ! python3 -m pip --version > "$out/e2e-pip.log" 2>&1; then
      echo "python package: python3 has no pip; building with CMake instead" | tee -a "$out/e2e-pip.log"
    elif CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) timeout 240 python3 -m pip install \
        --no-build-isolation --no-deps --no-index --disable-pip-version-check \
        --target "$site" ./python --config-settings=build-dir="$pybuild" \
        --config-settings=cmake.define.KVRT_PY_LIBKVRT=installed \
        --config-settings=cmake.define.CMAKE_PREFIX_PATH="$prefix" >> "$out/e2e-pip.log" 2>&1; then
      built="pip install"
    else
      echo "python package: pip install failed; building with CMake instead" | tee -a "$out/e2e-pip.log"
    fi
    if [[ -z $built && -d $prefix/lib/cmake/kvrt ]]; then
      # The same package without pip/scikit-build-core: the extension and libkvrt (component
      # "python" of python/CMakeLists.txt) plus the package's Python sources.
      rm -rf "$site" "$pybuild"
      { cmake -S python -B "$pybuild" -DCMAKE_BUILD_TYPE=Release -DKVRT_PY_LIBKVRT=installed \
          -DCMAKE_PREFIX_PATH="$prefix" -DPython_EXECUTABLE="$(command -v python3)" &&
        timeout 240 cmake --build "$pybuild" -j"$(nproc)" &&
        cmake --install "$pybuild" --component python --prefix "$site" &&
        cp python/kvrt/*.py python/kvrt/py.typed "$site/kvrt/"; } >> "$out/e2e-pip.log" 2>&1 &&
        built="cmake"
    fi
    py_build_s=$((SECONDS - t0))
  }
  args="bench decode --steps 30 --warmup 3 --max-seconds 4 ${BENCH_ARGS:-}"
  # The CLI before --keys ran on random keys without accuracy: the same for this one, like for like.
  random="--keys random --accuracy-steps 0"
  {
    for bench in ${BENCH:-ab}; do
    if [[ "$bench" == none ]]; then
      :  # the tests and sanitizers only
    elif [[ "$bench" == pytest ]]; then
      # The package's tests that skip without CUDA (CI has none), against this bundle's libkvrt.
      py_package
      if [[ -z $built ]]; then
        echo "pytest: the kvrt package did not build; end of e2e-pip.log:"; tail -20 "$out/e2e-pip.log"
      else
        # From /tmp (python/kvrt, without the extension, must not shadow the built package);
        # the bundle's libraries by absolute path, then.
        (lib=$PWD/.bundle/lib && cd /tmp && LD_LIBRARY_PATH=$lib:$LD_LIBRARY_PATH PYTHONPATH=$site \
          timeout 300 python3 -m pytest -q -p no:cacheprovider \
          ${PYTEST_ARGS:-"$OLDPWD/python/tests/test_hf_families.py" -k gpu}) || rc=1
      fi
    elif [[ "$bench" == hot ]]; then
      # The cluster kind's GPU hot cache: off and on, trace-like keys, accuracy beside latency.
      for hc in 0 0.1; do
        echo "=== kvrt: cluster 128K B=1, hot cache $hc (latency: no accuracy capture)"
        timeout 150 $b/kvrt $args --index cluster --cold 131072 --batch 1 --hot-cache $hc \
          --accuracy-steps 0
      done
      echo "=== kvrt: cluster 128K B=1, hot cache 0.1, with accuracy"
      timeout 150 $b/kvrt $args --index cluster --cold 131072 --batch 1 --hot-cache 0.1
      echo "=== kvrt: flat 128K B=1 (the same data; the accuracy peer at top-k 100)"
      timeout 150 $b/kvrt $args --index flat --cold 131072 --batch 1
    elif [[ "$bench" == direct ]]; then
      # The direct step (cluster_direct_step) against the CPU-ordered hot cache, trace-like keys:
      # latency without accuracy capture, then accuracy; B=16 and 1M with the direct step.
      for ds in 0 1; do
        echo "=== kvrt: cluster 128K B=1, hot cache 0.1, direct step $ds (latency)"
        timeout 150 $b/kvrt $args --index cluster --cold 131072 --batch 1 --hot-cache 0.1 \
          --direct-step $ds --accuracy-steps 0
      done
      echo "=== kvrt: cluster 128K B=1, hot cache 0.2, direct step 1 (latency)"
      timeout 150 $b/kvrt $args --index cluster --cold 131072 --batch 1 --hot-cache 0.2 \
        --direct-step 1 --accuracy-steps 0
      echo "=== kvrt: cluster 128K B=1, hot cache 0.1, direct step 1, with accuracy"
      timeout 150 $b/kvrt $args --index cluster --cold 131072 --batch 1 --hot-cache 0.1 --direct-step 1
      echo "=== kvrt: cluster 128K B=16 (kvrt_attend_batch), direct step 0 and 1"
      for ds in 0 1; do
        timeout 200 $b/kvrt $args --index cluster --cold 131072 --batch 16 --attend batch \
          --hot-cache 0.1 --direct-step $ds --accuracy-steps 0
      done
      if [[ -n "${DIRECT_1M-1}" ]]; then
        echo "=== kvrt: cluster 1M B=1, hot cache 0.1, direct step 1"
        timeout 300 $b/kvrt $args --index cluster --cold 1048576 --batch 1 --hot-cache 0.1 \
          --direct-step 1 --accuracy-steps 0
      fi
    elif [[ "$bench" == hot-scale ]]; then
      for hc in 0 0.1; do
        echo "=== kvrt: cluster 128K B=16 (kvrt_attend_batch), hot cache $hc"
        timeout 200 $b/kvrt $args --index cluster --cold 131072 --batch 16 --attend batch \
          --hot-cache $hc --accuracy-steps 0
      done
      echo "=== kvrt: cluster 1M B=1, hot cache 0.1"
      timeout 300 $b/kvrt $args --index cluster --cold 1048576 --batch 1 --hot-cache 0.1
    elif [[ "$bench" == prefill ]]; then
      # kvrt_prefill of a 128K layer beside causal SDPA over the same prompt: the cluster kind's
      # GPU build from device pointers (2 layers: the first pays the pinned pool and module
      # load) and from host pointers; the CPU build's accuracy on the same data (host backend).
      echo "=== kvrt: cluster (GPU build) and landmark 128K prefill, device pointers, with accuracy"
      timeout 200 $b/kvrt $args --index cluster,landmark --cold 131072 --batch 1 --layers 2
      echo "=== kvrt: cluster 128K prefill, host pointers (GPU build after an H2D)"
      timeout 200 $b/kvrt $args --index cluster --cold 131072 --batch 1 --layers 2 --memory host \
        --accuracy-steps 0
      echo "=== kvrt: cluster 128K, host backend (CPU build), accuracy on the same data"
      timeout 200 $b/kvrt $args --index cluster --cold 131072 --batch 1 --layers 1 --gpu 0
      python3 tools/gpu_bench/sdpa_peer.py --prefill --tokens 131072 --iters 5
    elif [[ "$bench" == bytes ]]; then
      # GPU bytes per (sequence, layer) of the cluster kind against the context (hot cache off).
      timeout 300 $b/kvrt $args --index cluster --cold 32768,262144,524288 --batch 1 --layers 1 \
        --hot-cache 0 --accuracy-steps 0
    elif [[ "$bench" == serve ]]; then
      python3 tools/gpu_bench/sdpa_peer.py --serve --gpu-memory 100GiB --context 32768 131072 \
        --layers-model 32 > "$out/dense-serve.jsonl"
      timeout 400 $b/kvrt bench serve --gpu-memory 100GiB --context 32768,131072 --layers-model 32 \
        --layers 1 --index cluster --max-batch 64 --steps 20 --warmup 3 --max-seconds 4 \
        --dense-json "$out/dense-serve.jsonl" --csv "$out/serve.csv" --plot "$out/serve.svg"
    elif [[ "$bench" == binding ]]; then
      # The Python package's own cost per layer-step (issue 15): bench decode and
      # tools/gpu_bench/binding_overhead.py over one generated 128K trace, same settings.
      py_package
      trace=/tmp/kvrt-binding.safetensors
      trace_128k $trace || rc=1
      # BINDING_ROUNDS rounds of the two, alternating (the step's p50 moves between processes).
      for round in $(seq "${BINDING_ROUNDS:-1}"); do
        echo "=== kvrt: bench decode --trace (C API), cluster 128K B=1, round $round"
        timeout 150 $b/kvrt $args --trace $trace --index cluster --cold 131072 --batch 1 \
          --accuracy-steps 0 || rc=1
        echo "=== python: tools/gpu_bench/binding_overhead.py, the same trace and settings, round $round"
        if [[ -n $built ]]; then
          PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}" LD_LIBRARY_PATH="$PWD/.bundle/lib:$LD_LIBRARY_PATH" \
            PYTHONUNBUFFERED=1 timeout 150 \
            python3 tools/gpu_bench/binding_overhead.py --trace $trace --cold 131072 --steps 36 \
            --warmup 3 --json "$out/binding-$round.json" ${BINDING_ARGS:-} || rc=1
        fi
      done
      rm -f $trace
    elif [[ "$bench" == step-profile ]]; then
      # Where a pipelined 128K B=1 layer-step's time goes, host and device: bench decode
      # --pipeline (8 layers) as the reference p50, the same through the Python package under
      # torch.profiler (CUPTI: every kernel and copy with real clocks and overlap, every CUDA call
      # of the host) summed per step by tools/gpu_bench/trace_gaps.py --steps, and the library's
      # own host spans (KVRT_TIMELINE) of the C++ run.
      py_package
      trace=/tmp/kvrt-step-profile.safetensors
      trace_128k $trace || rc=1
      tl="$out/timeline-b1-128k.json"
      echo "=== kvrt with KVRT_TIMELINE: cluster 128K --trace B=1, 8 layers --pipeline"
      KVRT_TIMELINE=$tl timeout 150 $b/kvrt $args --trace $trace --index cluster --cold 131072 \
        --batch 1 --layers 8 --pipeline --accuracy-steps 0 || rc=1
      python3 tools/gpu_bench/timeline_summary.py "$tl" || rc=1
      gzip -f "$tl"
      if [[ -n $built ]]; then
        echo "=== python: binding_overhead.py, 8 layers, 8 steps profiled pipelined"
        PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}" LD_LIBRARY_PATH="$PWD/.bundle/lib:$LD_LIBRARY_PATH" \
          PYTHONUNBUFFERED=1 timeout 200 \
          python3 tools/gpu_bench/binding_overhead.py --trace $trace --cold 131072 --layers 8 \
          --steps 12 --warmup 3 --profile-dir "$out/traces" --profile-pipelined --profile-steps 8 \
          ${BINDING_ARGS:-} || rc=1
        python3 tools/gpu_bench/trace_gaps.py "$out/traces/binding-steps.json" --steps step \
          --calls-in attend --min-ms 0.02 --top 20 || rc=1
        gzip -f "$out/traces/binding-steps.json"
      fi
      rm -f $trace
    elif [[ "$bench" == parts ]]; then
      # The direct step's kernel whole, without its arithmetic, without its K/V loads (pool rows);
      # ClusterStep whole, without the selection's radix passes, without its compaction.
      # PARTS (default: all six) picks the programs, PARTS_CLUSTERS (default 8192: 128K) the
      # clusters per kv head of the cluster step's (65536: 1M).
      for round in 1 2; do
        for part in ${PARTS:-direct_attend_parts direct_attend_parts_1 direct_attend_parts_2 \
            cluster_step_parts cluster_step_parts_1 cluster_step_parts_2}; do
          if [[ "$part" == cluster_step_parts* ]]; then
            for c in ${PARTS_CLUSTERS:-8192}; do timeout 60 $b/$part --clusters $c || rc=1; done
          else
            timeout 60 $b/$part || rc=1
          fi
        done
      done
    elif [[ "$bench" == mix ]]; then
      # DirectAttend with part of its rows from the host store (tools/gpu_bench/direct_attend_mix.cu).
      for round in 1 2; do timeout 120 $b/direct_attend_mix || rc=1; done
    elif [[ "$bench" == penalty ]]; then
      # The residency-aware selection (config.cluster_miss_penalty) on one generated 128K trace:
      # B=1 (rounds in B1_ORDERS) and B=16 per penalty (PENALTIES_B16), then one B=1 run per
      # penalty with accuracy against exact attention (PENALTIES_ACC); "" skips a part.
      trace=/tmp/kvrt-penalty.safetensors
      trace_128k $trace || rc=1
      # B1_ORDERS: one round per word, the penalties of a round comma-separated, in run order.
      round=0
      for order in ${B1_ORDERS:-0,0.5,1 1,0.5,0}; do
        round=$((round + 1))
        for pen in ${order//,/ }; do
          echo "=== penalty $pen, round $round: cluster 128K --trace, B=1"
          timeout 120 $b/kvrt $args --trace $trace --index cluster --cold 131072 --batch 1 \
            --accuracy-steps 0 --miss-penalty $pen || rc=1
        done
      done
      for pen in ${PENALTIES_B16-0 0.5 1}; do
        echo "=== penalty $pen: cluster 128K --trace, B=16"
        timeout 200 $b/kvrt $args --trace $trace --index cluster --cold 131072 --batch 16 \
          --attend batch --accuracy-steps 0 --miss-penalty $pen || rc=1
      done
      for pen in ${PENALTIES_ACC-0 0.5 1}; do
        echo "=== penalty $pen: cluster 128K --trace, B=1, accuracy"
        timeout 150 $b/kvrt $args --trace $trace --index cluster --cold 131072 --batch 1 \
          --miss-penalty $pen || rc=1
      done
      rm -f $trace
    elif [[ "$bench" == scale ]]; then
      # Issue 14's batch rows and the 128K step pipelined, at the library's defaults: the 128K trace
      # pipelined at B=1 (8 layers) per penalty (PENALTIES, default 0 0.5 1), B=64 x 128K and
      # B=8 x 1M (one layer: 34 GB of host store each; generated keys at 1M), 1M B=1 per penalty.
      trace=/tmp/kvrt-scale.safetensors
      trace_128k $trace || rc=1
      for pen in ${PENALTIES:-0 0.5 1}; do
        echo "=== penalty $pen: cluster 128K --trace, B=1, 8 layers --pipeline"
        timeout 150 $b/kvrt $args --trace $trace --index cluster --cold 131072 --batch 1 \
          --layers 8 --accuracy-steps 0 --pipeline --miss-penalty $pen || rc=1
      done
      echo "=== cluster 128K --trace, B=64 (kvrt_attend_batch), 1 layer"
      timeout 300 $b/kvrt $args --trace $trace --index cluster --cold 131072 --batch 64 \
        --attend batch --layers 1 --accuracy-steps 0 || rc=1
      rm -f $trace
      echo "=== cluster 1M, B=8 (kvrt_attend_batch), 1 layer"
      timeout 300 $b/kvrt $args --index cluster --cold 1048576 --batch 8 --attend batch \
        --layers 1 --max-cold-batch 1048576 --accuracy-steps 0 || rc=1
      for pen in ${PENALTIES_1M:-0 0.5}; do
        echo "=== penalty $pen: cluster 1M, B=1"
        timeout 240 $b/kvrt $args --index cluster --cold 1048576 --batch 1 --accuracy-steps 0 \
          --miss-penalty $pen || rc=1
      done
    elif [[ "$bench" == ab-pipe ]]; then
      # The build before (BEFORE when bundling: kvrt_before) against this one, pipelined (a step's
      # layer-steps back to back), alternating per run: 1M B=1 (4 layers, generated keys) and the
      # 128K trace B=1 (8 layers) at each of AB_CONFIGS (penalty:hot_cache_fraction, default
      # "0.5:0.1 1:0.2"; AB_ROUNDS rounds, default 1), then the 128K trace at B=16 (4 layers,
      # kvrt_attend_batch; AB_ATTEND, default "batch,batch-serial": its appends from a thread per
      # sequence and from the calling thread) at the defaults.
      trace=/tmp/kvrt-ab-pipe.safetensors
      trace_128k $trace || rc=1
      for cfg in $(for r in $(seq ${AB_ROUNDS:-1}); do echo ${AB_CONFIGS:-0.5:0.1 1:0.2}; done); do
        pen=${cfg%%:*} hc=${cfg##*:}
        for prog in kvrt_before kvrt; do
          [[ -x $b/$prog ]] || continue
          echo "=== $prog: cluster 1M B=1, 4 layers --pipeline, penalty $pen, hot cache $hc"
          timeout 200 $b/$prog $args --index cluster --cold 1048576 --batch 1 --layers 4 \
            --pipeline --accuracy-steps 0 --miss-penalty $pen --hot-cache $hc || rc=1
          echo "=== $prog: cluster 128K --trace B=1, 8 layers --pipeline, penalty $pen, hot cache $hc"
          timeout 150 $b/$prog $args --trace $trace --index cluster --cold 131072 --batch 1 \
            --layers 8 --pipeline --accuracy-steps 0 --miss-penalty $pen --hot-cache $hc || rc=1
        done
      done
      for prog in kvrt_before kvrt; do
        [[ -x $b/$prog ]] || continue
        echo "=== $prog: cluster 128K --trace B=16 (kvrt_attend_batch), 4 layers --pipeline"
        timeout 200 $b/$prog $args --trace $trace --index cluster --cold 131072 --batch 16 \
          --attend $(attend_of $prog) --layers 4 --pipeline --accuracy-steps 0 || rc=1
      done
      rm -f $trace
    elif [[ "$bench" == timeline ]]; then
      # Where the host's time goes (KVRT_TIMELINE, common/kvrt_common/timeline.h): the 128K trace at
      # B=16 (kvrt_attend_batch, 4 layers) and 1M B=1 (4 layers), pipelined, at the defaults
      # (TIMELINE_RUNS picks among b16 1m; TIMELINE_THREADS lists --threads values, default 0 =
      # all; TIMELINE_LANES lists KVRT_DEVICE_MEMBER_LANES values, default 0 = the library's); each summed per span by tools/gpu_bench/timeline_summary.py (the Chrome traces
      # stay in $out/timeline-*.json.gz).
      trace=/tmp/kvrt-timeline.safetensors
      trace_128k $trace || rc=1
      for run in ${TIMELINE_RUNS:-b16 1m}; do
        for lanes_threads in $(for l in ${TIMELINE_LANES:-0}; do
                                 for t in ${TIMELINE_THREADS:-0}; do echo $l:$t; done; done); do
          lanes=${lanes_threads%%:*} threads=${lanes_threads##*:}
          tl="$out/timeline-$run-l$lanes-t$threads.json"
          if [[ $run == b16 ]]; then
            set -- --trace $trace --cold 131072 --batch 16 --attend batch
          else
            set -- --cold 1048576 --batch 1
          fi
          echo "=== kvrt with KVRT_TIMELINE: cluster $run, 4 layers --pipeline, --threads $threads," \
            "KVRT_DEVICE_MEMBER_LANES=$lanes"
          KVRT_DEVICE_MEMBER_LANES=$lanes KVRT_TIMELINE=$tl timeout 200 $b/kvrt $args --index cluster --layers 4 --pipeline \
            --accuracy-steps 0 --threads $threads "$@" || rc=1
          python3 tools/gpu_bench/timeline_summary.py "$tl" || rc=1
          gzip -f "$tl"
        done
      done
      set --
      rm -f $trace
    elif [[ "$bench" == ncu-step ]]; then
      # Each decode-step kernel's device time (ncu, gpu__time_duration, one kernel at a time: no
      # overlap) at 128K on the generated trace, B=1 and B=16 (kvrt_attend_batch), one layer,
      # 5 measured steps; the prompt's build kernels are not profiled. Summaries in
      # $out/ncu-b1.log and $out/ncu-b16.log.
      ncu=$(command -v ncu || ls /usr/local/cuda*/bin/ncu 2>/dev/null | head -1)
      trace=/tmp/kvrt-ncu.safetensors
      trace_128k $trace || rc=1
      for batch in 1 16; do
        attend=""; [[ $batch -gt 1 ]] && attend="--attend batch"
        echo "=== ncu: cluster 128K --trace B=$batch, 1 layer, 5 steps"
        timeout 200 "$ncu" --metrics gpu__time_duration.sum --print-summary per-kernel \
          -k 'regex:Score|Select|Direct|Mark|Merge|FillPages|Commit|Convert|RingAppend|GroupKey|Hist|Cand|MissPenalty|Tier|Attn|Attend|Pending' \
          $b/kvrt bench decode --steps 5 --warmup 1 --max-seconds 2 --accuracy-steps 0 \
          --trace $trace --index cluster --cold 131072 --batch $batch $attend --layers 1 \
          > "$out/ncu-b$batch.log" 2>&1 || rc=1
        python3 tools/gpu_bench/ncu_summary.py "$out/ncu-b$batch.log" --steps 6 || rc=1
      done
      rm -f $trace
    elif [[ "$bench" == api-count ]]; then
      # The CUDA runtime calls the host makes per layer-step (nsys, cuda_api_sum), kvrt_before and
      # kvrt, on the 128K trace at B=16 (kvrt_attend_batch) and B=1, 4 layers pipelined: runs of
      # 5 and 25 measured steps, differenced, so that the prompt's calls cancel
      # (tools/gpu_bench/api_count.py). Reports in $out/api-*.csv.
      nsys=$(command -v nsys || ls /usr/local/cuda*/bin/nsys /opt/nvidia/nsight-systems*/bin/nsys \
        2>/dev/null | head -1)
      if [[ -z "$nsys" ]]; then
        echo "api-count: no nsys on this machine"
      else
        trace=/tmp/kvrt-api.safetensors
        trace_128k $trace || rc=1
        for batch in 16 1; do
          for prog in kvrt_before kvrt; do
            [[ -x $b/$prog ]] || continue
            attend=""; [[ $batch -gt 1 ]] && attend="--attend batch"
            for steps in 5 25; do
              rep="$out/api-$prog-b$batch-s$steps"
              timeout 200 "$nsys" profile -t cuda -o "$rep" --force-overwrite true \
                $b/$prog bench decode --steps $steps --warmup 1 --max-seconds 60 \
                --accuracy-steps 0 --trace $trace --index cluster --cold 131072 --batch $batch \
                $attend --layers 4 --pipeline > "$rep.log" 2>&1 || rc=1
              "$nsys" stats --report cuda_api_sum --format csv "$rep.nsys-rep" > "$rep.csv" \
                2>/dev/null || rc=1
              rm -f "$rep.nsys-rep" "$rep.sqlite"
            done
            echo "=== api-count: $prog B=$batch, per member and layer-step (4 layers x 20 steps)"
            python3 tools/gpu_bench/api_count.py "$out/api-$prog-b$batch-s5.csv" \
              "$out/api-$prog-b$batch-s25.csv" --per $((4 * 20 * batch)) --unit member-step || rc=1
          done
        done
        rm -f $trace
      fi
    elif [[ "$bench" == gpu-busy ]]; then
      # How busy the GPU is during the decode steps (the device timeline of kernels and copies,
      # recorded through CUPTI by .bundle/lib/libkernel_trace_inject.so; this machine has no
      # Nsight Systems; tools/gpu_bench/gpu_busy.py): the 128K trace at B=1 (8 layers), B=16
      # (4 layers) and B=64 (1 layer) (BUSY_RUNS: batch:layers pairs), pipelined, at the defaults
      # and with each BUSY_CONFIGS entry (';'-separated bench options, default "--hot-cache 0.2";
      # "" for the defaults alone). A step whose kernels leave the
      # GPU idle most of its wall time is bound by the host, one with the GPU busy throughout by
      # its kernels. The tracing slows the host's launches: its wall times are not figures.
      # Reports in $out/busy-*.txt.
      trace=/tmp/kvrt-busy.safetensors
      trace_128k $trace || rc=1
      IFS=';' read -r -a busy_cfgs <<< "defaults;${BUSY_CONFIGS---hot-cache 0.2}"
      for cfg in "${busy_cfgs[@]}"; do
        opts=""; [[ "$cfg" != defaults ]] && opts=$cfg
        for run in ${BUSY_RUNS:-1:8 16:4 64:1}; do
          batch=${run%%:*}; layers=${run##*:}
          attend=""; [[ $batch -gt 1 ]] && attend="--attend batch"
          rep="$out/busy-$(echo "b$batch-$cfg" | tr -c 'A-Za-z0-9.\n-' '_')"
          echo "=== gpu-busy: B=$batch, $layers layers --pipeline, config '$cfg'"
          # shellcheck disable=SC2086  # opts: bench options, split on purpose
          KVRT_KERNEL_TRACE="$rep.csv" CUDA_INJECTION64_PATH="$PWD/.bundle/lib/libkernel_trace_inject.so" \
            timeout 200 $b/kvrt bench decode --steps 25 --warmup 2 --max-seconds 60 \
            --accuracy-steps 0 --trace $trace --index cluster --cold 131072 --batch $batch $attend \
            --layers $layers --pipeline $opts > "$rep.log" 2>&1 || rc=1
          grep -E '^cluster' "$rep.log"
          if [[ ! -s "$rep.csv" ]]; then
            echo "gpu-busy: no device timeline in $rep.csv (the injection library did not start)"
            rc=1
            continue
          fi
          python3 tools/gpu_bench/gpu_busy.py "$rep.csv" --members $batch | tee "$rep.txt" || rc=1
          gzip -f "$rep.csv"
        done
      done
      rm -f $trace
    elif [[ "$bench" == keys ]]; then
      # config.cluster_keys per KEYS (default "16 8"), this build: the 128K trace B=1 (8 layers
      # pipelined; then 1 layer with accuracy against exact attention and the GPU bytes) and 1M
      # B=1 (4 layers pipelined), at the defaults otherwise.
      trace=/tmp/kvrt-keys.safetensors
      trace_128k $trace || rc=1
      for keys in ${KEYS:-16 8}; do
        echo "=== keys $keys: cluster 128K --trace B=1, 8 layers --pipeline"
        timeout 150 $b/kvrt $args --trace $trace --index cluster --cold 131072 --batch 1 \
          --layers 8 --pipeline --accuracy-steps 0 --cluster-keys $keys || rc=1
        echo "=== keys $keys: cluster 128K --trace B=1, 1 layer, accuracy"
        timeout 150 $b/kvrt $args --trace $trace --index cluster --cold 131072 --batch 1 \
          --layers 1 --cluster-keys $keys || rc=1
      done
      for keys in ${KEYS:-16 8}; do
        echo "=== keys $keys: cluster 1M B=1, 4 layers --pipeline"
        timeout 200 $b/kvrt $args --index cluster --cold 1048576 --batch 1 --layers 4 --pipeline \
          --accuracy-steps 0 --cluster-keys $keys || rc=1
      done
      rm -f $trace
    elif [[ "$bench" == codes ]]; then
      # The selection on codes (config.cluster_rescore_bits without cluster_rescore: clusters
      # ranked by their rows' codes, scanned on the GPU) per CODE_BITS (default "0 2"; 0 = the
      # centroids), alternating in CODE_ROUNDS rounds (default 2): the 128K trace B=1 (8 layers
      # pipelined, then 1 layer with accuracy and GPU bytes), B=16 (4 layers, kvrt_attend_batch),
      # and 1M B=1 (4 layers pipelined, generated keys; CODE_1M="" leaves it out). An entry
      # KEY:VALUE also sets config.cluster_value_bits (e.g. 2:2: the rest from 2-bit value codes).
      trace=/tmp/kvrt-codes.safetensors
      trace_128k $trace || rc=1
      for round in $(seq ${CODE_ROUNDS:-2}); do
        for bits in ${CODE_BITS:-0 2}; do
          code_opts $bits
          echo "=== round $round, bits $bits: cluster 128K --trace B=1, 8 layers --pipeline"
          timeout 150 $b/kvrt $args --trace $trace --index cluster --cold 131072 --batch 1 \
            --layers 8 --pipeline --accuracy-steps 0 $copts || rc=1
        done
      done
      for bits in ${CODE_BITS:-0 2}; do
        code_opts $bits
        echo "=== bits $bits: cluster 128K --trace B=1, 1 layer, accuracy"
        timeout 150 $b/kvrt $args --trace $trace --index cluster --cold 131072 --batch 1 \
          --layers 1 $copts || rc=1
        echo "=== bits $bits: cluster 128K --trace B=16 (kvrt_attend_batch), 4 layers --pipeline"
        timeout 200 $b/kvrt $args --trace $trace --index cluster --cold 131072 --batch 16 \
          --attend batch --layers 4 --pipeline --accuracy-steps 0 $copts || rc=1
        [[ -n "${CODE_1M-1}" ]] || continue
        echo "=== bits $bits: cluster 1M B=1, 4 layers --pipeline"
        timeout 200 $b/kvrt $args --index cluster --cold 1048576 --batch 1 --layers 4 --pipeline \
          --accuracy-steps 0 $copts || rc=1
      done
      rm -f $trace
    elif [[ "$bench" == rest ]]; then
      # The rest from value codes (gpu::CodeValueRest): its kernel tests and timing alone, killed
      # past 60 s (a hung kernel must not take the whole call), then ncu of its kernels (duration,
      # registers, occupancy) into $out/ncu-rest.log. The step with and without value codes is
      # BENCH=codes' (BENCH="rest codes" CODE_BITS="2 2:2" CODE_1M="").
      echo "=== CodeRest.* (test_gpu)"
      timeout -s KILL 60 $b/test_gpu --gtest_filter='CodeRest.*' 2>&1 |
        grep -E '^\[  (PASSED|FAILED)|Failure|us per call' || rc=1
      ncu=$(command -v ncu || ls /usr/local/cuda*/bin/ncu 2>/dev/null | head -1)
      if [[ -n "$ncu" ]]; then
        timeout -s KILL 90 "$ncu" --kernel-name regex:'Rest|Attended' --launch-skip 4 \
          --launch-count 4 --section SpeedOfLight --section LaunchStats --section Occupancy \
          $b/test_gpu --gtest_filter='CodeRest.TimesThe128KShape' > "$out/ncu-rest.log" 2>&1
        grep -E 'Kernel|Duration|Registers Per|Achieved Occupancy' "$out/ncu-rest.log"
      fi
    elif [[ "$bench" == rest-ab ]]; then
      # Forms of the rest (and mass) kernel chosen by environment knobs in one build
      # (REST_VARIANTS, each an env assignment; the knobs exist only in an experiment's build,
      # e.g. docs/runs/value-rest-rework-device-2026-12-05-s29/rest-kernel-prefetch-experiment.patch
      # applied):
      # each form's kernel test, then REST_ROUNDS (default 3) alternating rounds of its timing, then
      # ncu's per-instruction counters of each form's partial kernel, summed by opcode
      # (tools/gpu_bench/sass_summary.py) into $out/sass-<form>.txt.
      # forms VARIANTS TEST TIMING PATTERN: TEST (a gtest filter) under each form, then REST_ROUNDS
      # alternating rounds of TIMING, its lines matching PATTERN.
      forms() {
        local v r
        for v in $1; do
          echo "=== $v: $2 (test_gpu)"
          env "$v" timeout -s KILL 60 $b/test_gpu --gtest_filter="$2" 2>&1 |
            grep -E '^\[  (PASSED|FAILED)|Failure' || rc=1
        done
        for r in $(seq 1 "${REST_ROUNDS:-3}"); do
          for v in $1; do
            env "$v" timeout -s KILL 60 $b/test_gpu --gtest_filter="$3" 2>&1 | grep "$4" |
              sed "s/^/round $r, $v: /"
          done
        done
      }
      variants=${REST_VARIANTS:-"KVRT_REST_CTAS=3 KVRT_REST_CTAS=2 KVRT_REST_PREKEY=1"}
      forms "$variants" 'CodeRest.Kernel*' 'CodeRest.Times*' 'us per call'
      # The mass kernel's forms likewise (MASS_VARIANTS; CodeScan.TimesThe128KShape prints it).
      forms "${MASS_VARIANTS:-"KVRT_MASS_PREKEY=0 KVRT_MASS_PREKEY=1"}" 'CodeScan.Mass*' \
        'CodeScan.TimesThe128KShape' 'cluster mass'
      ncu=$(command -v ncu || ls /usr/local/cuda*/bin/ncu 2>/dev/null | head -1)
      for v in $variants; do
        [[ -n "$ncu" ]] || break
        env "$v" timeout -s KILL 100 "$ncu" --kernel-name regex:RestPartial --launch-skip 2 \
          --launch-count 1 --section SourceCounters --section WarpStateStats --page source \
          --print-source sass --csv $b/test_gpu --gtest_filter='CodeRest.TimesThe128KShape' \
          2>&1 | gzip > "$out/sass-${v//=/-}.csv.gz"
        python3 tools/gpu_bench/sass_summary.py "$out/sass-${v//=/-}.csv.gz" \
          > "$out/sass-${v//=/-}.txt" 2>&1
        echo "=== $v: $(head -1 "$out/sass-${v//=/-}.txt")"
      done
    elif [[ "$bench" == ab-codes ]]; then
      # The selection on codes, the build before (BEFORE when bundling: kvrt_before; and its kernel
      # test as test_gpu_before, EXTRA_PROGRAMS) against this one, alternating in AB_ROUNDS rounds
      # (default 2): CodeClusterMass alone (CodeScan.TimesThe128KShape), then the 128K trace B=1
      # (8 layers pipelined) with cluster_rescore_bits 2 and, for reference, 0 (this build).
      trace=/tmp/kvrt-ab-codes.safetensors
      trace_128k $trace || rc=1
      for round in $(seq ${AB_ROUNDS:-2}); do
        for t in test_gpu_before test_gpu; do
          [[ -x $b/$t ]] || continue
          echo "=== $t, round $round: $($b/$t --gtest_filter=CodeScan.TimesThe128KShape 2>&1 | grep 'code cluster mass')"
        done
        for prog in kvrt_before kvrt; do
          [[ -x $b/$prog ]] || continue
          echo "=== $prog, round $round: cluster 128K --trace B=1, 8 layers --pipeline, bits 2"
          timeout 150 $b/$prog $args --trace $trace --index cluster --cold 131072 --batch 1 \
            --layers 8 --pipeline --accuracy-steps 0 --cluster-rescore-bits 2 || rc=1
        done
        echo "=== kvrt, round $round: cluster 128K --trace B=1, 8 layers --pipeline, bits 0"
        timeout 150 $b/kvrt $args --trace $trace --index cluster --cold 131072 --batch 1 \
          --layers 8 --pipeline --accuracy-steps 0 --cluster-rescore-bits 0 || rc=1
      done
      rm -f $trace
    elif [[ "$bench" == ab-batch ]]; then
      # The build before (BEFORE when bundling: kvrt_before) against this one, alternating, on the
      # 128K trace per AB_BATCHES (batch:layers, default "16:4"; kvrt_attend_batch, pipelined),
      # AB_ROUNDS rounds (default 3): a batch's run-to-run spread is wide.
      trace=/tmp/kvrt-ab-batch.safetensors
      trace_128k $trace || rc=1
      for round in $(seq ${AB_ROUNDS:-3}); do
        for bl in ${AB_BATCHES:-16:4}; do
          for prog in kvrt_before kvrt; do
            [[ -x $b/$prog ]] || continue
            echo "=== $prog, round $round: cluster 128K --trace B=${bl%%:*} (kvrt_attend_batch)," \
              "${bl##*:} layers --pipeline"
            timeout 300 $b/$prog $args --trace $trace --index cluster --cold 131072 \
              --batch ${bl%%:*} --attend batch --layers ${bl##*:} --pipeline --accuracy-steps 0 || rc=1
          done
        done
      done
      rm -f $trace
    elif [[ "$bench" == ab-scalar ]]; then
      # The direct step's tensor-core kernel against the scalar one in this build
      # (KVRT_DIRECT_SCALAR=1), alternating, AB_ROUNDS rounds (default 3) on the 128K trace: B=16
      # (kvrt_attend_batch, 4 layers) with KVRT_TIMELINE, each run summed per span (a slow round's
      # host time shows where it went), then B=1 (8 layers); pipelined, defaults.
      trace=/tmp/kvrt-ab-scalar.safetensors
      trace_128k $trace || rc=1
      for round in $(seq ${AB_ROUNDS:-3}); do
        for scalar in 1 0; do
          tl="$out/timeline-scalar$scalar-r$round.json"
          echo "=== kvrt KVRT_DIRECT_SCALAR=$scalar, round $round: cluster 128K --trace B=16" \
            "(kvrt_attend_batch), 4 layers --pipeline, KVRT_TIMELINE"
          KVRT_DIRECT_SCALAR=$scalar KVRT_TIMELINE=$tl timeout 300 $b/kvrt $args --trace $trace \
            --index cluster --cold 131072 --batch 16 --attend batch --layers 4 --pipeline \
            --accuracy-steps 0 || rc=1
          python3 tools/gpu_bench/timeline_summary.py "$tl" || rc=1
          gzip -f "$tl"
          echo "=== kvrt KVRT_DIRECT_SCALAR=$scalar, round $round: cluster 128K --trace B=1," \
            "8 layers --pipeline"
          KVRT_DIRECT_SCALAR=$scalar timeout 150 $b/kvrt $args --trace $trace --index cluster \
            --cold 131072 --batch 1 --layers 8 --pipeline --accuracy-steps 0 || rc=1
        done
      done
      rm -f $trace
    elif [[ "$bench" == ab-knob || "$bench" == configs ]]; then
      # One build, alternated per run in AB_ROUNDS rounds (default 2), knob_runs each: ab-knob an
      # environment knob (AB_KNOB, default KVRT_DIRECT_SCALAR, over AB_VALUES, default "1 0"),
      # configs bench decode options (CONFIGS, one configuration's options per ';'-separated
      # entry, "defaults" = none; default "defaults;--hot-cache 0.2;--hot-cache 0.2
      # --miss-penalty 1").
      labels=() envs=() extras=()
      if [[ $bench == ab-knob ]]; then
        knob=${AB_KNOB:-KVRT_DIRECT_SCALAR}
        for val in ${AB_VALUES:-1 0}; do
          labels+=("$knob=$val") envs+=("$knob=$val") extras+=("")
        done
      else
        IFS=';' read -ra configs <<< "${CONFIGS:-defaults;--hot-cache 0.2;--hot-cache 0.2 --miss-penalty 1}"
        for cfg in "${configs[@]}"; do
          labels+=("config '$cfg'") envs+=("")
          if [[ $cfg == defaults ]]; then extras+=(""); else extras+=("$cfg"); fi
        done
      fi
      trace=/tmp/kvrt-$bench.safetensors
      trace_128k $trace || rc=1
      for round in $(seq ${AB_ROUNDS:-2}); do
        for i in "${!labels[@]}"; do
          knob_runs "${labels[i]}, round $round" "${envs[i]}" "${extras[i]}" || rc=1
        done
      done
      rm -f $trace
    elif [[ "$bench" == rescore ]]; then
      # The two-stage cluster selection's cost on the GPU backend (config.cluster_rescore: the CPU
      # selects, no direct step) beside the default, per RESCORE (select:rescore[:bits] triples,
      # default "1:0 0:0 0:2 0:4 1:4"; select = config.cluster_group_select, bits =
      # config.cluster_rescore_bits, default 0) on the 128K trace: B=1 pipelined (8 layers) and
      # B=1 with accuracy against exact attention (1 layer).
      trace=/tmp/kvrt-rescore.safetensors
      trace_128k $trace || rc=1
      for pair in ${RESCORE:-1:0 0:0 0:2 0:4 1:4}; do
        IFS=: read -r sel r bits <<< "$pair"
        bits=${bits:-0}
        echo "=== kvrt --group-select $sel --cluster-rescore $r --cluster-rescore-bits $bits: cluster 128K --trace B=1, 8 layers --pipeline"
        timeout 150 $b/kvrt $args --trace $trace --index cluster --cold 131072 --batch 1 --layers 8 \
          --pipeline --accuracy-steps 0 --group-select $sel --cluster-rescore $r \
          --cluster-rescore-bits $bits || rc=1
        echo "=== kvrt --group-select $sel --cluster-rescore $r --cluster-rescore-bits $bits: cluster 128K --trace B=1, 1 layer, accuracy"
        timeout 150 $b/kvrt $args --trace $trace --index cluster --cold 131072 --batch 1 --layers 1 \
          --group-select $sel --cluster-rescore $r --cluster-rescore-bits $bits || rc=1
      done
      rm -f $trace
    elif [[ "$bench" == ab-trace ]]; then
      # bench decode on one generated 128K trace, the build before (BEFORE=path/to/kvrt when
      # bundling: kvrt_before) against this one, alternating, B=1 and B=16 (kvrt_attend_batch).
      trace=/tmp/kvrt-ab.safetensors
      trace_128k $trace || rc=1
      for round in 1 2; do
        for prog in kvrt_before kvrt; do
          [[ -x $b/$prog ]] || continue
          echo "=== $prog, round $round: cluster 128K --trace, B=1 and B=16"
          timeout 120 $b/$prog $args --trace $trace --index cluster --cold 131072 --batch 1 \
            --accuracy-steps 0 || rc=1
          timeout 200 $b/$prog $args --trace $trace --index cluster --cold 131072 --batch 16 \
            --attend batch --accuracy-steps 0 || rc=1
        done
      done
      rm -f $trace
    elif [[ "$bench" == pipe ]]; then
      # bench decode pipelined (--pipeline: a step's layer-steps back to back, one wait per step,
      # as a decoder runs them) beside the same run synced per layer-step: the 128K trace at B=1
      # (8 layers) and B=16 (kvrt_attend_batch, 4 layers), generated keys at 1M (4 layers).
      trace=/tmp/kvrt-pipe.safetensors
      trace_128k $trace || rc=1
      for mode in --pipeline ""; do
        echo "=== kvrt: cluster 128K --trace, B=1, 8 layers ${mode:-synced per layer-step}"
        timeout 150 $b/kvrt $args --trace $trace --index cluster --cold 131072 --batch 1 \
          --layers 8 --accuracy-steps 0 $mode || rc=1
      done
      echo "=== kvrt: cluster 128K --trace, B=16 (kvrt_attend_batch), 4 layers --pipeline"
      timeout 200 $b/kvrt $args --trace $trace --index cluster --cold 131072 --batch 16 \
        --attend batch --layers 4 --accuracy-steps 0 --pipeline || rc=1
      rm -f $trace
      for mode in --pipeline ""; do
        echo "=== kvrt: cluster 1M, B=1, 4 layers ${mode:-synced per layer-step}"
        timeout 240 $b/kvrt $args --index cluster --cold 1048576 --batch 1 --layers 4 \
          --accuracy-steps 0 $mode || rc=1
      done
    elif [[ "$bench" == group ]]; then
      # The cluster kind's selection per q head (0.3.4: --group-select 0, 2% per q head) against
      # one per kv head (0.3.5's default: 3% per kv head), alternating, on one generated 128K
      # trace (B=1, 8 layers, and B=16, 4 layers, pipelined; B=1 with accuracy) and at 1M.
      trace=/tmp/kvrt-group.safetensors
      trace_128k $trace || rc=1
      for round in 1 2; do
        for sel in "--group-select 0 --cluster-budget 0.02" "--group-select 1 --cluster-budget 0.03"; do
          echo "=== round $round, $sel: cluster 128K --trace, B=1, 8 layers --pipeline"
          timeout 150 $b/kvrt $args --trace $trace --index cluster --cold 131072 --batch 1 \
            --layers 8 --accuracy-steps 0 --pipeline $sel || rc=1
          echo "=== round $round, $sel: cluster 128K --trace, B=16 (kvrt_attend_batch), 4 layers --pipeline"
          timeout 200 $b/kvrt $args --trace $trace --index cluster --cold 131072 --batch 16 \
            --attend batch --layers 4 --accuracy-steps 0 --pipeline $sel || rc=1
        done
      done
      for sel in "--group-select 0 --cluster-budget 0.02" "--group-select 1 --cluster-budget 0.03"; do
        echo "=== $sel: cluster 128K --trace, B=1, with accuracy"
        timeout 150 $b/kvrt $args --trace $trace --index cluster --cold 131072 --batch 1 $sel || rc=1
        echo "=== $sel: cluster 1M, B=1, 4 layers --pipeline"
        timeout 240 $b/kvrt $args --index cluster --cold 1048576 --batch 1 --layers 4 \
          --accuracy-steps 0 --pipeline $sel || rc=1
      done
      rm -f $trace
    elif [[ "$bench" == acc ]]; then
      # One generated 128K trace at the library's defaults, B=1, with accuracy (and the prefill's
      # time until ready): the cheapest run that shows both.
      trace=/tmp/kvrt-acc.safetensors
      trace_128k $trace || rc=1
      echo "=== kvrt: cluster 128K --trace, B=1, with accuracy"
      timeout 150 $b/kvrt $args --trace $trace --index cluster --cold 131072 --batch 1 || rc=1
      rm -f $trace
    elif [[ "$bench" == shapes ]]; then
      # Model shapes (SHAPES: q_heads:kv_heads:head_dim, default the 8B shape, GLM-4-9B's 16 q
      # heads per kv head, Qwen3-235B's 64:4 and an MQA shape past the GPU selection's 16): the
      # cluster kind at 128K on trace-like keys of that shape, B=1 with accuracy, then 4 layers
      # pipelined (SHAPES_B16=1: and B=16), each beside PyTorch SDPA over a resident cache of the
      # same shape (B=1).
      for shape in ${SHAPES:-32:8:128 32:2:128 64:4:128 48:1:128}; do
        IFS=: read -r qh kvh hd <<< "$shape"
        sopts="--q-heads $qh --kv-heads $kvh --head-dim $hd --index cluster --cold 131072 --batch 1"
        echo "=== kvrt: cluster 128K B=1, shape $shape, with accuracy"
        timeout 200 $b/kvrt $args $sopts || rc=1
        echo "=== kvrt: cluster 128K B=1, shape $shape, 4 layers --pipeline"
        timeout 200 $b/kvrt $args $sopts --layers 4 --pipeline --accuracy-steps 0 || rc=1
        if [[ -n "${SHAPES_B16:-}" ]]; then
          echo "=== kvrt: cluster 128K B=16 (kvrt_attend_batch), shape $shape, 4 layers --pipeline"
          timeout 300 $b/kvrt $args ${sopts/--batch 1/--batch 16} --attend batch --layers 4 \
            --pipeline --accuracy-steps 0 || rc=1
        fi
        echo "=== sdpa peer, shape $shape"
        timeout 60 python3 tools/gpu_bench/sdpa_peer.py --iters 100 --tokens 131072 \
          --q-heads "$qh" --kv-heads "$kvh" --head-dim "$hd" || rc=1
      done
    elif [[ "$bench" == host-latent ]]; then
      # The host backend at multi-head latent attention's shapes as kvrt.hf holds them (one kv
      # head of 576; bench decode stores values apart, it has no values_are_keys; HOST_SHAPES
      # q_heads:kv_heads:head_dim, default DeepSeek-V2-Lite's 16 and V3's 128 q heads), the build before (kvrt_before, when bundled) against this
      # one, AB_ROUNDS rounds (default 1): cluster kind, B=1, a cold tier with an unclustered tail
      # (30716 rows: 3 segments and 6140) and 128K, with accuracy, without the prompt's queries
      # (128 heads of them at 128K: 19 GB); the prefill's time is printed. HOST_TILES: the values
      # of KVRT_HOST_TILES to alternate (default 1: the products on the AMX tiles where they run);
      # HOST_STEPS: measured steps (default 30).
      local_args=${args/--steps 30/--steps ${HOST_STEPS:-30}}
      for round in $(seq "${AB_ROUNDS:-1}"); do
        for shape in ${HOST_SHAPES:-16:1:576 128:1:576}; do
          IFS=: read -r qh kvh hd <<< "$shape"
          for prog in kvrt_before kvrt; do
            [[ -x $b/$prog ]] || continue
            for tiles in ${HOST_TILES:-1}; do
              echo "=== $prog, round $round: host backend, shape $shape, cluster B=1, KVRT_HOST_TILES=$tiles"
              KVRT_HOST_TILES=$tiles timeout 240 $b/$prog $local_args --gpu 0 --memory host \
                --q-heads $qh --kv-heads $kvh --head-dim $hd --index cluster --cold 30716,131072 \
                --batch 1 --layers 1 --prompt-queries 0 || rc=1
            done
          done
        done
      done
      # HOST_TIMELINE=1: each shape once more at 128K with KVRT_TIMELINE, summed per span (the
      # search's phases, the group attention; tools/gpu_bench/timeline_summary.py).
      if [[ -n ${HOST_TIMELINE:-} ]]; then
        for shape in ${HOST_SHAPES:-16:1:576 128:1:576}; do
          IFS=: read -r qh kvh hd <<< "$shape"
          tl="$out/timeline-latent-$qh-$kvh-$hd.json"
          echo "=== kvrt with KVRT_TIMELINE: host backend, shape $shape, cold 131072"
          KVRT_TIMELINE=$tl timeout 240 $b/kvrt $args --gpu 0 --memory host --q-heads $qh \
            --kv-heads $kvh --head-dim $hd --index cluster --cold 131072 --batch 1 --layers 1 \
            --prompt-queries 0 --accuracy-steps 0 || rc=1
          python3 tools/gpu_bench/timeline_summary.py "$tl" || rc=1
          gzip -f "$tl"
        done
      fi
    elif [[ "$bench" == host-prefill ]]; then
      # The host backend's prompt build at DeepSeek-V2-Lite's latent shape (16:1:576, cluster
      # kind, 30716 cold rows, B=1, PREFILL_LAYERS layers, default 4: a decoder's prompt goes
      # through its layers in turn), with and without the prompt's queries (the query-aware
      # metric), each program in PREFILL_PROGRAMS (default: kvrt_before, kvrt_nocuda, kvrt; those
      # bundled) alternating in AB_ROUNDS rounds (default 2); then the last of them with
      # KVRT_TIMELINE at PREFILL_THREADS (default 1 and all), summed per span
      # (tools/gpu_bench/timeline_summary.py). The prefill's time is bench decode's "prefill" line.
      progs=() && for p in ${PREFILL_PROGRAMS:-kvrt_before kvrt_nocuda kvrt}; do
        [[ -x $b/$p ]] && progs+=("$p")
      done
      set -- --gpu 0 --memory host --q-heads 16 --kv-heads 1 --head-dim 576 --index cluster \
        --cold 30716 --batch 1 --layers "${PREFILL_LAYERS:-4}"
      for round in $(seq "${AB_ROUNDS:-2}"); do
        for pq in 1 0; do
          for prog in "${progs[@]}"; do
            echo "=== $prog, round $round: host prefill 16:1:576, cold 30716, --prompt-queries $pq"
            timeout 200 $b/$prog $args "$@" --prompt-queries $pq || rc=1
          done
        done
      done
      prog=${progs[${#progs[@]}-1]}
      for threads in ${PREFILL_THREADS:-1 0}; do
        tl="$out/timeline-prefill-t$threads.json"
        echo "=== $prog with KVRT_TIMELINE: host prefill 16:1:576 --prompt-queries 1 --threads $threads"
        KVRT_TIMELINE=$tl timeout 200 $b/$prog $args "$@" --prompt-queries 1 --accuracy-steps 0 \
          --threads "$threads" || rc=1
        python3 tools/gpu_bench/timeline_summary.py "$tl" || rc=1
        gzip -f "$tl"
      done
    elif [[ "$bench" == ab-1m ]]; then
      # bench decode at 1M (trace-like generated keys, the selection's largest shape), the build
      # before (kvrt_before) against this one, AB_ROUNDS rounds (default 1), B=1.
      for round in $(seq "${AB_ROUNDS:-1}"); do
        for prog in kvrt_before kvrt; do
          [[ -x $b/$prog ]] || continue
          echo "=== $prog, round $round: cluster 1M B=1"
          timeout 240 $b/$prog $args --index cluster --cold 1048576 --batch 1 --accuracy-steps 0 || rc=1
        done
      done
    elif [[ "$bench" == e2e ]]; then
      # End to end through the Python package (issue 15 item 4): kvrt built against the bundle's
      # installed libkvrt with the machine's python3 and its build tools (no network), then a
      # Llama-3-8B-shaped model with random weights (tools/gpu_bench/e2e_bench.py).
      py_package
      if [[ -n $built ]]; then
        echo "e2e: kvrt package built ($built) into $site in ${py_build_s} s"
        PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}" LD_LIBRARY_PATH="$PWD/.bundle/lib:$LD_LIBRARY_PATH" \
          PYTHONUNBUFFERED=1 timeout "${E2E_TIMEOUT:-400}" python3 tools/gpu_bench/e2e_bench.py --layers 4 \
          --contexts 32768,131072 --json "$out/e2e.jsonl" ${E2E_ARGS:-} || rc=1
      else
        echo "e2e: the kvrt package did not build (${py_build_s} s); end of e2e-pip.log:"
        tail -40 "$out/e2e-pip.log"
        rc=1
      fi
    else
      for round in 1 2; do
        for prog in kvrt_before kvrt; do
          [[ -x $b/$prog ]] || continue
          echo "=== $prog, round $round: landmark B=1 and B=16 (kvrt_attend_batch)"
          same=""; [[ $prog == kvrt ]] && same=$random
          timeout 90 $b/$prog $args $same --index landmark --cold 131072 --batch 1
          timeout 90 $b/$prog $args $same --index landmark --cold 131072 --batch 16 --attend batch
        done
      done
      echo "=== kvrt: cluster, summary scored on the GPU (random keys: speed only)"
      timeout 200 $b/kvrt $args $random --index cluster --cold 131072,1048576 --batch 1 --cold-attention cpu,fetch
      timeout 120 $b/kvrt $args $random --index cluster --cold 131072 --batch 16 --attend batch
    fi
    done
  } > "$out/bench.log" 2>&1 || rc=1
  cat "$out/bench.log"
  if [[ "${BENCH:-ab}" != none ]]; then  # the peer of the benchmarks' run
    PYTHONUNBUFFERED=1 timeout 60 python3 tools/gpu_bench/sdpa_peer.py --iters 100 > "$out/sdpa_peer.log" 2>&1 || rc=1
    cat "$out/sdpa_peer.log"
  fi
  exit $rc
fi

build=${BUILD_DIR:-build}
# SLIM=1 does not build the kernels-apart tools either (six more compilations of two kernels).
parts_targets="direct_attend_parts direct_attend_parts_1 direct_attend_parts_2 cluster_step_parts \
  cluster_step_parts_1 cluster_step_parts_2 direct_attend_mix"
[[ -n "${SLIM:-}" ]] && parts_targets=""
# shellcheck disable=SC2086  # target lists, split on purpose
cmake --build "$build" -j"${JOBS:-2}" --target kvrt_cli test_transfer test_runtime_gpu \
  test_gpu_kernels kvrt kvrt_static $parts_targets kernel_trace_inject pcie_gather \
  ${EXTRA_TARGETS:-} || exit 1
rm -rf .bundle .bundlez
mkdir -p .bundle/stage
cp "$build/tools/kvrt" "$build/tests/transfer/test_transfer" "$build/tests/runtime_gpu/test_runtime_gpu" \
  .bundle/stage/
cp "$build/tests/gpu/test_gpu_kernels" .bundle/stage/test_gpu
cp "$build/tools/gpu_bench/pcie_gather" .bundle/stage/
# SLIM=1 leaves out the kernels-apart tools and the install prefix (BENCH=parts, mix, e2e,
# binding): the carry limit is 64 MiB with the checkout, which a bundle with extra programs passed.
if [[ -z "${SLIM:-}" ]]; then
  cp "$build"/tools/gpu_bench/direct_attend_parts* "$build"/tools/gpu_bench/cluster_step_parts* \
    "$build"/tools/gpu_bench/direct_attend_mix .bundle/stage/
fi
for extra in ${EXTRA_PROGRAMS:-}; do cp "$extra" .bundle/stage/; done
[[ -n "${BEFORE:-}" ]] && cp "$BEFORE" .bundle/stage/kvrt_before
# LEAVE_OUT: staged programs (e.g. "test_gpu test_transfer") and "trace" (the injection library
# and libcupti) a call does not run, when the carry would pass 64 MiB (libdnnl and libopenblas are
# 76 MB of the libraries since 0.3.30).
for p in ${LEAVE_OUT:-}; do rm -f ".bundle/stage/$p"; done
bash scripts/bundle.sh .bundle .bundle/stage/*
rm -rf .bundle/stage
# The device timeline's injection library (BENCH=gpu-busy) and its libcupti.
if [[ " ${LEAVE_OUT:-} " != *" trace "* ]]; then
  cp "$build/tools/gpu_bench/libkernel_trace_inject.so" .bundle/lib/ &&
    bash scripts/bundle.sh --deps-only .bundle .bundle/lib/libkernel_trace_inject.so || exit 1
fi
# libkvrt installed into .bundle/prefix (kvrt.h, libkvrt.so*, lib/cmake/kvrt: find_package(kvrt)),
# which BENCH=e2e builds the Python package against there (KVRT_PY_LIBKVRT=installed); the
# shared libraries libkvrt.so loads join .bundle/lib. Not carried: the CLI (in .bundle/bin) and
# libkvrt.a (only find_package(kvrt COMPONENTS static) loads its targets).
if [[ "${SLIM:-}" != 1 ]]; then
  cmake --install "$build" --prefix .bundle/prefix >/dev/null || exit 1
  rm -rf .bundle/prefix/bin .bundle/prefix/lib/libkvrt.a
  strip --strip-unneeded "$(readlink -f .bundle/prefix/lib/libkvrt.so)" || exit 1
  bash scripts/bundle.sh --deps-only .bundle .bundle/prefix/lib/libkvrt.so || exit 1
fi
# xz where installed (a third smaller than gzip: the carry's 64 MiB hold the tree too).
mkdir -p .bundlez && rm -f .bundlez/bundle.tgz .bundlez/bundle.txz
if command -v xz > /dev/null; then
  tar -cf - .bundle | xz -T0 -6 > .bundlez/bundle.txz && du -sh .bundlez/bundle.txz
else
  tar czf .bundlez/bundle.tgz .bundle && du -sh .bundlez/bundle.tgz
fi
