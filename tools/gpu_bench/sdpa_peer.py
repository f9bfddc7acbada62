#!/usr/bin/env python3
"""All-GPU peer for gpu_bench: PyTorch scaled_dot_product_attention for one decode query over a
full on-GPU KV cache, 8B shape (32 q / 8 kv heads, d=128, bf16), per layer-step.

Two variants: GQA expanded (K/V repeated to 32 heads beforehand, only SDPA timed) and
enable_gqa=True (PyTorch >= 2.5). Times with CUDA events, p50/p99 over --iters steps after
warm-up, and a pipelined mean (back-to-back steps between one event pair).

Usage: python3 sdpa_peer.py [--iters 200] [--tokens 131072 1048576]
"""
import argparse
import statistics

import torch
import torch.nn.functional as F


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


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--iters", type=int, default=200)
    ap.add_argument("--tokens", type=int, nargs="+", default=[131072, 1048576])
    args = ap.parse_args()
    hq, hkv, d = 32, 8, 128
    dev = torch.device("cuda")
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name(0)}")
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
        variants.append(("sdpa GQA expanded", lambda: F.scaled_dot_product_attention(q, ke, ve), 4 * kv_bytes))
        for name, fn, nbytes in variants:
            p50, p99, pipe = time_steps(fn, args.iters)
            print(f"| {name:28} | {n:>8} | {p50:9.1f} | {p99:9.1f} | {pipe:9.1f} | {nbytes / (p50 * 1e-6) / 1e9:8.0f} | bytes counted {nbytes / 1e6:.0f} MB", flush=True)
        del ke, ve, k, v
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
