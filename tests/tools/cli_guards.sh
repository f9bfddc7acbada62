#!/bin/sh
# cli_guards.sh KVRT DIR CASE: one of the CLI's guards against input that used to crash, hang,
# destroy a file or print a number where none was measured (the forty-sixth session's defect
# hunt). Each case fails with a line saying what went wrong.
set -u
kvrt=$1 dir=$2/guards_$3
rm -rf "$dir" && mkdir -p "$dir" || exit 1
cd "$dir" || exit 1
fail() { echo "$3: $*"; exit 1; }
# expect RC PATTERN CMD...: the command exits with RC and its stderr matches PATTERN.
expect() {
  want_rc=$1 pattern=$2
  shift 2
  "$@" >out.txt 2>err.txt
  rc=$?
  [ "$rc" -eq "$want_rc" ] || { echo "rc $rc (want $want_rc) for: $*"; cat err.txt; exit 1; }
  grep -q -- "$pattern" err.txt || { echo "no '$pattern' for: $*"; cat err.txt; exit 1; }
}
# small FILE TOKENS STEPS LAYERS Q_HEADS [gen-trace options]: a small trace, 2 kv heads, d=32.
small() {
  f=$1 tokens=$2 steps=$3 layers=$4 q_heads=$5
  shift 5
  "$kvrt" gen-trace -o "$f" --tokens "$tokens" --steps "$steps" --layers "$layers" \
    --q-heads "$q_heads" --kv-heads 2 --head-dim 32 --quiet "$@" ||
    { echo "gen-trace $f failed"; exit 1; }
}

case $3 in
fifo)  # a FIFO without a writer: refused at once, not waited on forever
  mkfifo pipe || exit 1
  for cmd in inspect replay; do
    expect 1 'not a regular file' timeout 20 "$kvrt" $cmd pipe
  done ;;
outputs)  # an output that is the input, or in no directory, fails before any work
  small t.st 300 3 2 4
  cp t.st before.st
  expect 2 'is the trace file' "$kvrt" replay t.st --quiet --json t.st
  cmp -s t.st before.st || { echo "replay --json over its trace changed it"; exit 1; }
  ln -s t.st alias.st
  expect 2 'is the --trace file' "$kvrt" bench index --trace t.st --index flat --quiet --csv alias.st
  cmp -s t.st before.st || { echo "bench index --csv over its trace changed it"; exit 1; }
  expect 2 'directory no_such_dir does not exist' "$kvrt" replay t.st --json no_such_dir/r.json
  [ ! -s out.txt ] || { echo "replay ran before refusing its output path"; exit 1; }
  expect 2 'name the same file' "$kvrt" bench index --trace t.st --index flat --csv o --json o
  # Files still to be created, spelled two ways.
  expect 2 'name the same file' "$kvrt" bench index --trace t.st --index flat --csv o2 --json ./o2
  [ ! -e o2 ] || { echo "bench index wrote o2 before refusing it"; exit 1; } ;;
gen-trace-failure)  # a failed write removes its partial file, never what -o pointed through
  [ -w /dev/full ] || { echo "no /dev/full: skipped"; exit 0; }
  ln -s /dev/full full
  expect 1 'No space left on device' "$kvrt" gen-trace -o full --tokens 64 --steps 2 --quiet
  [ -L full ] || { echo "gen-trace removed the symlink it wrote through"; exit 1; } ;;
numbers)  # values an option cannot take: refused by name with exit code 2
  small t.st 300 3 2 4
  expect 2 "--sinks: 'abc' is not an integer" "$kvrt" replay t.st --sinks abc
  expect 2 "--top-k: '1e3' is not an integer" "$kvrt" replay t.st --top-k 1e3
  expect 2 "--seed: '-1' is not an unsigned integer" "$kvrt" gen-trace -o s.st --seed -1
  expect 2 '--tokens must be positive, got 0' "$kvrt" gen-trace -o s.st --tokens 0
  expect 2 'must be a multiple of --kv-heads' "$kvrt" gen-trace -o s.st --q-heads 5 --kv-heads 2
  expect 2 '--cluster-budget: 0 is not a number in (0, 1]' \
    "$kvrt" bench decode --gpu 0 --memory host --cluster-budget 0
  expect 2 '--threads: -3 must be >= 0' "$kvrt" bench decode --gpu 0 --memory host --threads -3
  expect 2 '--head-dim (2000) must be at most' \
    "$kvrt" bench decode --gpu 0 --memory host --head-dim 2000
  expect 2 '--gpu-memory: 1e30GiB is more than 4 EiB' \
    "$kvrt" bench serve --gpu 0 --memory host --gpu-memory 1e30GiB
  expect 2 '--host-memory: 0 is no memory' "$kvrt" bench serve --gpu 0 --memory host --host-memory 0
  printf '%s\n' '{"context": "600", "tokens_per_s": 5}' >dense.jsonl
  expect 2 'not a sdpa_peer.py --serve line' \
    "$kvrt" bench serve --gpu 0 --memory host --context 600 --window 64 --dense-json dense.jsonl ;;
top-k)  # k past the context: the exact reference holds at most the tokens there are (this
        # trace asked for 8 x 200 x 8 x 1M ids, ~50 GB, and aborted)
  "$kvrt" gen-trace -o t.st --tokens 16 --steps 200 --layers 8 --q-heads 8 --kv-heads 8 \
    --head-dim 8 --quiet || exit 1
  "$kvrt" replay t.st --top-k 1048576 --quiet >out.txt 2>err.txt ||
    { echo "replay --top-k 1048576 failed"; cat err.txt; exit 1; }
  grep -q 'recall@1048576 *1.0000' out.txt || { echo "no recall 1 of exact"; cat out.txt; exit 1; } ;;
undefined)  # what was not measured says n/a (text) or null (JSON), never 0
  small one.st 300 1 1 4
  "$kvrt" replay one.st --quiet >out.txt || exit 1
  grep -q 'chosen at the previous step: n/a per q head, n/a per kv head.*this step: n/a' out.txt ||
    { echo "1 step, 1 layer: reuse not n/a"; cat out.txt; exit 1; }
  small none.st 300 0 2 4
  "$kvrt" replay none.st --quiet --json none.json >out.txt || exit 1
  grep -q '"recall_at_k": null' none.json && grep -q '"mass_recall": null' none.json &&
    ! grep -q '"recall_at_k": 0' none.json || { echo "0 steps: JSON accuracy not null"; exit 1; } ;;
overflow)  # finite values whose q.k passes f32's range: refused, not reported as NaN metrics
  command -v python3 >/dev/null || { echo "no python3: skipped"; exit 0; }
  small t.st 300 3 2 4 --dtype f32
  python3 - t.st <<'PY' || exit 1
import json, struct, sys
path = sys.argv[1]
with open(path, "r+b") as f:
    n = struct.unpack("<Q", f.read(8))[0]
    begin = json.loads(f.read(n))["0.prefill.k"]["data_offsets"][0]
    f.seek(8 + n + begin)
    f.write(struct.pack("<32f", *([3e38] * 32)))  # token 0, kv head 0: every element
PY
  expect 1 'is not finite: its q.k scores pass' "$kvrt" replay t.st --index exact --quiet
  expect 1 'is not finite' "$kvrt" inspect --attention t.st ;;
cluster-rows)  # bench index's cluster row is what replay runs: one selection per kv head
  small t.st 9000 3 1 8
  "$kvrt" bench index --trace t.st --index cluster --quiet --threads 2 --steps 2 --csv b.csv \
    >/dev/null || exit 1
  "$kvrt" replay t.st --index cluster --quiet --threads 2 --steps 2 --json r.json >/dev/null || exit 1
  b=$(awk -F, 'NR==2 { print $2 "," $10 }' b.csv)
  r=$(python3 -c "import json; print('%.6f' % json.load(open('r.json'))['read_fraction'])" 2>/dev/null ||
      echo skip)
  [ "${b%%,*}" = 1 ] || { echo "bench index cluster row: group_search ${b%%,*}, want 1"; exit 1; }
  [ "$r" = skip ] || [ "${b#*,}" = "$r" ] ||
    { echo "read fraction: bench index ${b#*,}, replay $r"; exit 1; } ;;
bench-columns)  # bench decode/serve on the host backend: what was not measured says so
  shape="--window 16 --q-heads 4 --kv-heads 1 --head-dim 32 --index flat --layers 1"
  small="--gpu 0 --cold 256 $shape --accuracy-steps 0"
  # No device: --gpu -1 is the host backend (it failed allocating device memory); the H2D time
  # is n/a, not 0, and the tier attention and merge are the CPU's times (no column had them).
  "$kvrt" bench decode ${small#--gpu 0} --gpu -1 --steps 6 --warmup 0 --max-seconds 1 \
    --csv d.csv >out.txt 2>err.txt || { echo "--gpu -1 failed"; cat err.txt; exit 1; }
  if grep -q 'use_gpu 0' out.txt; then
    grep -Eq '^flat .*\| +[0-9.]+ +[0-9.]+ +[0-9.]+ +[0-9.]+ +n/a +[0-9.]+ ' out.txt ||
      { echo "host: h2d not n/a, or gpu_attn/merge not measured"; cat out.txt; exit 1; }
    awk -F, 'NR==2 && ($9 == "" || $9 + 0 <= 0 || $13 != "" || $14 == "" || $14 + 0 <= 0) \
      { exit 1 }' d.csv || { echo "host: CSV device columns wrong"; cat d.csv; exit 1; }
  fi
  # The warm-up does not use up --max-seconds (it left 6 measured steps).
  "$kvrt" bench decode --gpu 0 --cold 1024 $shape --accuracy-steps 0 --batch 1 \
    --steps 1000 --warmup 1000 --max-seconds 0.1 >out.txt 2>&1 || { cat out.txt; exit 1; }
  n=$(awk '$1 == "flat" { print $5; exit }' out.txt)
  # (6 is what a warm-up past --max-seconds left; the sanitizer build measures ~40 steps here.)
  [ "${n:-0}" -ge 10 ] || { echo "warm-up counted against --max-seconds: n=$n"; cat out.txt; exit 1; }
  # Every measured step captured for accuracy in a pipelined run: no step timed, n/a not 0.
  "$kvrt" bench decode ${small% --accuracy-steps 0} --steps 5 --warmup 0 --pipeline \
    --accuracy-every 1 >out.txt 2>err.txt || exit 1
  grep -q 'no step was timed' err.txt && grep -q '^flat .* 0       n/a       n/a |' out.txt ||
    { echo "untimed pipelined run not n/a"; cat out.txt err.txt; exit 1; }
  # A configuration skipped says so.
  "$kvrt" bench decode $small --steps 6 --max-seconds 1 --attend batch >out.txt 2>err.txt || exit 1
  grep -q 'skipped: a batch of one' err.txt || { echo "no note of a skipped run"; cat err.txt; exit 1; }
  # bench serve: a context where nothing fits leaves its measured cells empty.
  "$kvrt" bench serve --gpu 0 --q-heads 8 --kv-heads 2 --head-dim 64 --window 64 --layers 1 \
    --steps 8 --warmup 1 --max-seconds 1 --context 4096 --gpu-memory 64MiB --host-memory 8MiB \
    --layers-model 4 --csv s.csv >out.txt 2>&1 || exit 1
  awk -F, 'NR==2 { exit !($12 == "" && $13 == "" && $15 == "") }' s.csv ||
    { echo "bench serve: unmeasured cells not empty"; cat s.csv; exit 1; } ;;
*) echo "unknown case $3"; exit 2 ;;
esac
exit 0
