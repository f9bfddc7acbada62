#!/usr/bin/env python3
"""Peer for `kvrt bench decode`: Hugging Face transformers' offloaded KV cache, per layer-step.

The cache holds every layer's K/V in host memory and keeps only the layer being computed (and the
next one, prefetched) on the GPU. One decode step of an L-layer model: for each layer, append the
new token's K/V through `cache.update` (which brings the layer's whole cache to the GPU and starts
the next layer's prefetch) and run SDPA over it. Reported: wall time per layer-step (the step
over all layers / L, synchronised at the end of each step), p50 and p99 over --steps steps.
8B shape: 32 q / 8 kv heads, d=128, bf16, batch 1.

Usage: python3 hf_offload_peer.py [--tokens 32768 131072] [--layers 4] [--steps 10]
"""
import argparse
import inspect
import statistics
import time

import torch
import torch.nn.functional as F


def make_cache():
    """The offloaded cache this transformers version offers, and its name."""
    import transformers
    from transformers import cache_utils

    dyn = cache_utils.DynamicCache
    if "offloading" in inspect.signature(dyn.__init__).parameters:
        return dyn(offloading=True), f"DynamicCache(offloading=True), transformers {transformers.__version__}"
    if hasattr(cache_utils, "OffloadedCache"):
        return cache_utils.OffloadedCache(), f"OffloadedCache, transformers {transformers.__version__}"
    raise RuntimeError(f"transformers {transformers.__version__} has no offloaded cache")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, nargs="+", default=[32768, 131072], help="cached tokens per layer")
    ap.add_argument("--layers", type=int, default=4, help="layers (the cache offloads all but the current)")
    ap.add_argument("--steps", type=int, default=10, help="measured decode steps (after 2 warm-up steps)")
    args = ap.parse_args()
    hq, hkv, d = 32, 8, 128
    dev = torch.device("cuda")
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name(0)}")
    print(f"| {'what':28} | {'tokens':>8} | {'layers':>6} | {'p50 us':>10} | {'p99 us':>10} | {'GB/s p50':>8} | cache")
    for n in args.tokens:
        torch.manual_seed(0)
        cache, name = make_cache()
        # Prefill: each layer's whole cache goes through update(), as a model's prefill does.
        for layer in range(args.layers):
            k = torch.randn(1, hkv, n, d, device=dev, dtype=torch.bfloat16)
            v = torch.randn(1, hkv, n, d, device=dev, dtype=torch.bfloat16)
            cache.update(k, v, layer)
            del k, v
        torch.cuda.synchronize()
        q = torch.randn(1, hq, 1, d, device=dev, dtype=torch.bfloat16)
        k1 = torch.randn(1, hkv, 1, d, device=dev, dtype=torch.bfloat16)
        v1 = torch.randn(1, hkv, 1, d, device=dev, dtype=torch.bfloat16)
        per_layer = []
        for step in range(args.steps + 2):
            t0 = time.perf_counter()
            for layer in range(args.layers):
                k, v = cache.update(k1, v1, layer)
                F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
            torch.cuda.synchronize()
            if step >= 2:
                per_layer.append((time.perf_counter() - t0) * 1e6 / args.layers)
        per_layer.sort()
        p50 = statistics.median(per_layer)
        p99 = per_layer[min(len(per_layer) - 1, int(len(per_layer) * 0.99 + 0.999) - 1)]
        layer_bytes = 2 * hkv * (n + args.steps + 2) * d * 2
        print(f"| {'hf offloaded cache + sdpa':28} | {n:>8} | {args.layers:>6} | {p50:10.1f} | {p99:10.1f} | "
              f"{layer_bytes / (p50 * 1e-6) / 1e9:8.1f} | {name}", flush=True)
        del cache
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
