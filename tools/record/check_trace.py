#!/usr/bin/env python3
"""Check a kvrt trace and measure where each head's attention mass sits.

Needs numpy only (the safetensors file is parsed here: f32, f16 and bf16).

For every layer, decode step and q head it computes exact attention over all tokens up to and
including the step (f32, the trace's scale) and splits the softmax mass into
  sinks  : the first --sinks tokens (default 4)
  window : the last --window tokens (default 512; the step's own token included)
  cold   : everything else, the part kvrt keeps in host memory behind the index.
It also reports
  top-k cold : share of the cold mass carried by the exact top --topk cold keys (what a perfect
               index at that k would recover)
  k90        : cold keys (by exact score) needed to carry 90% of the cold mass, mean over steps
  topk err   : ||o_top - o|| / ||o||, o_top = attention over sinks + window + the exact top-k
               cold keys: the error of a perfect index at that k
  sw err     : ||o_sw - o|| / ||o||, o_sw = attention over sinks + window alone, the output error
               a head served from the GPU tier alone would make (DuoAttention's streaming head)
  o err      : if the trace holds L.decode.o (the model's own attention output), the relative
               error of exact attention recomputed from the trace against it: a check that the
               trace's q/k/v/scale are what the model really used (f16 storage gives ~1e-3).
Heads are classified: streaming-like when mean cold mass <= --stream-mean and the 95th percentile
over steps <= --stream-p95, else retrieval.

Usage: python tools/record/check_trace.py TRACE [--sinks 4] [--window 512] [--topk 100] [--json F]
"""

from __future__ import annotations

import argparse
import json
import struct
import sys

import numpy as np


def load_trace(path):
    """Returns (metadata dict, {name: np.ndarray (f32 for float tensors)}); SystemExit naming the
    file when it cannot be read or is not safetensors."""
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
            size = f.seek(0, 2)
            if not 2 <= n <= size - 8:  # a header length the file cannot hold: not safetensors
                raise SystemExit(f"{path}: not a safetensors file (header length {n}, file "
                                 f"{size} bytes)")
            f.seek(8)
            header = json.loads(f.read(n))
            data = np.fromfile(f, dtype=np.uint8)
    except OSError as e:
        raise SystemExit(f"{path}: {e.strerror or e}")
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise SystemExit(f"{path}: not a safetensors file (its header is not JSON)")
    meta = header.pop("__metadata__", {})
    out = {}
    for name, t in header.items():
        b, e = t["data_offsets"]
        raw = data[b:e]
        dt = t["dtype"]
        if dt == "BF16":
            arr = (raw.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
        else:
            arr = raw.view({"F32": np.float32, "F16": np.float16, "I32": np.int32,
                            "I64": np.int64, "F64": np.float64, "U8": np.uint8}[dt])
            if arr.dtype.kind == "f":
                arr = arr.astype(np.float32)
        out[name] = arr.reshape(t["shape"])
    return meta, out


def analyze(meta, ts, sinks=4, window=512, topk=100):
    L = int(meta["num_layers"])
    Hq, Hkv, d = int(meta["num_q_heads"]), int(meta["num_kv_heads"]), int(meta["head_dim"])
    T, S = int(meta["prompt_tokens"]), int(meta["decode_steps"])
    scale = float(meta["scale"]) or d ** -0.5
    group = Hq // Hkv
    src = meta.get("source_layers", ",".join(map(str, range(L)))).split(",")
    rows = []
    for l in range(L):
        K = np.concatenate([ts[f"{l}.prefill.k"], ts[f"{l}.decode.k"]], 0)  # [N, Hkv, d]
        V = np.concatenate([ts[f"{l}.prefill.v"], ts[f"{l}.decode.v"]], 0)
        Q = ts[f"{l}.decode.q"]  # [S, Hq, d]
        O = ts.get(f"{l}.decode.o")
        N = T + S
        pos = np.arange(N)
        for h in range(Hq):
            kh = h // group
            sc = (Q[:, h, :] @ K[:, kh, :].T) * scale  # [S, N]
            n_ctx = T + np.arange(S) + 1  # tokens visible to step s
            visible = pos[None, :] < n_ctx[:, None]
            sc = np.where(visible, sc, -np.inf)
            m = sc.max(1, keepdims=True)
            p = np.exp(sc - m)
            p /= p.sum(1, keepdims=True)
            o = p @ V[:, kh, :]  # [S, d]
            sink_m = pos[None, :] < sinks
            win_m = (pos[None, :] >= (n_ctx[:, None] - window)) & visible
            gpu_m = sink_m | win_m
            cold_m = visible & ~gpu_m
            mass_sink = (p * sink_m).sum(1)
            mass_win = (p * (win_m & ~sink_m)).sum(1)
            mass_cold = (p * cold_m).sum(1)
            # exact top-k of cold keys by score
            pc = np.where(cold_m, p, 0.0)
            k = min(topk, pc.shape[1])
            srt = -np.sort(-pc, 1)  # descending
            top = srt[:, :k].sum(1) if k > 0 else np.zeros(S)
            topk_share = np.where(mass_cold > 0, top / np.maximum(mass_cold, 1e-30), 1.0)
            # cold keys needed for 90% of the cold mass
            cs = np.cumsum(srt, 1) / np.maximum(mass_cold[:, None], 1e-30)
            k90 = np.minimum((cs < 0.9).sum(1) + 1, cold_m.sum(1))
            # output with sinks + window + the exact top-k cold keys (a perfect index at k)
            thr = srt[:, k - 1:k] if k > 0 else np.full((S, 1), np.inf)
            sel = gpu_m | (cold_m & (pc >= np.maximum(thr, 1e-38)))
            pt = np.where(sel, p, 0.0)
            o_top = (pt @ V[:, kh, :]) / np.maximum(pt.sum(1, keepdims=True), 1e-30)
            # streaming-only output: attention over sinks + window
            pg = np.where(gpu_m, p, 0.0)
            o_sw = (pg @ V[:, kh, :]) / np.maximum(pg.sum(1, keepdims=True), 1e-30)
            on = np.linalg.norm(o, axis=1)
            sw_err = np.linalg.norm(o_sw - o, axis=1) / np.maximum(on, 1e-30)
            top_err = np.linalg.norm(o_top - o, axis=1) / np.maximum(on, 1e-30)
            o_err = None
            if O is not None:
                o_err = float(np.max(np.linalg.norm(o - O[:, h, :], axis=1) /
                                     np.maximum(np.linalg.norm(O[:, h, :], axis=1), 1e-30)))
            rows.append({
                "layer": l, "source_layer": int(src[l]), "head": h, "kv_head": kh,
                "sink_mass": float(mass_sink.mean()), "window_mass": float(mass_win.mean()),
                "cold_mass_mean": float(mass_cold.mean()),
                "cold_mass_p95": float(np.percentile(mass_cold, 95)),
                "cold_mass_max": float(mass_cold.max()),
                "topk_cold_share": float(topk_share.mean()),
                "cold_keys": float(cold_m.sum(1).mean()),
                "k90_cold_mean": float(k90.mean()), "k90_cold_max": int(k90.max()),
                "topk_err_mean": float(top_err.mean()), "topk_err_max": float(top_err.max()),
                "sw_err_mean": float(sw_err.mean()), "sw_err_max": float(sw_err.max()),
                "o_err_max": o_err,
            })
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("trace")
    ap.add_argument("--sinks", type=int, default=4)
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--topk", type=int, default=100)
    ap.add_argument("--stream-mean", type=float, default=0.05)
    ap.add_argument("--stream-p95", type=float, default=0.10)
    ap.add_argument("--json", help="write the per-head rows here")
    args = ap.parse_args(argv)

    meta, ts = load_trace(args.trace)
    if meta.get("format") != "kvrt-trace":
        sys.exit(f"{args.trace}: metadata format is {meta.get('format')!r}, not kvrt-trace")
    if meta.get("post_rotary") not in ("true", "True", "1"):
        sys.exit("post_rotary is not true")
    L, T, S = int(meta["num_layers"]), int(meta["prompt_tokens"]), int(meta["decode_steps"])
    for l in range(L):
        for ph, rows_ in (("prefill", T), ("decode", S)):
            for part, heads in (("q", meta["num_q_heads"]), ("k", meta["num_kv_heads"]),
                                ("v", meta["num_kv_heads"])):
                x = ts[f"{l}.{ph}.{part}"]
                want = (rows_, int(heads), int(meta["head_dim"]))
                if x.shape != want:
                    sys.exit(f"{l}.{ph}.{part}: shape {x.shape} != {want}")
                if not np.isfinite(x).all():
                    sys.exit(f"{l}.{ph}.{part}: non-finite values")
    print(f"trace {args.trace}: model {meta.get('model')}, layers {meta.get('source_layers')}, "
          f"T={T}, steps={S}, heads {meta['num_q_heads']}q/{meta['num_kv_heads']}kv x "
          f"{meta['head_dim']}, scale {meta['scale']}, dtype {meta['dtype']}")
    print(f"text: {meta.get('source_text')}  generated: {meta.get('generated_text')!r}")
    if S == 0:  # a valid trace of a prompt only: no decode query to split the mass of
        print("no decode steps: nothing to measure (the tensors' shapes and values are valid)")
        return []
    rows = analyze(meta, ts, args.sinks, args.window, args.topk)
    print(f"\nmass split per head, mean over {S} decode steps (sinks={args.sinks}, "
          f"window={args.window}, cold = the rest; top{args.topk} = share of cold mass in the "
          f"exact top-{args.topk} cold keys)")
    hdr = (f"{'layer':>5} {'src':>4} {'head':>4} {'sinks':>7} {'window':>7} {'cold':>7} "
           f"{'cold p95':>8} {'cold max':>8} {'top' + str(args.topk):>7} {'k90':>6} "
           f"{'sw err':>7} {'swerrmax':>8} {'topkerr':>7} {'o err':>8}  class")
    print(hdr)
    n_stream = 0
    for r in rows:
        stream = r["cold_mass_mean"] <= args.stream_mean and r["cold_mass_p95"] <= args.stream_p95
        r["class"] = "streaming" if stream else "retrieval"
        n_stream += stream
        oe = f"{r['o_err_max']:.1e}" if r["o_err_max"] is not None else "-"
        print(f"{r['layer']:>5} {r['source_layer']:>4} {r['head']:>4} {r['sink_mass']:>7.3f} "
              f"{r['window_mass']:>7.3f} {r['cold_mass_mean']:>7.3f} {r['cold_mass_p95']:>8.3f} "
              f"{r['cold_mass_max']:>8.3f} {r['topk_cold_share']:>7.3f} "
              f"{r['k90_cold_mean']:>6.0f} {r['sw_err_mean']:>7.3f} {r['sw_err_max']:>8.3f} "
              f"{r['topk_err_mean']:>7.3f} {oe:>8}  {r['class']}")
    print(f"\n{n_stream} of {len(rows)} heads streaming-like (cold mass mean <= "
          f"{args.stream_mean}, p95 <= {args.stream_p95}); {len(rows) - n_stream} retrieval")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"trace": args.trace, "meta": meta, "args": vars(args), "heads": rows}, f,
                      indent=1)
    return rows


if __name__ == "__main__":
    main()
