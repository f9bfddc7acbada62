#!/usr/bin/env python3
"""The Python package's own cost per layer-step (issue 15, "binding overhead"): the layer-steps of
`kvrt bench decode --trace FILE` (append one token, attend, wait for the stream) driven through
kvrt.Runtime / kvrt.Sequence with torch tensors, on the same trace, shape and settings.

Run it beside `kvrt bench decode --trace FILE` with the same --cold/--sinks/--window/--layers and
compare the p50 per layer-step. It also measures the binding apart from the work, in one process:

  fused            every other step through Sequence.append_attend (append + attend in one
                   call, what kvrt.hf makes), its own p50 per layer-step beside the two calls'
  attend overhead  the Python call's wall time minus the library's own wall time inside
                   kvrt_attend (kvrt_stats.time_attend_ns), per call: argument checks, DLPack,
                   the stream lookup, releasing the GIL
  append           the Python call's wall time (the library keeps no time of its own for append;
                   bench decode's "append" column is the C++ caller's figure for the same call)
  call floor       a call that does no work (Sequence.length) through the same binding

  kvrt gen-trace -o /tmp/t.safetensors --tokens 133200 --steps 40 --layers 1 --q-heads 32 \\
      --kv-heads 8 --head-dim 128 --seed 3
  kvrt bench decode --trace /tmp/t.safetensors --index cluster --cold 131072 --batch 1
  python3 tools/gpu_bench/binding_overhead.py --trace /tmp/t.safetensors --cold 131072

--calls (no trace): the binding alone on a small exact runtime over --device's tensors, an
attend's Python wall time minus the library's, with torch tensors crossing as DLPack capsules
(the package's path) and through Tensor.__dlpack__ (the generic path), the two conversions
alone, and a layer-step as two calls (append, attend) against Sequence.append_attend (and a batch
of 16: 16 appends and attend_batch against Runtime.append_attend_batch):
  python3 tools/gpu_bench/binding_overhead.py --calls --device cpu
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

from e2e_bench import _number, _profiler  # FIELD=VALUE parsing, torch.profiler (same directory)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trace", help="a kvrt trace (layer 0 is used for every layer)")
    ap.add_argument("--calls", action="store_true",
                    help="measure the binding alone (no trace; see below)")
    ap.add_argument("--cold", type=int, default=131072, help="cold (host store) tokens")
    ap.add_argument("--sinks", type=int, default=4, help="sink tokens (bench decode's default)")
    ap.add_argument("--window", type=int, default=2048, help="window tokens (bench decode's default)")
    ap.add_argument("--layers", type=int, default=2, help="layers, each with the same K/V")
    ap.add_argument("--steps", type=int, default=30, help="measured decode steps")
    ap.add_argument("--warmup", type=int, default=3, help="unmeasured steps first")
    ap.add_argument("--no-fused", dest="fused", action="store_false",
                    help="every step through append + attend (by default every other step runs "
                         "Sequence.append_attend, the one call kvrt.hf makes, reported apart)")
    ap.add_argument("--index", default="cluster", help="kvrt index kind")
    ap.add_argument("--top-k", type=int, default=100, help="config.top_k")
    ap.add_argument("--device", default="cuda", help="cuda (GPU backend, device tensors) or cpu")
    ap.add_argument("--kvrt", action="append", default=[], metavar="FIELD=VALUE",
                    help="another kvrt.Config field (repeatable)")
    ap.add_argument("--json", default=None, help="write the figures here as one JSON object")
    ap.add_argument("--profile-dir", default=None,
                    help="after the measured steps, profile --profile-steps more (torch.profiler, "
                         "CPU and CUDA: kvrt's kernels, copies and CUDA calls) and write their "
                         "timeline there as binding-steps.json (a Chrome trace; "
                         "tools/gpu_bench/trace_gaps.py reads it)")
    ap.add_argument("--profile-steps", type=int, default=4, help="steps profiled (--profile-dir)")
    ap.add_argument("--profile-pipelined", action="store_true",
                    help="profile the steps as a decoder runs them: a step's layers back to back "
                         "(one call per layer-step, Sequence.append_attend) and one stream sync "
                         "per step, as `kvrt bench decode --pipeline` does; each step is a span "
                         "stepN (trace_gaps.py --steps stepN: the device's busy and idle time), "
                         "and takes a decode row of its own after the measured ones")
    return ap.parse_args(argv)


def load_layer0(path: str, prompt: int, steps: int):
    """The trace's layer 0 (prefill.q/k/v up to `prompt` rows, decode.q/k/v up to `steps`)."""
    from safetensors import safe_open
    with safe_open(path, framework="pt") as f:
        meta = f.metadata() or {}
        have_p, have_s = int(meta.get("prompt_tokens", 0)), int(meta.get("decode_steps", 0))
        if have_p < prompt or have_s < steps:
            raise SystemExit(f"binding_overhead: {path} has {have_p} prompt tokens and {have_s} "
                             f"decode steps; this run needs {prompt} and {steps}")
        t = {name: f.get_tensor(f"0.{name}") for name in (
            "prefill.q", "prefill.k", "prefill.v", "decode.q", "decode.k", "decode.v")}
    for name in t:
        t[name] = t[name][:prompt] if name.startswith("prefill") else t[name][:steps]
    return meta, t


def calls(args, torch, kvrt, on_cuda) -> dict:
    """The binding's cost per attend on a small exact runtime, capsules against __dlpack__."""
    from kvrt import _runtime
    dev = torch.device(args.device)
    # Small (4 q / 2 kv heads x 64, 8 tokens): the library's own time stays a few us, so that
    # the difference is the binding's, not the noise of the work.
    rt = kvrt.Runtime(num_layers=1, num_q_heads=4, num_kv_heads=2, head_dim=64, dtype="bf16",
                      sink_tokens=4, window_tokens=128, index_kind="exact", check_finite=0,
                      use_gpu=1 if on_cuda else 0, worker_threads=1)
    seq = rt.sequence()
    g = torch.Generator().manual_seed(0)
    k = torch.randn(8, 2, 64, generator=g).to(device=dev, dtype=torch.bfloat16)
    seq.prefill(0, None, k, k)
    q = torch.randn(4, 64, generator=g).to(device=dev, dtype=torch.bfloat16)
    out = torch.empty(4, 64, device=dev)
    sync = torch.cuda.current_stream().synchronize if on_cuda else (lambda: None)

    def per_attend(n=3000) -> tuple[float, float]:
        seq.attend(0, q, out=out)
        sync()
        before = rt.stats()
        t0 = time.perf_counter()
        for _ in range(n):
            seq.attend(0, q, out=out)
        wall = (time.perf_counter() - t0) / n * 1e6
        sync()
        d = rt.stats() - before
        return wall, d.time_attend_ns / d.attend_calls / 1e3

    def per_call(f, n=20000) -> float:
        t0 = time.perf_counter()
        for _ in range(n):
            f()
        return (time.perf_counter() - t0) / n * 1e6

    res = {}
    wall, lib = per_attend()
    res.update(capsule_attend_us=wall, capsule_library_us=lib, capsule_binding_us=wall - lib)
    saved = _runtime._Torch.tensor
    _runtime._Torch.tensor = object  # no torch tensor matches: the generic path
    try:
        wall, lib = per_attend()
    finally:
        _runtime._Torch.tensor = saved
    res.update(dlpack_attend_us=wall, dlpack_library_us=lib, dlpack_binding_us=wall - lib)
    # A layer-step (append one row, attend) as two calls and as Sequence.append_attend, pairs
    # alternating so that both see the same library work; a new sequence every 100 steps keeps
    # that work small (the window holds them all): the difference of the means is what the one
    # call saves.
    k1 = torch.randn(1, 2, 64, generator=g).to(device=dev, dtype=torch.bfloat16)
    two, one = [], []
    for _ in range(40):
        with rt.sequence() as s2:
            s2.prefill(0, None, k, k)
            for i in range(100):
                t0 = time.perf_counter()
                if i % 2:
                    s2.append_attend(0, q, k1, k1, out=out)
                else:
                    s2.append(0, k1, k1)
                    s2.attend(0, q, out=out)
                (one if i % 2 else two).append(time.perf_counter() - t0)
            sync()
    res["step_two_calls_us"] = statistics.fmean(two) * 1e6
    res["step_one_call_us"] = statistics.fmean(one) * 1e6
    # The same for a batch of 16: 16 appends and attend_batch against append_attend_batch.
    B = 16
    kb = torch.randn(B, 2, 64, generator=g).to(device=dev, dtype=torch.bfloat16)
    qb = torch.randn(B, 4, 64, generator=g).to(device=dev, dtype=torch.bfloat16)
    outb = torch.empty(B, 4, 64, device=dev)
    rows = [kb[b:b + 1] for b in range(B)]
    two, one = [], []
    for _ in range(10):
        seqs = [rt.sequence() for _ in range(B)]
        for s2 in seqs:
            s2.prefill(0, None, k, k)
        for i in range(100):
            t0 = time.perf_counter()
            if i % 2:
                rt.append_attend_batch(seqs, 0, qb, kb, kb, out=outb)
            else:
                for s2, r in zip(seqs, rows):
                    s2.append(0, r, r)
                rt.attend_batch(seqs, 0, qb, out=outb)
            (one if i % 2 else two).append(time.perf_counter() - t0)
        sync()
        for s2 in seqs:
            s2.release()
    res["batch16_step_calls_us"] = statistics.fmean(two) * 1e6
    res["batch16_step_one_call_us"] = statistics.fmean(one) * 1e6
    res["to_dlpack_us"] = per_call(lambda: torch.utils.dlpack.to_dlpack(q))
    res["tensor_dlpack_us"] = per_call(lambda: q.__dlpack__())
    rt.close()
    print(f"binding per attend ({args.device} tensors, exact runtime, 4 q heads x 64, bf16): "
          f"capsule {res['capsule_binding_us']:.2f} us (call {res['capsule_attend_us']:.2f}, "
          f"library {res['capsule_library_us']:.2f}); __dlpack__ {res['dlpack_binding_us']:.2f} us "
          f"(call {res['dlpack_attend_us']:.2f}, library {res['dlpack_library_us']:.2f}); "
          f"to_dlpack alone {res['to_dlpack_us']:.2f} us, Tensor.__dlpack__ alone "
          f"{res['tensor_dlpack_us']:.2f} us")
    print(f"layer-step (append 1 row + attend): two calls {res['step_two_calls_us']:.2f} us, "
          f"Sequence.append_attend {res['step_one_call_us']:.2f} us (saves "
          f"{res['step_two_calls_us'] - res['step_one_call_us']:.2f} us); batch of 16: 16 appends "
          f"+ attend_batch {res['batch16_step_calls_us']:.2f} us, Runtime.append_attend_batch "
          f"{res['batch16_step_one_call_us']:.2f} us (saves "
          f"{res['batch16_step_calls_us'] - res['batch16_step_one_call_us']:.2f} us)")
    return res


def profile_steps(args, torch, seq, rows, out, sync, on_cuda) -> None:
    """--profile-steps more layer-steps under torch.profiler (step s takes rows[s % len(rows)]:
    the last measured decode row again, or --profile-pipelined's fresh rows), each call in a named
    span, written to PROFILE_DIR/binding-steps.json."""
    import os
    from torch.profiler import record_function
    with _profiler(on_cuda) as prof:
        for s in range(args.profile_steps):
            k_s, v_s, q_s = rows[s % len(rows)]
            if args.profile_pipelined:
                with record_function(f"step{s}"):
                    for layer in range(args.layers):
                        with record_function("attend"):
                            seq.append_attend(layer, q_s, k_s, v_s, out=out)
                    with record_function("sync"):
                        sync()
                continue
            for layer in range(args.layers):
                with record_function(f"step{s}.layer{layer}"):
                    with record_function("append"):
                        seq.append(layer, k_s, v_s)
                    with record_function("attend"):
                        seq.attend(layer, q_s, out=out)
                    with record_function("sync"):
                        sync()
    os.makedirs(args.profile_dir, exist_ok=True)
    path = os.path.join(args.profile_dir, "binding-steps.json")
    prof.export_chrome_trace(path)
    print(f"  profiled {args.profile_steps} steps x {args.layers} layers: {path}")


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch
    import kvrt

    on_cuda = args.device.startswith("cuda")
    if on_cuda and not torch.cuda.is_available():
        print("binding_overhead: no CUDA device (use --device cpu)", file=sys.stderr)
        return 2
    if args.calls or not args.trace:
        if not args.calls:
            print("binding_overhead: --trace FILE or --calls", file=sys.stderr)
            return 2
        res = calls(args, torch, kvrt, on_cuda)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(res, f)
                f.write("\n")
        return 0
    prompt = args.sinks + args.cold + args.window
    total = args.warmup + args.steps
    # Pipelined profiling takes decode rows of its own after the measured ones (fresh queries,
    # so that its steps read misses as the measured ones do; the trace must hold them).
    fresh = args.profile_steps if args.profile_dir and args.profile_pipelined else 0
    meta, t = load_layer0(args.trace, prompt, total + fresh)
    dev = torch.device(args.device)
    t = {k: v.to(device=dev, dtype=torch.bfloat16).contiguous() for k, v in t.items()}
    opts = {kv.partition("=")[0].strip(): _number(kv.partition("=")[2].strip()) for kv in args.kvrt}
    rt = kvrt.Runtime(num_layers=args.layers, num_q_heads=int(meta["num_q_heads"]),
                      num_kv_heads=int(meta["num_kv_heads"]), head_dim=int(meta["head_dim"]),
                      scale=float(meta.get("scale", 0) or 0), dtype="bf16",
                      sink_tokens=args.sinks, window_tokens=args.window, top_k=args.top_k,
                      index_kind=args.index, check_finite=0, use_gpu=1 if on_cuda else 0, **opts)
    seq = rt.sequence()
    sync = torch.cuda.current_stream().synchronize if on_cuda else (lambda: None)
    t0 = time.perf_counter()
    for layer in range(args.layers):
        seq.prefill(layer, t["prefill.q"], t["prefill.k"], t["prefill.v"])
    sync()
    prefill_s = time.perf_counter() - t0

    q_heads, d = t["decode.q"].shape[1], t["decode.q"].shape[2]
    out = torch.empty((q_heads, d), dtype=torch.float32, device=dev)
    step_us, append_us, attend_us, fused_us = [], [], [], []
    # Each step's rows as views made before the loop: bench decode computes its pointers for free,
    # and three torch slicings per layer-step (~2 us each) are the benchmark's cost, not the
    # binding's (they were inside the timed region until the sixth session).
    rows = [(t["decode.k"][s:s + 1], t["decode.v"][s:s + 1], t["decode.q"][s])
            for s in range(total + fresh)]
    before = None
    for s in range(total):
        if s == args.warmup:
            before = rt.stats()
        k_s, v_s, q_s = rows[s]
        # Steps alternate between the two calls (append, attend) and the one call that does both
        # (Sequence.append_attend, what kvrt.hf uses), so that both see the same stretch of the run.
        fused = args.fused and s % 2 == 1
        for layer in range(args.layers):
            a = time.perf_counter()
            if fused:
                seq.append_attend(layer, q_s, k_s, v_s, out=out)
                b = c = time.perf_counter()
            else:
                seq.append(layer, k_s, v_s)
                b = time.perf_counter()
                seq.attend(layer, q_s, out=out)
                c = time.perf_counter()
            sync()
            e = time.perf_counter()
            if s >= args.warmup:
                if fused:
                    fused_us.append((e - a) * 1e6)
                    continue
                step_us.append((e - a) * 1e6)
                append_us.append((b - a) * 1e6)
                attend_us.append((c - b) * 1e6)
    delta = rt.stats() - before
    lib_attend_us = delta.time_attend_ns / max(delta.attend_calls, 1) / 1e3
    if args.profile_dir:
        profile_steps(args, torch, seq, rows[total:] if fresh else [rows[-1]], out, sync,
                      on_cuda)

    n_floor = 2000
    a = time.perf_counter()
    for _ in range(n_floor):
        seq.length(0)
    floor_us = (time.perf_counter() - a) / n_floor * 1e6
    rt.close()

    res = {
        "trace": args.trace, "cold": args.cold, "layers": args.layers, "steps": args.steps,
        "index": args.index, "device": torch.cuda.get_device_name() if on_cuda else "cpu",
        "kvrt": kvrt.__version__, "prefill_s": prefill_s,
        "layer_step_us_p50": statistics.median(step_us),
        "layer_step_us_p99": sorted(step_us)[min(len(step_us) - 1, int(0.99 * len(step_us)))],
        "append_us_mean": statistics.fmean(append_us),
        "attend_call_us_mean": statistics.fmean(attend_us),
        "attend_library_us_mean": lib_attend_us,
        "attend_overhead_us": statistics.fmean(attend_us) - lib_attend_us,
        "call_floor_us": floor_us,
    }
    if fused_us:
        res["fused_layer_step_us_p50"] = statistics.median(fused_us)
        res["fused_layer_step_us_p99"] = sorted(fused_us)[
            min(len(fused_us) - 1, int(0.99 * len(fused_us)))]
    print(f"kvrt {kvrt.__version__} through Python, {res['device']}, {args.index}, cold "
          f"{args.cold}, {args.layers} layers x {args.steps} steps (after {args.warmup})")
    print(f"  layer-step p50 {res['layer_step_us_p50']:.1f} us, p99 {res['layer_step_us_p99']:.1f}"
          f" us (append + attend + stream sync; compare bench decode's p50)")
    if fused_us:
        print(f"  the same with one call per layer-step (Sequence.append_attend, every other "
              f"step): p50 {res['fused_layer_step_us_p50']:.1f} us, p99 "
              f"{res['fused_layer_step_us_p99']:.1f} us")
    print(f"  append call {res['append_us_mean']:.1f} us (compare bench decode's append column)")
    print(f"  attend call {res['attend_call_us_mean']:.1f} us, inside the library "
          f"{lib_attend_us:.1f} us: binding overhead {res['attend_overhead_us']:.1f} us per attend")
    print(f"  a call without work (Sequence.length): {floor_us:.2f} us")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f)
            f.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
