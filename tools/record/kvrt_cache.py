#!/usr/bin/env python3
"""A Hugging Face transformers decoder whose global attention layers decode through libkvrt.

KvrtAttention is an attention function registered with transformers' AttentionInterface. For the
model's full-attention layers (renumbered 0..n-1 as kvrt layers) it
  - prefill (q_len > 1): runs ordinary SDPA (exact; kvrt has no prefill attention) and buffers the
    post-rotary q, k, v; they are handed to kvrt_prefill at the first decode step (so a chunked
    prefill still reaches kvrt as one prompt and the attention-aware index sees every query);
  - decode (q_len == 1): kvrt_append(k, v) then kvrt_attend(q) -> out [q_heads, head_dim] f32,
    i.e. sinks + window + retrieved cold tokens, merged by log-sum-exp inside libkvrt.
Sliding-window layers keep transformers' own cache and SDPA (their window is 512 tokens).
Batch size 1, CPU tensors (host memory API).

The C structs mirror api/include/kvrt.h (kvrt_config as of API 0.2; fields are only appended, and
kvrt_config_default returns the struct by value, so this mirror must follow the header).

Compare with the full cache (teacher-forced on the full cache's greedy tokens, so every step is
comparable): token agreement (kvrt's argmax == full cache's argmax) and the perplexity of the
generated tokens under both:
  python tools/record/kvrt_cache.py --text traces/text/genesis.txt --tokens 2048 --gen 64 \
      --index flat --top-k 100 --lib build/api/libkvrt.so
"""

from __future__ import annotations

import argparse
import ctypes as C
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

INDEX = {"exact": 0, "flat": 1, "ivf": 2, "hnsw": 3, "landmark": 4, "attention-aware": 5}
DTYPE = {"f32": 0, "f16": 1, "bf16": 2}


class KvrtConfig(C.Structure):
    _fields_ = [
        ("num_layers", C.c_int32), ("num_q_heads", C.c_int32), ("num_kv_heads", C.c_int32),
        ("head_dim", C.c_int32), ("dtype", C.c_int), ("scale", C.c_float),
        ("sink_tokens", C.c_int32), ("window_tokens", C.c_int32), ("top_k", C.c_int32),
        ("index_kind", C.c_int), ("search_effort", C.c_int32), ("worker_threads", C.c_int32),
        ("record_attended", C.c_int32), ("use_gpu", C.c_int32),
        ("host_memory_limit", C.c_int64), ("gpu_memory_limit", C.c_int64),
        ("check_finite", C.c_int32),
        # 0.2
        ("group_search", C.c_int32), ("cold_attention", C.c_int),
    ]


class KvrtLib:
    def __init__(self, path):
        self.lib = L = C.CDLL(str(path))
        L.kvrt_config_default.restype = KvrtConfig
        L.kvrt_config_default.argtypes = []
        L.kvrt_runtime_create.argtypes = [C.POINTER(KvrtConfig), C.POINTER(C.c_void_p)]
        L.kvrt_runtime_destroy.argtypes = [C.c_void_p]
        L.kvrt_runtime_destroy.restype = None
        L.kvrt_seq_create.argtypes = [C.c_void_p, C.POINTER(C.c_int64)]
        L.kvrt_seq_release.argtypes = [C.c_void_p, C.c_int64]
        L.kvrt_prefill.argtypes = [C.c_void_p, C.c_int64, C.c_int32, C.c_void_p, C.c_void_p,
                                   C.c_void_p, C.c_int64]
        L.kvrt_append.argtypes = [C.c_void_p, C.c_int64, C.c_int32, C.c_void_p, C.c_void_p,
                                  C.c_int64]
        L.kvrt_attend.argtypes = [C.c_void_p, C.c_int64, C.c_int32, C.c_void_p,
                                  C.POINTER(C.c_float)]
        if hasattr(L, "kvrt_set_head_policy"):
            L.kvrt_set_head_policy.argtypes = [C.c_void_p, C.c_int32, C.c_int32, C.c_int]
            L.kvrt_set_head_policy.restype = C.c_int
        L.kvrt_last_error.restype = C.c_char_p
        L.kvrt_status_string.restype = C.c_char_p
        L.kvrt_status_string.argtypes = [C.c_int]
        L.kvrt_version.restype = C.c_char_p
        for f in ("kvrt_runtime_create", "kvrt_seq_create", "kvrt_seq_release", "kvrt_prefill",
                  "kvrt_append", "kvrt_attend"):
            getattr(L, f).restype = C.c_int

    def check(self, st, what):
        if st != 0:
            raise RuntimeError(f"{what}: {self.lib.kvrt_status_string(st).decode()}: "
                               f"{(self.lib.kvrt_last_error() or b'').decode()}")


class KvrtAttention:
    """Registered as transformers attention 'kvrt'. One sequence (batch 1)."""

    def __init__(self, lib: KvrtLib, model, layers, index="flat", top_k=100, sinks=4,
                 window=512, effort=0, threads=1, dtype="f32", streaming_heads=()):
        import torch
        cfg = model.config
        self.lib = lib
        self.torch = torch
        self.layer_map = {src: i for i, src in enumerate(layers)}
        self.tdt = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}[dtype]
        c = lib.lib.kvrt_config_default()
        c.num_layers = len(layers)
        c.num_q_heads = cfg.num_attention_heads
        c.num_kv_heads = cfg.num_key_value_heads
        c.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        c.dtype = DTYPE[dtype]
        scal = getattr(cfg, "query_pre_attn_scalar", None)
        c.scale = float(scal ** -0.5) if scal else 0.0
        c.sink_tokens, c.window_tokens, c.top_k = sinks, window, top_k
        c.index_kind = INDEX[index]
        c.search_effort, c.worker_threads = effort, threads
        c.use_gpu = 0
        self.cfg = c
        rt = C.c_void_p()
        lib.check(lib.lib.kvrt_runtime_create(C.byref(c), C.byref(rt)), "kvrt_runtime_create")
        self.rt = rt
        for (l, h) in streaming_heads:
            lib.check(lib.lib.kvrt_set_head_policy(rt, l, h, 1), "kvrt_set_head_policy")
        self.seq = None
        self.new_sequence()

    def new_sequence(self):
        if self.seq is not None:
            self.lib.check(self.lib.lib.kvrt_seq_release(self.rt, self.seq), "kvrt_seq_release")
        s = C.c_int64()
        self.lib.check(self.lib.lib.kvrt_seq_create(self.rt, C.byref(s)), "kvrt_seq_create")
        self.seq = s.value
        self.pending = {l: {"q": [], "k": [], "v": []} for l in self.layer_map.values()}
        self.prefilled = set()

    def close(self):
        if self.rt:
            self.lib.lib.kvrt_runtime_destroy(self.rt)
            self.rt = None

    def _ptr(self, t):
        return C.c_void_p(t.data_ptr())

    def __call__(self, module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                 **kwargs):
        torch = self.torch
        from transformers.integrations.sdpa_attention import sdpa_attention_forward
        li = getattr(module, "layer_idx", None)
        kl = self.layer_map.get(li)
        n = query.shape[2]
        if kl is None or n > 1:
            out, w = sdpa_attention_forward(module, query, key, value, attention_mask,
                                            scaling=scaling, dropout=dropout, **kwargs)
            if kl is not None:  # prompt chunk of a kvrt layer: keep it for kvrt_prefill
                if kl in self.prefilled:
                    raise RuntimeError("multi-token append after prefill is not supported")
                p = self.pending[kl]
                p["q"].append(query[0].transpose(0, 1).to(self.tdt).contiguous())
                p["k"].append(key[0, :, -n:].transpose(0, 1).to(self.tdt).contiguous())
                p["v"].append(value[0, :, -n:].transpose(0, 1).to(self.tdt).contiguous())
            return out, w
        L = self.lib.lib
        if kl not in self.prefilled:
            p = self.pending[kl]
            q, k, v = (torch.cat(p[x], 0).contiguous() for x in ("q", "k", "v"))
            self.lib.check(L.kvrt_prefill(self.rt, self.seq, kl, self._ptr(q), self._ptr(k),
                                          self._ptr(v), k.shape[0]), "kvrt_prefill")
            self.pending[kl] = None
            self.prefilled.add(kl)
        k1 = key[0, :, -1:].transpose(0, 1).to(self.tdt).contiguous()  # [1, Hkv, d]
        v1 = value[0, :, -1:].transpose(0, 1).to(self.tdt).contiguous()
        q1 = query[0, :, 0].to(self.tdt).contiguous()  # [Hq, d]
        self.lib.check(L.kvrt_append(self.rt, self.seq, kl, self._ptr(k1), self._ptr(v1), 1),
                       "kvrt_append")
        out = torch.empty(q1.shape, dtype=torch.float32)
        self.lib.check(L.kvrt_attend(self.rt, self.seq, kl, self._ptr(q1),
                                     C.cast(out.data_ptr(), C.POINTER(C.c_float))), "kvrt_attend")
        return out.to(query.dtype).view(1, 1, *out.shape), None  # [B, q_len, Hq, d]


def run(model, ids, gen, chunk, forced=None, log=print):
    """Prefill ids in chunks, then `gen` greedy steps (or teacher-forced on `forced`).
    Returns (argmax tokens per step, log-prob of the fed token per step)."""
    import inspect
    import torch
    from transformers import DynamicCache
    params = inspect.signature(model.forward).parameters
    cache_kw = "cache" if "cache" in params else "past_key_values"
    cache = DynamicCache(config=model.config)

    def step(x, start):
        pos = torch.arange(start, start + x.shape[1]).unsqueeze(0)
        kw = {cache_kw: cache, "position_ids": pos, "use_cache": True}
        if "logits_to_keep" in params:
            kw["logits_to_keep"] = 1
        with torch.inference_mode():
            return model(input_ids=x, **kw).logits[0, -1].float()

    T = ids.shape[1]
    t0 = time.time()
    for s in range(0, T, chunk):
        logits = step(ids[:, s:s + chunk], s)
    log(f"  prefill {T} tokens {time.time() - t0:.0f}s")
    argmax, logp = [], []
    t1 = time.time()
    for s in range(gen):
        a = int(torch.argmax(logits))
        argmax.append(a)
        fed = a if forced is None else forced[s]
        logp.append(float(torch.log_softmax(logits, -1)[fed]))
        logits = step(torch.tensor([[fed]]), T + s)
    log(f"  decode {gen} steps {time.time() - t1:.0f}s")
    return argmax, logp


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="gemma3-270m")
    ap.add_argument("--text", nargs="+", required=True)
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--gen", type=int, default=64)
    ap.add_argument("--chunk", type=int, default=2048)
    ap.add_argument("--lib", default="build/api/libkvrt.so")
    ap.add_argument("--index", default="flat", choices=list(INDEX))
    ap.add_argument("--top-k", type=int, default=100)
    ap.add_argument("--sinks", type=int, default=4)
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--effort", type=int, default=0)
    ap.add_argument("--dtype", default="f32", choices=list(DTYPE))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--teacher", default="greedy", choices=["greedy", "text"],
                    help="greedy: both runs are fed the full cache's greedy tokens; text: both are "
                         "fed the text's own continuation (perplexity over real text)")
    args = ap.parse_args(argv)

    import torch
    torch.set_num_threads(args.threads)
    import models
    from record import parse_layers, read_text
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    log = lambda *a: print(*a, file=sys.stderr, flush=True)
    model, tok, label = models.load(args.model, log=log)
    layers, _ = parse_layers("global", model.config)
    all_ids = tok(read_text(args.text), return_tensors="pt").input_ids
    ids = all_ids[:, : args.tokens]
    forced = None
    if args.teacher == "text":
        forced = [int(x) for x in all_ids[0, args.tokens: args.tokens + args.gen]]
        if len(forced) < args.gen:
            raise SystemExit("text too short for --teacher text")

    log("full cache (sdpa):")
    model.set_attn_implementation("sdpa")
    ref_tok, ref_lp = run(model, ids, args.gen, args.chunk, forced=forced, log=log)

    lib = KvrtLib(args.lib)
    log(f"libkvrt {lib.lib.kvrt_version().decode()} from {args.lib}")
    att = KvrtAttention(lib, model, layers, args.index, args.top_k, args.sinks, args.window,
                        args.effort, args.threads, args.dtype)
    AttentionInterface.register("kvrt", att)
    AttentionMaskInterface.register("kvrt", sdpa_mask)
    model.set_attn_implementation("kvrt")
    log(f"kvrt ({args.index}, top-k {args.top_k}, sinks {args.sinks}, window {args.window}) on "
        f"layers {layers}, teacher-forced ({args.teacher}):")
    kv_tok, kv_lp = run(model, ids, args.gen, args.chunk,
                        forced=ref_tok if forced is None else forced, log=log)
    att.close()

    agree = sum(a == b for a, b in zip(ref_tok, kv_tok)) / len(ref_tok)
    ppl_ref = math.exp(-sum(ref_lp) / len(ref_lp))
    ppl_kv = math.exp(-sum(kv_lp) / len(kv_lp))
    print(f"model {label}, prompt {ids.shape[1]} tokens, {args.gen} steps, index {args.index}, "
          f"top-k {args.top_k}, sinks {args.sinks}, window {args.window}, dtype {args.dtype}, "
          f"layers {layers} on kvrt")
    print(f"token agreement {agree:.4f} ({sum(a == b for a, b in zip(ref_tok, kv_tok))}/"
          f"{len(ref_tok)}); perplexity of the fed tokens ({args.teacher}): full {ppl_ref:.4f}, kvrt "
          f"{ppl_kv:.4f} ({(ppl_kv / ppl_ref - 1) * 100:+.2f}%)")
    print(f"full: {tok.decode(ref_tok)!r}")


if __name__ == "__main__":
    main()
