#!/usr/bin/env python3
"""All-GPU peer for gpu_bench: PyTorch scaled_dot_product_attention for one decode query over a
full on-GPU KV cache, per layer-step, bf16; the 8B shape (32 q / 8 kv heads, d=128) unless
--q-heads, --kv-heads and --head-dim say otherwise.

Two variants: GQA expanded (K/V repeated to the q heads beforehand, only SDPA timed) and
enable_gqa=True (PyTorch >= 2.5). Times with CUDA events, p50/p99 over --iters steps after
warm-up, and a pipelined mean (back-to-back steps between one event pair).

Usage: python3 sdpa_peer.py [--iters 200] [--tokens 131072 1048576]
       python3 sdpa_peer.py --prefill --tokens 131072 --iters 5   (causal prefill of one layer)

Serving mode (the dense peer of `kvrt bench serve`): for each context, the largest batch whose
whole KV (all --layers-model layers) fits --gpu-memory, one layer of it allocated and timed
(SDPA enable_gqa, batch B, one decode query per sequence), one JSON line per context:

  python3 sdpa_peer.py --serve --gpu-memory 100GiB --context 32768 131072 1048576 \
      --layers-model 32 [--q-heads 32 --kv-heads 8 --head-dim 128 --max-batch 256]

The fit is the same arithmetic as tools/serve_fit.cc (docs/benchmarks.md, "Serving capacity"):
bytes per sequence = 2 * context * kv_heads * head_dim * 2 (bf16) * layers_model, batch =
floor(budget / bytes per sequence).
"""
import argparse
import json
import math
import re
import statistics

try:  # the fit arithmetic (parse_bytes, dense_bytes_per_sequence) is tested without torch
    import torch
    import torch.nn.functional as F
except ImportError:
    torch = F = None


def time_steps(fn, iters, warmup=10):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    ts = []
    for _ in range(iters):
        a.record()
        fn()
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b) * 1e3)
    ts.sort()
    a.record()
    for _ in range(iters):
        fn()
    b.record()
    b.synchronize()
    p99 = ts[min(len(ts) - 1, int(len(ts) * 0.99 + 0.999) - 1)]
    return statistics.median(ts), p99, a.elapsed_time(b) * 1e3 / iters


_UNITS = {"": 1, "B": 1, "KB": 1e3, "MB": 1e6, "GB": 1e9, "TB": 1e12,
          "KiB": 1024, "MiB": 1024**2, "GiB": 1024**3, "TiB": 1024**4}


def parse_bytes(option, s):
    """The byte counts of tools/options.cc ParseBytes: a number and an optional unit."""
    m = re.fullmatch(r"\s*([0-9.eE+]+)\s*([A-Za-z]*)", s)
    if m and m.group(2) in _UNITS:
        try:
            v = float(m.group(1))
            if v >= 0 and math.isfinite(v):
                return int(math.floor(v * _UNITS[m.group(2)]))
        except ValueError:
            pass
    raise SystemExit(f"sdpa_peer.py: {option}: '{s}' is not a byte count "
                     "(a number with an optional unit B, KB, MB, GB, TB, KiB, MiB, GiB or TiB)")


def dense_bytes_per_sequence(context, kv_heads, head_dim, layers_model, dtype_bytes=2):
    return 2 * context * kv_heads * head_dim * dtype_bytes * layers_model


def serve(args):
    budget = parse_bytes("--gpu-memory", args.gpu_memory)
    hq, hkv, d = args.q_heads, args.kv_heads, args.head_dim
    dev = torch.device("cuda")
    for n in args.context:
        per_seq = dense_bytes_per_sequence(n, hkv, d, args.layers_model)
        fit = budget // per_seq
        batch = min(fit, args.max_batch)
        line = {"peer": "sdpa enable_gqa", "device": torch.cuda.get_device_name(0),
                "torch": torch.__version__, "context": n, "gpu_memory_bytes": budget,
                "layers_model": args.layers_model, "q_heads": hq, "kv_heads": hkv, "head_dim": d,
                "bytes_per_seq": per_seq, "fit_batch": fit, "batch": batch}
        if batch == 0:
            line.update(p50_us=None, p99_us=None, tokens_per_s=0.0,
                        note="not one sequence's KV fits the budget")
        else:
            torch.manual_seed(0)
            q = torch.randn(batch, hq, 1, d, device=dev, dtype=torch.bfloat16)
            k = torch.randn(batch, hkv, n, d, device=dev, dtype=torch.bfloat16)
            v = torch.randn(batch, hkv, n, d, device=dev, dtype=torch.bfloat16)
            p50, p99, pipe = time_steps(
                lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True), args.iters)
            line.update(p50_us=p50, p99_us=p99, pipelined_us=pipe,
                        tokens_per_s=batch / (p50 * 1e-6))
            del q, k, v
            torch.cuda.empty_cache()
        print(json.dumps(line), flush=True)


def prefill(args):
    """Causal SDPA over a whole prompt of one layer (the peer of kvrt_prefill's index build)."""
    hq, hkv, d = args.q_heads, args.kv_heads, args.head_dim
    dev = torch.device("cuda")
    for n in args.tokens:
        torch.manual_seed(0)
        q = torch.randn(1, hq, n, d, device=dev, dtype=torch.bfloat16)
        k = torch.randn(1, hkv, n, d, device=dev, dtype=torch.bfloat16)
        v = torch.randn(1, hkv, n, d, device=dev, dtype=torch.bfloat16)
        p50, p99, _ = time_steps(
            lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True),
            args.iters, warmup=2)
        print(json.dumps({"peer": "sdpa causal prefill, enable_gqa", "tokens": n,
                          "device": torch.cuda.get_device_name(0), "torch": torch.__version__,
                          "p50_ms": p50 / 1e3, "p99_ms": p99 / 1e3}), flush=True)
        del q, k, v
        torch.cuda.empty_cache()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--iters", type=int, default=200)
    ap.add_argument("--tokens", type=int, nargs="+", default=[131072, 1048576])
    ap.add_argument("--serve", action="store_true",
                    help="largest batch fitting --gpu-memory per --context, one JSON line each")
    ap.add_argument("--prefill", action="store_true",
                    help="causal SDPA over --tokens prompt tokens of one layer, one JSON line each")
    ap.add_argument("--gpu-memory", default="100GiB", help="GPU memory for KV (serve)")
    ap.add_argument("--context", type=int, nargs="+", default=[32768, 131072, 1048576],
                    help="context lengths (serve)")
    ap.add_argument("--layers-model", type=int, default=32, help="model layers (serve)")
    ap.add_argument("--q-heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--max-batch", type=int, default=1024, help="largest batch timed (serve)")
    args = ap.parse_args()
    if torch is None:
        raise SystemExit("sdpa_peer.py: needs PyTorch with CUDA")
    if args.serve:
        serve(args)
        return
    if args.prefill:
        prefill(args)
        return
    hq, hkv, d = args.q_heads, args.kv_heads, args.head_dim
    if hkv <= 0 or hq % hkv != 0:
        raise SystemExit(f"sdpa_peer.py: --q-heads {hq} must be a multiple of --kv-heads {hkv}")
    dev = torch.device("cuda")
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name(0)}, {hq} q / {hkv} kv heads, d={d}")
    print(f"| {'what':28} | {'tokens':>8} | {'p50 us':>9} | {'p99 us':>9} | {'pipe us':>9} | {'GB/s p50':>8} | backend")
    for n in args.tokens:
        torch.manual_seed(0)
        q = torch.randn(1, hq, 1, d, device=dev, dtype=torch.bfloat16)
        k = torch.randn(1, hkv, n, d, device=dev, dtype=torch.bfloat16)
        v = torch.randn(1, hkv, n, d, device=dev, dtype=torch.bfloat16)
        kv_bytes = 2 * hkv * n * d * 2  # what a GQA-aware kernel must read
        variants = []
        try:
            F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
            variants.append(("sdpa enable_gqa", lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True), kv_bytes))
        except (TypeError, RuntimeError) as e:
            print(f"enable_gqa unavailable: {e}")
        ke = k.repeat_interleave(hq // hkv, dim=1)
        ve = v.repeat_interleave(hq // hkv, dim=1)
        variants.append(("sdpa GQA expanded", lambda: F.scaled_dot_product_attention(q, ke, ve), hq // hkv * kv_bytes))
        for name, fn, nbytes in variants:
            p50, p99, pipe = time_steps(fn, args.iters)
            print(f"| {name:28} | {n:>8} | {p50:9.1f} | {p99:9.1f} | {pipe:9.1f} | {nbytes / (p50 * 1e-6) / 1e9:8.0f} | bytes counted {nbytes / 1e6:.0f} MB", flush=True)
        del ke, ve, k, v
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
