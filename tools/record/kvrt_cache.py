#!/usr/bin/env python3
"""A Hugging Face transformers decoder whose global attention layers decode through libkvrt.

KvrtAttention is an attention function (behind the transformers attention name 'kvrt') for the
model's full-attention layers (renumbered 0..n-1 as kvrt layers):
  - the prompt runs ordinary SDPA (exact; kvrt has no prefill attention) once, shared by the
    full-cache reference and every kvrt configuration; the post-rotary q, k, v of the kvrt layers
    are kept (PromptCapture) and handed to kvrt_prefill at a configuration's first decode call
    (so a chunked prompt reaches kvrt as one prompt, and the attention-aware index sees every query);
  - after the prompt, each new token i: kvrt_append(k_i, v_i) then kvrt_attend(q_i) -> out
    [q_heads, head_dim] f32, i.e. sinks + window + retrieved cold tokens, merged by log-sum-exp
    inside libkvrt. A teacher-forced chunk of n tokens is appended and attended token by token,
    so token i sees exactly what it would see in single-token decoding.
Sliding-window layers keep transformers' own cache and SDPA (their window is 512 tokens).
Batch size 1. With --device cpu: CPU tensors, libkvrt's host backend and host pointers. With
--device cuda: the model runs on the GPU, libkvrt's GPU backend (use_gpu = 1) keeps sinks + window
in device memory, and q/k/v/out are device pointers ordered on torch's current stream
(kvrt_*_ex with KVRT_MEMORY_DEVICE): no host copy of k/v/out in Python.

libkvrt is reached through the kvrt Python package (python/, `pip install ./python`): kvrt.Runtime
and kvrt.Sequence, torch tensors passed by DLPack without a copy, device tensors on torch's
current stream.

Compare with the full cache, teacher-forced so that every step is comparable. The full cache
generates --gen greedy tokens (one forward per step); each kvrt configuration is then fed those
tokens, and agreement = share of steps where kvrt's argmax equals the full cache's greedy token;
perplexity of the fed tokens under both. A second stream feeds both the text's real continuation
(perplexity over real text). The reference can be cached in a file (--ref) for later invocations:
  python tools/record/kvrt_cache.py --text traces/text/genesis.txt --tokens 8192 --gen 512 \
      --config exact --config flat:100 --config flat:1000 --config attention-aware:1000 \
      --ref traces/ref_genesis_8k_512.pt --json traces/kvrt_genesis_8k_512.json
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import kvrt
from record import at_least

INDEX = kvrt.index_kinds()
DTYPE = ("f32", "f16", "bf16")


def head_dim(cfg):
    return getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads


def attention_scale(model):
    """Softmax scale: the attention modules' own `scaling` (what transformers passes the attention
    function: Granite's attention_multiplier, Gemma's query_pre_attn_scalar ** -0.5), else
    query_pre_attn_scalar ** -0.5, else head_dim ** -0.5. (From the config alone, Granite's 0.5
    read as head_dim ** -0.5: exact mode agreed on 12 of 16 greedy tokens.)"""
    for m in model.modules():
        if "attention" in type(m).__name__.lower() and getattr(m, "scaling", None) is not None:
            return float(m.scaling)
    cfg = model.config
    return float((getattr(cfg, "query_pre_attn_scalar", None) or head_dim(cfg)) ** -0.5)


def _sdpa(module, query, key, value, attention_mask, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


class Router:
    """The function registered as transformers attention 'kvrt'; forwards every call to `target`
    (PromptCapture for the shared prompt pass, _sdpa for full-cache passes, a KvrtAttention)."""

    def __init__(self):
        self.target = _sdpa

    def __call__(self, *args, **kwargs):
        return self.target(*args, **kwargs)


class PromptCapture:
    """Ordinary SDPA for every layer (the full cache's own prompt pass); keeps the post-rotary q, k,
    v of the kvrt layers' prompt chunks so that every kvrt configuration can kvrt_prefill them."""

    def __init__(self, layer_map, tdt):
        self.layer_map, self.tdt = layer_map, tdt
        self.buf = {kl: {"q": [], "k": [], "v": []} for kl in layer_map.values()}

    def __call__(self, module, query, key, value, attention_mask, **kwargs):
        out = _sdpa(module, query, key, value, attention_mask, **kwargs)
        kl = self.layer_map.get(getattr(module, "layer_idx", None))
        if kl is not None:
            n = query.shape[2]
            b = self.buf[kl]
            b["q"].append(query[0].transpose(0, 1).to(self.tdt).contiguous())  # [n, Hq, d]
            b["k"].append(key[0, :, -n:].transpose(0, 1).to(self.tdt).contiguous())  # [n, Hkv, d]
            b["v"].append(value[0, :, -n:].transpose(0, 1).to(self.tdt).contiguous())
        return out

    def tensors(self):
        import torch
        return {kl: tuple(torch.cat(b[x], 0).contiguous() for x in ("q", "k", "v"))
                for kl, b in self.buf.items()}


class KvrtAttention:
    """Decode through libkvrt for the model's global layers. One sequence (batch 1).

    `prompt` ({kvrt layer: (q, k, v)}, from PromptCapture) is handed to kvrt_prefill at the first
    call of each sequence; every later call (one token, or a teacher-forced chunk of n tokens) runs,
    token by token, kvrt_append(k_i, v_i) then kvrt_attend(q_i): token i sees the prompt and tokens
    <= i, exactly as n single-token decode steps would. Other layers run SDPA."""

    def __init__(self, model, layers, prompt, index="flat", top_k=100, sinks=4,
                 window=512, effort=0, threads=1, dtype="f32", streaming_heads=(),
                 device="cpu", group_search=0, extra=None):
        import torch
        cfg = model.config
        self.torch = torch
        self.prompt = prompt
        self.layer_map = {src: i for i, src in enumerate(layers)}
        self.tdt = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}[dtype]
        self.on_gpu = str(device).startswith("cuda")
        fields = dict(
            num_layers=len(layers), num_q_heads=cfg.num_attention_heads,
            num_kv_heads=cfg.num_key_value_heads, head_dim=head_dim(cfg), dtype=dtype,
            scale=attention_scale(model), sink_tokens=sinks, window_tokens=window, top_k=top_k,
            index_kind=index, search_effort=effort, worker_threads=threads,
            group_search=group_search, use_gpu=1 if self.on_gpu else 0)
        fields.update(extra or {})  # --kvrt FIELD=VALUE wins
        self.rt = kvrt.Runtime(**fields)
        for (l, h) in streaming_heads:
            self.rt.set_head_policy(l, h, "streaming")
        self.seq = None
        self.t_prefill = self.t_attend = 0.0  # seconds in kvrt_prefill / kvrt_append+kvrt_attend
        self.attends = 0
        self.new_sequence()

    def new_sequence(self):
        if self.seq is not None:
            self.seq.release()
        self.seq = self.rt.sequence()
        self.prefilled = set()

    def close(self):
        self.rt.close()

    def _sync(self):
        """Device work is asynchronous: time it to completion."""
        if self.on_gpu:
            self.torch.cuda.current_stream().synchronize()

    def __call__(self, module, query, key, value, attention_mask, **kwargs):
        torch = self.torch
        kl = self.layer_map.get(getattr(module, "layer_idx", None))
        if kl is None:
            return _sdpa(module, query, key, value, attention_mask, **kwargs)
        if kl not in self.prefilled:
            q, k, v = self.prompt[kl]
            t0 = time.perf_counter()
            self.seq.prefill(kl, q, k, v)  # device tensors: on torch's current stream
            self._sync()
            self.t_prefill += time.perf_counter() - t0
            self.prefilled.add(kl)
        n = query.shape[2]
        ks = key[0, :, -n:].transpose(0, 1).to(self.tdt).contiguous()  # [n, Hkv, d]
        vs = value[0, :, -n:].transpose(0, 1).to(self.tdt).contiguous()
        qs = query[0].transpose(0, 1).to(self.tdt).contiguous()  # [n, Hq, d]
        out = torch.empty(qs.shape, dtype=torch.float32, device=qs.device)
        self._sync()
        t0 = time.perf_counter()
        for i in range(n):
            self.seq.append(kl, ks[i:i + 1], vs[i:i + 1])
            self.seq.attend(kl, qs[i], out=out[i])
        self._sync()
        self.t_attend += time.perf_counter() - t0
        self.attends += n
        return out.to(query.dtype).unsqueeze(0), None  # [B, q_len, Hq, d]


def _forward_kw(model):
    import inspect
    params = inspect.signature(model.forward).parameters
    return ("cache" if "cache" in params else "past_key_values"), ("logits_to_keep" in params)


def prefill(model, ids, chunk):
    """The prompt pass, in chunks through a fresh DynamicCache. Returns (cache, last logits)."""
    import torch
    from transformers import DynamicCache
    cache_kw, has_ltk = _forward_kw(model)
    cache = DynamicCache(config=model.config)
    T = ids.shape[1]
    dev = model.device
    for s in range(0, T, chunk):
        x = ids[:, s:s + chunk].to(dev)
        kw = {cache_kw: cache,
              "position_ids": torch.arange(s, s + x.shape[1], device=dev).unsqueeze(0),
              "use_cache": True}
        if has_ltk:
            kw["logits_to_keep"] = 1
        with torch.inference_mode():
            logits = model(input_ids=x, **kw).logits[0, -1].float()
    return cache, logits


def greedy(model, cache, T, logits0, gen):
    """`gen` greedy steps, one token per forward, from the state after the prompt. Returns
    (tokens, log-prob of each chosen token)."""
    import torch
    cache_kw, has_ltk = _forward_kw(model)
    dev = model.device
    logits = logits0
    toks, logp = [], []
    for s in range(gen):
        a = int(torch.argmax(logits))
        toks.append(a)
        logp.append(float(torch.log_softmax(logits, -1)[a]))
        if s == gen - 1:
            break
        kw = {cache_kw: cache, "position_ids": torch.tensor([[T + s]], device=dev),
              "use_cache": True}
        if has_ltk:
            kw["logits_to_keep"] = 1
        with torch.inference_mode():
            logits = model(input_ids=torch.tensor([[a]], device=dev), **kw).logits[0, -1].float()
    return toks, logp


def forced(model, cache, T, logits0, toks, batch):
    """Teacher forcing on `toks` from the state after the prompt: step s predicts toks[s] (step 0
    from the prompt pass's last logits), and toks[:-1] are fed `batch` tokens per forward.
    Returns per step: argmax, log-prob of toks[s], top-1 minus top-2 log-prob (the argmax margin)."""
    import torch
    cache_kw, has_ltk = _forward_kw(model)
    dev = model.device
    argmax, logp, margin = [], [], []

    def take(logits, targets):
        lsm = torch.log_softmax(logits.float(), -1)
        top2 = torch.topk(lsm, 2, dim=-1)
        argmax.extend(top2.indices[:, 0].tolist())
        margin.extend((top2.values[:, 0] - top2.values[:, 1]).tolist())
        logp.extend(lsm[torch.arange(len(targets), device=lsm.device),
                        torch.tensor(targets, device=lsm.device)].tolist())

    take(logits0.unsqueeze(0), toks[:1])
    feed = toks[:-1]
    for s in range(0, len(feed), batch):
        x = feed[s:s + batch]
        kw = {cache_kw: cache,
              "position_ids": torch.arange(T + s, T + s + len(x), device=dev).unsqueeze(0),
              "use_cache": True}
        if has_ltk:
            kw["logits_to_keep"] = 0  # 0 = every position
        with torch.inference_mode():
            logits = model(input_ids=torch.tensor([x], device=dev), **kw).logits[0]
        take(logits, toks[s + 1:s + 1 + len(x)])
    return argmax, logp, margin


def ppl(logp):
    return math.exp(-sum(logp) / len(logp))


def parse_config(spec):
    """INDEX[:TOP_K[:EFFORT[:STREAMING_THRESHOLD]]] -> dict."""
    parts = spec.split(":")
    bad = argparse.ArgumentTypeError(
        f"bad configuration {spec!r}: INDEX[:TOP_K[:EFFORT[:STREAMING_THRESHOLD]]] with INDEX one "
        f"of {', '.join(INDEX)}, integers TOP_K >= 1 and EFFORT >= 0, 0 < THRESHOLD <= 1")
    if parts[0] not in INDEX or len(parts) > 4:
        raise bad
    try:
        cf = {"spec": spec, "index": parts[0],
              "top_k": int(parts[1]) if len(parts) > 1 and parts[1] else 100,
              "effort": int(parts[2]) if len(parts) > 2 and parts[2] else 0,
              "streaming_threshold": float(parts[3]) if len(parts) > 3 and parts[3] else 0.0}
    except ValueError:
        raise bad from None
    if cf["top_k"] < 1 or cf["effort"] < 0 or not 0 <= cf["streaming_threshold"] <= 1:
        raise bad
    return cf


def tier_mass(prompt, scale, sinks, window, count=16):
    """{(kvrt layer, q head): share of exact attention mass in sinks + window}, averaged over the
    prompt's last `count` queries: the calibration `kvrt replay --streaming-threshold` uses."""
    import torch
    share = {}
    for kl, (q, k, _) in prompt.items():
        T, Hq, d = q.shape
        group = Hq // k.shape[1]
        for p in range(max(0, T - count), T):
            s = scale * torch.einsum("hd,thd->ht", q[p].float(),
                                     k[: p + 1].float().repeat_interleave(group, dim=1))
            w = torch.softmax(s, dim=-1)
            idx = torch.arange(p + 1, device=w.device)
            tier = w[:, (idx < sinks) | (idx > p - window)].sum(-1)
            for h in range(Hq):
                share[(kl, h)] = share.get((kl, h), 0.0) + float(tier[h]) / min(count, T)
    return share


def load_ref(path, prompt_ids, text_ids, gen, label, log):
    import torch
    if not path or not Path(path).exists():
        return None
    ref = torch.load(path, weights_only=False)
    if (ref.get("model") != label or ref.get("prompt_ids") != prompt_ids or ref.get("gen") != gen
            or ref.get("text_ids") != text_ids):
        log(f"reference {path} is for another model/prompt/length: recomputing it")
        return None
    log(f"reference loaded from {path} (made {ref.get('made')})")
    return ref


def main(argv=None):
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="One invocation runs the prompt pass once (it is exact SDPA for the full cache and "
               "for every kvrt configuration alike), the full-cache reference once (or loads it "
               "from --ref), then every --config against it. Per configuration two teacher-forced "
               "streams: 'greedy' (fed the full cache's greedy tokens; agreement = share of steps "
               "where kvrt's argmax equals the full cache's greedy token) and 'text' (fed the "
               "text's real continuation; perplexity over real text).")
    ap.add_argument("--model", default="gemma3-270m", help="models.py name or path")
    ap.add_argument("--text", nargs="+", required=True, help="text file(s), concatenated")
    ap.add_argument("--tokens", type=at_least(1), default=2048, help="prompt length in tokens")
    ap.add_argument("--gen", type=at_least(1), default=64,
                    help="steps per stream: greedy tokens generated by the full cache, and real "
                         "text tokens scored for perplexity")
    ap.add_argument("--chunk", type=int, default=2048, help="prompt tokens per forward")
    ap.add_argument("--batch", type=int, default=128,
                    help="teacher-forced tokens per forward after the prompt (kvrt layers still "
                         "append+attend them one at a time); 1 = one forward per step")
    ap.add_argument("--lib", default=None,
                    help="ignored (kept for old command lines): libkvrt comes with the kvrt "
                         "package (pip install ./python)")
    ap.add_argument("--config", dest="configs", action="append", type=parse_config, default=[],
                    metavar="INDEX[:TOP_K[:EFFORT[:STREAMING_THRESHOLD]]]",
                    help="a kvrt configuration to compare, e.g. flat:100, attention-aware:1000, "
                         "exact, attention-aware:100::0.9 (heads whose prompt-calibrated mass in "
                         "sinks + window is >= 0.9 served from the GPU tier alone, as kvrt replay "
                         "--streaming-threshold); repeatable; run in the order given. Without "
                         "any, one configuration from --index/--top-k/--effort")
    ap.add_argument("--kvrt", action="append", default=[], metavar="FIELD=VALUE",
                    help="a kvrt.Config field for every configuration, e.g. cluster_rescore=4 "
                         "(repeatable)")
    ap.add_argument("--index", default="flat", choices=list(INDEX),
                    help="index kind when no --config is given")
    ap.add_argument("--top-k", type=int, default=100, help="top-k when no --config is given")
    ap.add_argument("--effort", type=int, default=0, help="search effort when no --config is given")
    ap.add_argument("--sinks", type=int, default=4, help="kvrt sink tokens")
    ap.add_argument("--window", type=int, default=512, help="kvrt window tokens")
    ap.add_argument("--dtype", default="f32", choices=list(DTYPE), help="kvrt storage dtype")
    ap.add_argument("--threads", type=int, default=2, help="torch threads and kvrt worker threads")
    ap.add_argument("--group-search", type=int, default=0, choices=[0, 1],
                    help="config.group_search: one index search per kv head for its q heads")
    ap.add_argument("--device", default="cpu",
                    help="cpu | cuda: where the model runs; cuda also selects libkvrt's GPU backend "
                         "(use_gpu = 1, device pointers on torch's stream)")
    ap.add_argument("--teacher", default="both", choices=["greedy", "text", "both"],
                    help="which teacher-forced streams to run per configuration (default both)")
    ap.add_argument("--ref", metavar="FILE",
                    help="cache of the full-cache reference (torch.save): loaded when it matches "
                         "the model, prompt, continuation and --gen, else computed and written")
    ap.add_argument("--json", metavar="FILE",
                    help="write the results (rewritten after every configuration)")
    args = ap.parse_args(argv)
    extra = {}
    for kv in args.kvrt:
        field, sep, value = kv.partition("=")
        if not sep:
            ap.error(f"--kvrt {kv!r}: expected FIELD=VALUE")
        for conv in (int, float, str):
            try:
                extra[field] = conv(value)
                break
            except ValueError:
                continue
    configs = args.configs or [{"spec": f"{args.index}:{args.top_k}:{args.effort}",
                                "index": args.index, "top_k": args.top_k, "effort": args.effort,
                                "streaming_threshold": 0.0}]
    streams = ["greedy", "text"] if args.teacher == "both" else [args.teacher]

    import copy
    import json
    import torch
    torch.set_num_threads(args.threads)
    import models
    from record import parse_layers, read_text
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    log = lambda *a: print(*a, file=sys.stderr, flush=True)
    t_start = time.time()
    model, tok, label = models.load(args.model, log=log)
    model.to(args.device)
    gpu_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else None
    layers, _ = parse_layers("global", model.config)
    if not layers:
        raise SystemExit(f"{label}: every layer attends a sliding window; kvrt serves the "
                         "full-attention layers, and this model has none")
    all_ids = tok(read_text(args.text), return_tensors="pt").input_ids
    if all_ids.shape[1] < args.tokens:
        # The prompt was cut to the text silently (record.py stops), and a stream then failed.
        raise SystemExit(f"the text has only {all_ids.shape[1]} tokens, --tokens {args.tokens} "
                         "asked")
    ids = all_ids[:, : args.tokens]
    T = ids.shape[1]
    text_ids = [int(x) for x in all_ids[0, T: T + args.gen]]
    if "text" in streams and len(text_ids) < args.gen:
        raise SystemExit("text too short for the text stream")
    if args.lib:
        log(f"--lib {args.lib} ignored: using the kvrt package's libkvrt ({kvrt.__file__})")
    log(f"libkvrt {kvrt.library_version()} (kvrt package); kvrt layers {layers}; "
        f"device {args.device}{f' ({gpu_name})' if gpu_name else ''}")

    router = Router()
    AttentionInterface.register("kvrt", router)
    AttentionMaskInterface.register("kvrt", sdpa_mask)
    model.set_attn_implementation("kvrt")

    tdt = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    capture = PromptCapture({src: i for i, src in enumerate(layers)}, tdt)
    router.target = capture
    t0 = time.time()
    cache0, logits0 = prefill(model, ids, args.chunk)
    t_prompt = time.time() - t0
    prompt = capture.tensors()
    del capture
    log(f"prompt pass {T} tokens {t_prompt:.0f}s (shared by the reference and every configuration)")

    prompt_ids = [int(x) for x in ids[0]]
    ref = load_ref(args.ref, prompt_ids, text_ids, args.gen, label, log)
    router.target = _sdpa
    if ref is None:
        ref = {"model": label, "prompt_ids": prompt_ids, "text_ids": text_ids, "gen": args.gen,
               "made": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "times": {}}
        t0 = time.time()
        ref["greedy_tokens"], ref["greedy_logp_seq"] = greedy(model, copy.deepcopy(cache0), T,
                                                              logits0, args.gen)
        ref["times"]["greedy_seq"] = time.time() - t0
        log(f"full cache: {args.gen} greedy steps (one forward each) "
            f"{ref['times']['greedy_seq']:.0f}s: {tok.decode(ref['greedy_tokens'])!r}")
        for st, toks in (("greedy", ref["greedy_tokens"]), ("text", text_ids)):
            t0 = time.time()
            ref[st] = forced(model, copy.deepcopy(cache0), T, logits0, toks, args.batch)
            ref["times"][st] = time.time() - t0
            log(f"full cache, teacher-forced {st}: {ref['times'][st]:.0f}s, "
                f"perplexity {ppl(ref[st][1]):.4f}")
        if args.ref:
            torch.save(ref, args.ref)
            log(f"reference written to {args.ref}")
    g_tok = ref["greedy_tokens"]
    # Noise floor: the full cache re-run teacher-forced (batched) against its own greedy run.
    floor = sum(a == b for a, b in zip(ref["greedy"][0], g_tok))
    log(f"full cache batched vs one-step argmax: {floor}/{len(g_tok)} agree")

    results = {"model": label, "prompt_tokens": T, "gen": args.gen, "text": args.text,
               "libkvrt": kvrt.library_version(), "threads": args.threads,
               "device": args.device, "gpu": gpu_name, "torch": torch.__version__,
               "transformers": __import__("transformers").__version__,
               "sinks": args.sinks, "window": args.window, "dtype": args.dtype, "batch": args.batch,
               "group_search": args.group_search, "kvrt": extra,
               "kvrt_layers": layers, "prompt_pass_s": t_prompt, "reference_made": ref["made"],
               "reference_times_s": ref["times"], "full_batched_vs_step_agree": floor,
               "full_ppl_greedy": ppl(ref["greedy"][1]), "full_ppl_greedy_step":
               ppl(ref["greedy_logp_seq"]), "full_ppl_text": ppl(ref["text"][1]),
               "greedy_text": tok.decode(g_tok), "configs": []}

    def dump():
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=1) + "\n")

    dump()
    shares = None
    for cf in configs:
        streaming = []
        if cf["streaming_threshold"] > 0:
            if shares is None:
                shares = tier_mass(prompt, attention_scale(model), args.sinks, args.window)
            streaming = sorted(lh for lh, m in shares.items() if m >= cf["streaming_threshold"])
        att = KvrtAttention(model, layers, prompt, cf["index"], cf["top_k"], args.sinks,
                            args.window, cf["effort"], args.threads, args.dtype,
                            streaming_heads=streaming, device=args.device,
                            group_search=args.group_search, extra=extra)
        router.target = att
        r = dict(cf)
        r["streaming_heads"] = [list(lh) for lh in streaming]
        if streaming:
            log(f"  streaming heads (sinks + window only): {len(streaming)} of {len(shares)}")
        log(f"kvrt {cf['spec']} (index {cf['index']}, top-k {cf['top_k']}, effort {cf['effort']}, "
            f"sinks {args.sinks}, window {args.window}):")
        for st in streams:
            toks = g_tok if st == "greedy" else text_ids
            att.new_sequence()
            att.t_prefill = att.t_attend = 0.0
            att.attends = 0
            t0 = time.time()
            st0 = att.rt.stats()
            am, lp, _ = forced(model, copy.deepcopy(cache0), T, logits0, toks, args.batch)
            wall = time.time() - t0
            ds = att.rt.stats() - st0
            # Cold tokens attended per q head and attend, and their share of the cold tokens
            # those heads could reach: the budget the comparison with flat top-k is made at.
            heads = max(ds.attend_calls, 1) * model.config.num_attention_heads
            cold_per = ds.cold_tokens_attended / heads
            cold_share = ds.cold_tokens_attended / max(ds.cold_keys_searchable, 1)
            full_am, full_lp, full_margin = ref[st]
            target = g_tok if st == "greedy" else full_am
            agree = [i for i, (a, b) in enumerate(zip(am, target)) if a == b]
            miss = [i for i in range(len(am)) if am[i] != target[i]]
            p_full, p_kv = ppl(full_lp), ppl(lp)
            r[st] = {"agree": len(agree), "steps": len(am), "disagree_steps": miss,
                     "full_margin_at_disagree": [full_margin[i] for i in miss],
                     "ppl_full": p_full, "ppl_kvrt": p_kv, "ppl_rel": p_kv / p_full - 1,
                     "wall_s": wall, "kvrt_prefill_s": att.t_prefill,
                     "kvrt_attend_s": att.t_attend, "attends": att.attends,
                     "cold_attended_per_head_step": cold_per, "cold_attended_share": cold_share}
            log(f"  {st}: agreement {len(agree)}/{len(am)}, perplexity full {p_full:.4f} kvrt "
                f"{p_kv:.4f} ({(p_kv / p_full - 1) * 100:+.2f}%), {wall:.0f}s (kvrt_prefill "
                f"{att.t_prefill:.1f}s, append+attend {att.t_attend:.1f}s for {att.attends}; cold "
                f"tokens attended per head-step {cold_per:.0f} = {cold_share:.1%} of the cold)")
        att.close()
        results["configs"].append(r)
        dump()

    print(f"model {label} on {args.device}, prompt {T} tokens, {args.gen} steps per stream, "
          f"sinks {args.sinks}, "
          f"window {args.window}, dtype {args.dtype}, kvrt layers {layers}, "
          f"libkvrt {results['libkvrt']}, {args.threads} threads")
    print(f"prompt pass {t_prompt:.0f}s; full cache batched vs one-step greedy argmax "
          f"{floor}/{len(g_tok)}; full-cache perplexity: greedy tokens "
          f"{results['full_ppl_greedy']:.4f}, text {results['full_ppl_text']:.4f}")
    print("config                    | greedy agree | ppl greedy full/kvrt (rel) | text agree | "
          "ppl text full/kvrt (rel) | cold attended per head-step (share) | wall s")
    for r in results["configs"]:
        cells = [f"{r['spec']:<25}"]
        for st in ("greedy", "text"):
            if st in r:
                x = r[st]
                cells.append(f"{x['agree']}/{x['steps']}")
                cells.append(f"{x['ppl_full']:.4f}/{x['ppl_kvrt']:.4f} ({x['ppl_rel'] * 100:+.2f}%)")
            else:
                cells += ["-", "-"]
        x = r[streams[-1]]
        cells.append(f"{x['cold_attended_per_head_step']:.0f} ({x['cold_attended_share']:.1%})"
                     if "cold_attended_share" in x else "-")
        cells.append("+".join(f"{r[st]['wall_s']:.0f}" for st in streams))
        print(" | ".join(cells))
    print(f"full greedy: {results['greedy_text']!r}")
    log(f"total {time.time() - t_start:.0f}s")


if __name__ == "__main__":
    main()
