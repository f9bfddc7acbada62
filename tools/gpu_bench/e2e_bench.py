#!/usr/bin/env python3
"""End to end through the kvrt Python package (issue 15 item 4): a Llama-3-8B-shaped transformers
model with random weights, three KV caches in one run.

The model: LlamaForCausalLM, hidden 4096, 32 q / 8 kv heads, head_dim 128, intermediate 14336,
vocab 32000, rope theta 500000, max_position_embeddings 1M, --layers decoder layers (default 4),
bf16, random weights initialised on the device, batch 1, SDPA attention. The caches:

  dynamic    transformers' DynamicCache, every layer's K/V resident on the GPU
  offloaded  transformers' offloaded cache (DynamicCache(offloading=True) in transformers 5.x,
             OffloadedCache before; the approach of hf_offload_peer.py): K/V in host memory, the
             current layer (and the next, prefetched) brought to the GPU
  kvrt       kvrt.hf.enable(model, index_kind="cluster"): the global layers on kvrt, GPU backend
             with device tensors when the model is on CUDA, kvrt's defaults otherwise

For each context of --contexts (a random prompt of that many tokens) and each cache:
  ttft       time to first token: the prompt's forward (kvrt's prefill and index build
             included) and the argmax of the first token, synchronised; with --prefill-chunk
             the prompt's forwards of that many tokens, and kvrt prefills at the first decode
             token instead (its time is then in decode_ms_first)
  decode     tokens/s over --new-tokens greedy steps after the first token (one forward per
             token, each synchronised by reading its argmax)
  p50 ms/tok the median of the decode tokens' times (each forward synchronised); the JSON also
             holds the first decode token's and the slowest one's (one-time work shows there)
  peak GPU   torch.cuda.max_memory_allocated over the prompt and the decode (weights included;
             kvrt's own device buffers are cudaMalloc'd outside torch's allocator and are
             reported apart: kvrt_gpu_bytes, from kvrt's statistics)
  kv GPU     device bytes held after the prompt above what was allocated before it (the
             weights, the prompt's ids): torch's allocated bytes (the K/V the cache keeps on the
             GPU) plus kvrt's own device buffers
and the same figures per decoder layer (divided by --layers). A (cache, context) that runs out
of memory is reported as "out of memory" and the run goes on.

Output: a table on stdout, one JSON line per (cache, context) to --json (written as each finishes).

  python3 tools/gpu_bench/e2e_bench.py --layers 4 --contexts 32768,131072 --json out/e2e.jsonl
  python3 tools/gpu_bench/e2e_bench.py --device cpu --tiny          (a smoke test without a GPU)

--family gpt-oss: GptOssForCausalLM with gpt-oss-20b's attention (hidden 2880, 64 q / 8 kv heads,
head_dim 64, learned attention sinks, sliding window 128 on every other layer) and MoE (32
experts, 4 per token, intermediate 2880), random weights. Its attention has no SDPA form in
transformers (eager materialises [heads, n, keys] scores: 64 x 128K^2 does not fit), so the
DynamicCache and offloaded peers run kvrt.hf's SDPA attention with sinks (tested against the
model's eager attention), the same as kvrt's layers use for the prompt and the sliding layers.

--family deepseek-v2-lite: DeepseekV2ForCausalLM with DeepSeek-V2-Lite's multi-head latent
attention (hidden 2048, 16 heads, kv_lora_rank 512, qk_nope 128 + qk_rope 64, v_head_dim 128) and
a smaller MoE (8 routed experts, 2 per token, 2 shared, moe_intermediate 1408; the first layer
dense, intermediate 10944), random weights. kvrt holds it as its latent by default (kvrt.hf's
mla="latent": one 576-wide kv head, the host backend); `--caches kvrt,kvrt-b --kvrt-b
mla=expanded` measures the per-head form (16 heads of 192, the GPU backend) in the same run.
"""
from __future__ import annotations

import argparse
import gc
import inspect
import json
import os
import statistics
import sys
import time
import traceback
import types

CACHES = ("dynamic", "offloaded", "kvrt", "kvrt-b")
DEFAULT_CACHES = ("dynamic", "offloaded", "kvrt")


def is_kvrt(kind: str) -> bool:
    """kvrt, or kvrt-b: kvrt with --kvrt-b's options on top (an A/B in one process)."""
    return kind in ("kvrt", "kvrt-b")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=None,
                    help="decoder layers N (default 4; 2 with --tiny)")
    ap.add_argument("--contexts", default=None,
                    help="prompt lengths, comma-separated (default 32768,131072; 512 with --tiny)")
    ap.add_argument("--new-tokens", type=int, default=32,
                    help="decode steps M timed after the first token (greedy)")
    ap.add_argument("--caches", default=",".join(DEFAULT_CACHES),
                    help="caches to run, comma-separated (each context runs them in the "
                         f"order {', '.join(CACHES)}; default {','.join(DEFAULT_CACHES)}; "
                         "kvrt-b: kvrt with the --kvrt-b options on top of --kvrt)")
    ap.add_argument("--device", default="cuda", help="cuda[:N] or cpu (cpu: a smoke test)")
    ap.add_argument("--tiny", action="store_true",
                    help="a tiny shape for smoke tests: hidden 256, 4 q / 2 kv heads, head_dim "
                         "64, intermediate 512, vocab 1000, 2 layers, context 512, kvrt window 64")
    ap.add_argument("--vocab", type=int, default=None, help="vocabulary size (default 32000)")
    ap.add_argument("--family", choices=("llama", "gpt-oss", "deepseek-v2-lite"), default="llama",
                    help="the model: Llama-3-8B's shape (default), gpt-oss-20b's or "
                         "DeepSeek-V2-Lite's attention (below)")
    ap.add_argument("--index", default="cluster", help="kvrt index kind")
    ap.add_argument("--kvrt", action="append", default=[], metavar="FIELD=VALUE",
                    help="another kvrt.Config field for the kvrt cache (repeatable), e.g. "
                         "--kvrt window_tokens=2048 --kvrt hot_cache_fraction=0")
    ap.add_argument("--kvrt-b", action="append", default=[], metavar="FIELD=VALUE",
                    help="kvrt_config fields of the kvrt-b cache, on top of --kvrt (repeatable), "
                         "e.g. --kvrt-b cluster_group_select=0")
    ap.add_argument("--kvrt-b-prompt-queries", choices=("sampled", "all"), default="sampled",
                    help="the prompt queries kvrt.hf hands the kvrt-b cache's prefill: sampled "
                         "(the rows kvrt reads, kvrt_prefill_query_rows; since 0.3.29) or all "
                         "(every row copied to kvrt's side and checked, kvrt samples them: "
                         "0.3.28's data flow, the same index)")
    ap.add_argument("--rounds", type=int, default=1,
                    help="measure every (context, cache) this many times, rounds outermost, so "
                         "that caches alternate (default 1)")
    ap.add_argument("--warmup-tokens", type=int, default=None,
                    help="a short untimed run of each cache first (CUDA kernels, cuBLAS, kvrt's "
                         "module and pools); 0 skips it (default 4096; 256 with --tiny)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the weights and prompts")
    ap.add_argument("--prefill-chunk", type=int, default=0, metavar="N",
                    help="the prompt in forwards of N tokens (0: one forward), for prompts whose "
                         "activations do not fit one forward; kvrt then uses "
                         "kvrt.hf.enable(chunked_prompt=True): the prompt's K/V stay on the GPU "
                         "until the first decode token")
    ap.add_argument("--sdpa-cudnn", choices=("on", "off"), default="on",
                    help="PyTorch's cuDNN backend of scaled_dot_product_attention (on: torch's "
                         "default). On the H200 with torch 2.11 it plans each new KV length on "
                         "the host, ~10 ms per layer and decode token for the caches whose "
                         "attention is SDPA's (DynamicCache, offloaded); off leaves them flash or "
                         "memory-efficient attention")
    ap.add_argument("--profile", action="store_true",
                    help="profile the prompt, the first decode token and a steady one (the "
                         "fifth) with torch.profiler (CPU and CUDA) and print their top operators "
                         "to stderr (the timings include the profiler's cost); for kvrt also the "
                         "change of its time counters over the first token")
    ap.add_argument("--profile-dir", default=None,
                    help="with --profile: also write each profiled span's timeline there as a "
                         "Chrome trace with Python calls (CACHE-CONTEXT-SPAN.json; chrome://tracing, "
                         "Perfetto, or tools/gpu_bench/trace_gaps.py for the device's idle gaps)")
    ap.add_argument("--json", default=None, help="write one JSON line per (cache, context) here")
    args = ap.parse_args(argv)
    args.layers = args.layers or (2 if args.tiny else 4)
    args.contexts = [int(x) for x in (args.contexts or ("512" if args.tiny else "32768,131072"))
                     .split(",") if x.strip()]
    args.caches = [c.strip() for c in args.caches.split(",") if c.strip()]
    for c in args.caches:
        if c not in CACHES:
            ap.error(f"--caches: unknown cache {c!r} (one of {', '.join(CACHES)})")
    if args.warmup_tokens is None:
        args.warmup_tokens = 256 if args.tiny else 4096
    args.vocab = args.vocab or (1000 if args.tiny else 32000)
    if args.rounds < 1:
        ap.error("--rounds: at least 1")

    def options(flag, items):
        opts = {}
        for kv in items:
            k, sep, v = kv.partition("=")
            if not sep:
                ap.error(f"{flag} {kv!r}: expected FIELD=VALUE")
            opts[k.strip()] = _number(v.strip())
        return opts

    args.kvrt_options = options("--kvrt", args.kvrt)
    args.kvrt_b_options = options("--kvrt-b", args.kvrt_b)
    return args


def _number(s: str):
    for conv in (int, float):
        try:
            return conv(s)
        except ValueError:
            pass
    return s


def model_config(args):
    if args.family == "deepseek-v2-lite":
        from transformers import DeepseekV2Config
        shape = (dict(hidden_size=256, intermediate_size=512, num_attention_heads=4,
                      kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32,
                      moe_intermediate_size=64)
                 if args.tiny else
                 dict(hidden_size=2048, intermediate_size=10944, num_attention_heads=16,
                      kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64,
                      v_head_dim=128, moe_intermediate_size=1408))
        return DeepseekV2Config(vocab_size=args.vocab, num_hidden_layers=args.layers,
                                num_key_value_heads=shape["num_attention_heads"],
                                q_lora_rank=None, n_routed_experts=8, num_experts_per_tok=2,
                                n_shared_experts=2, first_k_dense_replace=1,
                                max_position_embeddings=1 << 20, tie_word_embeddings=False,
                                **shape)
    if args.family == "gpt-oss":
        from transformers import GptOssConfig
        shape = (dict(hidden_size=256, intermediate_size=256, num_attention_heads=8,
                      num_key_value_heads=2, head_dim=64, num_local_experts=4)
                 if args.tiny else
                 dict(hidden_size=2880, intermediate_size=2880, num_attention_heads=64,
                      num_key_value_heads=8, head_dim=64, num_local_experts=32))
        return GptOssConfig(vocab_size=args.vocab, num_hidden_layers=args.layers,
                            num_experts_per_tok=4, sliding_window=128,
                            max_position_embeddings=1 << 20, tie_word_embeddings=False, **shape)
    from transformers import LlamaConfig
    if args.tiny:
        shape = dict(hidden_size=256, intermediate_size=512, num_attention_heads=4,
                     num_key_value_heads=2, head_dim=64)
    else:
        shape = dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
                     num_key_value_heads=8, head_dim=128)
    cfg = LlamaConfig(vocab_size=args.vocab, num_hidden_layers=args.layers,
                      max_position_embeddings=1 << 20, rope_theta=500000.0,
                      tie_word_embeddings=False, **shape)
    # transformers 5.x keeps rope settings in rope_parameters (rope_theta given above is moved
    # there by the versions that know it; set it there too for those that might not).
    rp = getattr(cfg, "rope_parameters", None)
    if isinstance(rp, dict) and rp.get("rope_theta") != 500000.0:
        rp["rope_theta"] = 500000.0
    return cfg


def build_model(args, device):
    import torch
    from transformers import AutoModelForCausalLM
    cfg = model_config(args)
    torch.manual_seed(args.seed)
    # Random weights made directly on the device, in bf16 (no 8B-shaped init on the CPU).
    # gpt-oss has no SDPA in transformers: eager until make_cache picks the attention.
    attn = "eager" if args.family == "gpt-oss" else "sdpa"
    with torch.device(device):
        try:
            model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16,
                                                     attn_implementation=attn)
        except TypeError:  # transformers before "dtype" (4.x): torch_dtype
            model = AutoModelForCausalLM.from_config(cfg, torch_dtype=torch.bfloat16,
                                                     attn_implementation=attn)
    return model.to(device=device, dtype=torch.bfloat16).eval()


def offloaded_cache(config):
    """This transformers version's offloaded cache and its name (as hf_offload_peer.py)."""
    import transformers
    from transformers import cache_utils
    dyn = cache_utils.DynamicCache
    if "offloading" in inspect.signature(dyn.__init__).parameters:
        return (dyn(config=config, offloading=True),
                f"DynamicCache(offloading=True), transformers {transformers.__version__}")
    if hasattr(cache_utils, "OffloadedCache"):
        return (cache_utils.OffloadedCache(),
                f"OffloadedCache, transformers {transformers.__version__}")
    raise RuntimeError(f"transformers {transformers.__version__} has no offloaded cache")


def make_cache(kind, model, args):
    """(cache, description) with the model switched to the attention the cache needs."""
    from transformers import DynamicCache
    if is_kvrt(kind):
        import kvrt
        import kvrt.hf
        opts = dict(index_kind=args.index)
        if args.tiny:
            opts.update(window_tokens=64, sink_tokens=4)
        opts.update(args.kvrt_options)
        if kind == "kvrt-b":
            opts.update(args.kvrt_b_options)
        cache = kvrt.hf.enable(model, chunked_prompt=args.prefill_chunk > 0, **opts)
        if kind == "kvrt-b" and args.kvrt_b_prompt_queries == "all":
            cache._query_sample = types.MethodType(_every_prompt_query, cache)
        return cache, (f"kvrt {kvrt.__version__} (libkvrt {kvrt.library_version()}): "
                       f"{cache.runtime!r}")
    model.set_attn_implementation(peer_attention() if args.family == "gpt-oss" else "sdpa")
    if kind == "dynamic":
        return (DynamicCache(config=model.config),
                "DynamicCache (transformers), on the model's device")
    return offloaded_cache(model.config)


def _every_prompt_query(cache, q, keep):
    """KvrtCache._query_sample as 0.3.28 had it: every real prompt query of each batch row on
    kvrt's side (kvrt samples the rows it reads from them: the same index)."""
    if keep is None or bool(keep.all()):
        rows = cache._rows(q)
        return [rows[b] for b in range(q.shape[0])]
    return [cache._rows(q[b:b + 1].index_select(2, keep[b].nonzero().squeeze(1).to(q.device)))[0]
            for b in range(q.shape[0])]


def peer_attention() -> str:
    """The peers' attention for a model with learned sinks: kvrt.hf's SDPA with the sink as a
    first key (and its mask builder, which leaves plain causal masks out), registered once."""
    import kvrt.hf
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface
    name = "peer_sink_attention"  # not "sdpa...": transformers checks such names against the model
    AttentionInterface.register(name, kvrt.hf._sdpa)
    AttentionMaskInterface.register(name, kvrt.hf.mask)
    return name


def cache_kwarg(model) -> str:
    """The forward's cache argument: "cache" (transformers 5.x) or "past_key_values" (as
    kvrt.hf.cache_kwarg, without importing kvrt)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def is_oom(e: BaseException) -> bool:
    import torch
    if isinstance(e, torch.cuda.OutOfMemoryError):
        return True
    try:
        import kvrt
        if isinstance(e, kvrt.OutOfMemoryError):
            return True
    except ImportError:
        pass
    return "out of memory" in str(e).lower()


def run_one(kind, model, args, tokens, new_tokens, device, on_cuda):
    """Prompt + decode with one cache; returns a dict of figures (raises on failure)."""
    import torch
    sync = torch.cuda.synchronize if on_cuda else (lambda: None)
    res = {}
    cache = None
    try:
        gen = torch.Generator(device="cpu").manual_seed(args.seed + tokens)
        ids = torch.randint(0, args.vocab, (1, tokens), generator=gen).to(device)
        cache, name = make_cache(kind, model, args)
        res["cache_name"] = name
        kw = cache_kwarg(model)
        sync()
        if on_cuda:
            torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated() if on_cuda else 0
        with torch.inference_mode():
            prof = _profiler(on_cuda, bool(args.profile_dir)) if args.profile else None
            if prof is not None:
                prof.__enter__()
            t0 = time.perf_counter()
            step = args.prefill_chunk if args.prefill_chunk > 0 else tokens
            for a in range(0, tokens, step):  # the prompt in one forward, or in chunks
                b = min(tokens, a + step)
                pos = torch.arange(a, b, device=device).unsqueeze(0)
                logits = model(ids[:, a:b], **{kw: cache}, position_ids=pos, use_cache=True,
                               logits_to_keep=1).logits[0, -1]
            tok = int(torch.argmax(logits))  # synchronises the device
            sync()
            ttft = time.perf_counter() - t0
            if prof is not None:
                prof.__exit__(None, None, None)
                res["profile_prompt"] = _profile_table(prof, on_cuda)
                _export_trace(prof, args, kind, tokens, "prompt")
            del logits
            kvrt_gpu = 0
            if is_kvrt(kind):
                kvrt_gpu = cache.stats().gpu_allocated_bytes
            kv_torch = (torch.cuda.memory_allocated() - base) if on_cuda else None
            t1 = time.perf_counter()
            token_s = []  # each token's forward, synchronised by reading its argmax
            # kvrt's calls' share of each token (kvrt.hf's wall time inside the library): a slow
            # stretch of tokens is then either in kvrt's calls or in the model around them.
            kvrt_token_s = []
            before = cache.stats() if is_kvrt(kind) else None
            before_s = cache.time_decode_s if is_kvrt(kind) else 0.0
            ru0 = _rusage()
            for s in range(new_tokens):
                prof = (_profiler(on_cuda, bool(args.profile_dir))
                        if args.profile and s in (0, 4) else None)
                ts = time.perf_counter()
                kvrt_ts = cache.time_decode_s if is_kvrt(kind) else 0.0
                if prof is not None:
                    prof.__enter__()
                x = torch.tensor([[tok]], device=device)
                pos = torch.tensor([[tokens + s]], device=device)
                logits = model(x, **{kw: cache}, position_ids=pos, use_cache=True,
                               logits_to_keep=1).logits[0, -1]
                tok = int(torch.argmax(logits))
                if prof is not None:
                    prof.__exit__(None, None, None)
                    res[f"profile_token{s}"] = _profile_table(prof, on_cuda)
                    _export_trace(prof, args, kind, tokens, f"token{s}")
                token_s.append(time.perf_counter() - ts)
                if is_kvrt(kind):
                    kvrt_token_s.append(cache.time_decode_s - kvrt_ts)
                if before is not None and s == 0:
                    delta = (cache.stats() - before).as_dict()
                    res["kvrt_first_token"] = {k: v for k, v in delta.items()
                                               if k.startswith("time_") or k == "attend_calls"}
                    # Wall time of kvrt.hf's calls into kvrt over the token (its layers' decode).
                    res["kvrt_first_token"]["kvrt_calls_ns"] = int(
                        (cache.time_decode_s - before_s) * 1e9)
            sync()
            decode_s = time.perf_counter() - t1
            # What the process did meanwhile (a slow round is either the host's or the device's):
            # CPU seconds, page faults, context switches; and its transparent huge pages (the
            # device reads kvrt's host stores over PCIe).
            ru1 = _rusage()
            res["decode_rusage"] = {k: round(ru1[k] - ru0[k], 4) for k in ru0}
            res["anon_huge_mib"] = _anon_huge_mib()
            res["decode_ms_tokens"] = [round(t * 1e3, 3) for t in token_s]
            if kvrt_token_s:
                res["kvrt_ms_tokens"] = [round(t * 1e3, 3) for t in kvrt_token_s]
        res.update(ttft_s=ttft, decode_s=decode_s)
        if token_s:
            # The first decode token apart: a cache may pay one-time work there (kvrt registers
            # its host stores for the direct step); the median shows the steady state.
            res["decode_ms_first"] = token_s[0] * 1e3
            res["decode_ms_p50"] = statistics.median(token_s) * 1e3
            res["decode_ms_max"] = max(token_s) * 1e3
        if on_cuda:
            res["peak_gpu_bytes"] = torch.cuda.max_memory_allocated()
            res["kv_gpu_bytes"] = kv_torch + kvrt_gpu
        if is_kvrt(kind):
            st = cache.stats()
            res["kvrt_gpu_bytes"] = max(kvrt_gpu, st.gpu_allocated_bytes)
            if on_cuda:  # kvrt's own device buffers are not in torch's figures
                res["peak_gpu_bytes_with_kvrt"] = res["peak_gpu_bytes"] + res["kvrt_gpu_bytes"]
            res["kvrt_stats"] = {k: getattr(st, k) for k in (
                "gpu_tokens", "host_tokens", "gpu_bytes", "host_bytes", "index_bytes",
                "gpu_allocated_bytes", "summary_gpu_bytes", "hot_cache_gpu_bytes", "attend_calls",
                "cold_tokens_attended", "cold_keys_searchable", "hot_hits", "hot_misses",
                "hot_h2d_bytes", "attends_direct", "direct_host_bytes", "time_hot_cache_ns",
                "time_background_wait_ns")}
            res["kvrt_stats"]["mean_attend_us"] = round(st.mean_attend_us, 1)
            res["kvrt_time_prefill_s"] = cache.time_prefill_s
            res["kvrt_time_decode_s"] = cache.time_decode_s
            res["kvrt_config"] = cache.runtime.config.to_dict()
        return res
    finally:
        if is_kvrt(kind) and cache is not None:
            cache.close()
        del cache


def _rusage():
    import resource
    r = resource.getrusage(resource.RUSAGE_SELF)
    return {"cpu_s": r.ru_utime + r.ru_stime, "minflt": r.ru_minflt, "majflt": r.ru_majflt,
            "nvcsw": r.ru_nvcsw, "nivcsw": r.ru_nivcsw}


def _anon_huge_mib():
    try:
        with open("/proc/self/smaps_rollup") as f:
            for line in f:
                if line.startswith("AnonHugePages:"):
                    return int(line.split()[1]) // 1024
    except OSError:
        pass
    return None


def _profiler(on_cuda, stacks=False):
    from torch.profiler import ProfilerActivity, profile
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_cuda else [])
    # with_stack records Python calls too (a timeline's host side; it costs host time).
    return profile(activities=acts, with_stack=stacks)


def _export_trace(prof, args, kind, tokens, span) -> None:
    if args.profile_dir:
        os.makedirs(args.profile_dir, exist_ok=True)
        prof.export_chrome_trace(os.path.join(args.profile_dir, f"{kind}-{tokens}-{span}.json"))


def _profile_table(prof, on_cuda) -> str:
    """The operators of one profiled token, by their own CPU time and (on CUDA) device time."""
    ka = prof.key_averages()
    text = ka.table(sort_by="self_cpu_time_total", row_limit=18)
    if on_cuda:
        text += "\n" + ka.table(sort_by="self_cuda_time_total", row_limit=12)
    return text


def _gib(n):
    return "-" if n is None else f"{n / 2**30:.2f}"


HEADER = (f"| {'cache':9} | {'context':>8} | {'TTFT s':>8} | {'TTFT ms/layer':>13} | "
          f"{'decode tok/s':>12} | {'ms/tok/layer':>12} | {'p50 ms/tok':>10} | {'peak GiB':>8} | "
          f"{'peak GiB/layer':>14} | {'KV GPU GiB/layer':>16} | {'PCIe MB/ls':>10} | status")


def derive(rec, layers, new_tokens):
    """Adds the derived figures (rates, per-layer values) to a finished record."""
    if rec["status"] != "ok":
        return
    rec["ttft_ms_per_layer"] = rec["ttft_s"] * 1e3 / layers
    if new_tokens:
        rec["decode_tokens_per_s"] = new_tokens / rec["decode_s"]
        rec["decode_ms_per_token"] = rec["decode_s"] * 1e3 / new_tokens
        rec["decode_ms_per_token_per_layer"] = rec["decode_ms_per_token"] / layers
    if rec.get("peak_gpu_bytes") is not None:
        # The table's peak: torch's, plus kvrt's own device buffers for the kvrt cache.
        peak = rec.get("peak_gpu_bytes_with_kvrt", rec["peak_gpu_bytes"])
        rec["peak_gpu_bytes_table"] = peak
        rec["peak_gpu_bytes_per_layer"] = peak / layers
        rec["kv_gpu_bytes_per_layer"] = rec["kv_gpu_bytes"] / layers
    st = rec.get("kvrt_stats")
    if st and st.get("attend_calls"):
        # Host-to-device traffic of a decode layer-step: rows read from the host store by the
        # direct step plus the hot cache's page fills.
        rec["host_mb_per_layer_step"] = (st.get("direct_host_bytes", 0) +
                                         st.get("hot_h2d_bytes", 0)) / st["attend_calls"] / 1e6


def table_line(rec):
    ok = rec["status"] == "ok"

    def f(key, fmt):
        v = rec.get(key)
        return fmt.format(v) if ok and v is not None else "-"

    def g(key):
        return _gib(rec.get(key)) if ok else "-"

    return (f"| {rec['cache']:9} | {rec['context']:>8} | {f('ttft_s', '{:.3f}'):>8} | "
            f"{f('ttft_ms_per_layer', '{:.1f}'):>13} | {f('decode_tokens_per_s', '{:.2f}'):>12} | "
            f"{f('decode_ms_per_token_per_layer', '{:.3f}'):>12} | {f('decode_ms_p50', '{:.2f}'):>10} | "
            f"{g('peak_gpu_bytes_table'):>8} | {g('peak_gpu_bytes_per_layer'):>14} | "
            f"{g('kv_gpu_bytes_per_layer'):>16} | {f('host_mb_per_layer_step', '{:.1f}'):>10} | "
            f"{rec['status'][:80]}")


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch
    import transformers

    device = torch.device(args.device)
    on_cuda = device.type == "cuda"
    if on_cuda and not torch.cuda.is_available():
        print("e2e_bench: no CUDA device (use --device cpu --tiny for a smoke test)",
              file=sys.stderr)
        return 2
    if on_cuda:
        if device.index is None:  # "cuda": the current device, by index (set_device needs one)
            device = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(device)
        torch.backends.cuda.enable_cudnn_sdp(args.sdpa_cudnn == "on")
    gpu = torch.cuda.get_device_name(device) if on_cuda else "cpu"
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, {gpu}; "
          f"python {sys.version.split()[0]}; SDPA's cuDNN backend {args.sdpa_cudnn}", flush=True)
    caches = list(args.caches)
    if "offloaded" in caches and not on_cuda:
        print("e2e_bench: offloaded cache skipped: transformers' offloading moves K/V between a "
              "CUDA device and the host (it needs --device cuda)", file=sys.stderr)
        caches.remove("offloaded")
    if any(is_kvrt(k) for k in caches):
        try:
            import kvrt
            import kvrt.hf  # noqa: F401
            print(f"kvrt {kvrt.__version__} from {kvrt.__file__}, libkvrt "
                  f"{kvrt.library_version()}, index kinds {kvrt.index_kinds()}", flush=True)
        except ImportError as e:
            print(f"e2e_bench: kvrt cache skipped: cannot import kvrt ({e})", file=sys.stderr)
            caches = [k for k in caches if not is_kvrt(k)]

    t0 = time.perf_counter()
    model = build_model(args, device)
    if on_cuda:
        torch.cuda.synchronize()
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    c = model.config
    # MLA: q/k of qk_nope + qk_rope (its config's head_dim is the rope part), v of v_head_dim.
    dims = (f"{c.qk_nope_head_dim + c.qk_rope_head_dim} (v {c.v_head_dim}, latent "
            f"{c.kv_lora_rank} + {c.qk_rope_head_dim})" if getattr(c, "kv_lora_rank", None)
            else f"{c.head_dim}")
    print(f"model: {type(model).__name__}, {args.layers} layers, hidden {c.hidden_size}, heads "
          f"{c.num_attention_heads}/{c.num_key_value_heads}x{dims}, intermediate "
          f"{c.intermediate_size}, vocab {c.vocab_size}, bf16, random weights "
          f"{weights / 2**30:.2f} GiB, built in {time.perf_counter() - t0:.1f} s", flush=True)

    if args.warmup_tokens > 0:
        for kind in caches:
            t1 = time.perf_counter()
            try:
                run_one(kind, model, args, args.warmup_tokens, 2, device, on_cuda)
                print(f"warm-up {kind}: {args.warmup_tokens} tokens, "
                      f"{time.perf_counter() - t1:.1f} s", flush=True)
            except Exception as e:  # reported again by the measured runs
                print(f"warm-up {kind}: failed: {type(e).__name__}: {e}", file=sys.stderr)
            gc.collect()
            if on_cuda:
                torch.cuda.empty_cache()

    jf = open(args.json, "w") if args.json else None
    hdr = HEADER
    rows = [hdr, "|" + "|".join("-" * (len(p)) for p in hdr.split("|")[1:-1]) + "|---"]
    print(hdr, flush=True)
    for round_ in range(1, args.rounds + 1):
        for tokens in args.contexts:
            for kind in CACHES:
                if kind not in args.caches:
                    continue
                rec = dict(cache=kind, round=round_, context=tokens, layers=args.layers,
                           new_tokens=args.new_tokens,
                           sdpa_cudnn=args.sdpa_cudnn, prefill_chunk=args.prefill_chunk,
                           batch=1, dtype="bf16", device=gpu, torch=torch.__version__,
                           transformers=transformers.__version__, weights_bytes=weights)
                if kind not in caches:
                    rec["status"] = ("skipped: needs a CUDA device" if kind == "offloaded"
                                     else "skipped: kvrt not importable")
                else:
                    try:
                        rec.update(run_one(kind, model, args, tokens, args.new_tokens, device,
                                           on_cuda))
                        rec["status"] = "ok"
                    except Exception as e:  # the traceback (and the forward's tensors) go with e
                        if is_oom(e):
                            rec["status"] = "out of memory"
                        else:
                            first = (str(e).splitlines() or [""])[0]
                            rec["status"] = f"error: {type(e).__name__}: {first}"
                            traceback.print_exc()
                        rec["error"] = f"{type(e).__name__}: {str(e)[:500]}"
                    gc.collect()
                    if on_cuda:
                        torch.cuda.empty_cache()
                derive(rec, args.layers, args.new_tokens)
                line = table_line(rec)
                rows.append(line)
                print(line, flush=True)
                for key in sorted(k for k in rec if k.startswith("profile_")):
                    print(f"--- {kind} {tokens}: {key} ---\n{rec[key]}", file=sys.stderr,
                          flush=True)
                if "kvrt_first_token" in rec:
                    print(f"--- {kind} {tokens}: first decode token, kvrt counters (ns): "
                          f"{json.dumps(rec['kvrt_first_token'])}", file=sys.stderr, flush=True)
                if jf:
                    jf.write(json.dumps(rec) + "\n")
                    jf.flush()
    if jf:
        jf.close()
    print("\nsummary (markdown):")
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
