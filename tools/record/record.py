#!/usr/bin/env python3
"""Record a kvrt trace from a real decoder over real long text.

Runs a small open-weight model (tools/record/models.py) through Hugging Face transformers on the
CPU, captures the post-rotary query, key and value states of the chosen attention layers for the
prompt and for N greedy decode steps, and writes them as a kvrt trace (safetensors; the format is
in docs/traces.md).

Capture: a custom attention function is registered with transformers' AttentionInterface (and the
sdpa mask builder under the same name). The model calls it with query states after q_norm and
apply_rotary_pos_emb and with key/value states after the cache update and before repeat_kv; the
function stores the new rows and then runs the ordinary SDPA attention, so the model computes
exactly what it computes without the hook.

Layout written, per recorded layer L (renumbered 0..n-1; original indices in "source_layers"):
  L.prefill.q [T, q_heads, d]   L.prefill.k [T, kv_heads, d]   L.prefill.v [T, kv_heads, d]
  L.decode.q  [S, q_heads, d]   L.decode.k  [S, kv_heads, d]   L.decode.v  [S, kv_heads, d]
  L.decode.o  [S, q_heads, d]   f32: the model's own attention output at each decode step
                                (before o_proj), a check that scale/masking are understood.
  tokens.prompt [T] i32, tokens.decode [S] i32: the token ids (decode step s feeds token s).
Decode step s is position T + s: the token the model chose greedily after position T + s - 1.
Its k/v are appended and then its q attends to positions 0 .. T + s.

Example:
  python tools/record/record.py --model gemma3-270m --text /usr/share/info/standards.info.gz \
      --tokens 8192 --steps 64 -o traces/gemma3_standards_8k.safetensors
"""

from __future__ import annotations

import argparse
import gzip
import inspect
import json
import os
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def at_least(lo: int):
    """An argparse type: an integer >= lo (also kvrt_cache.py's)."""
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer")
        if v < lo:
            raise argparse.ArgumentTypeError(f"{v} must be >= {lo}")
        return v
    return parse


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def read_text(paths: list[str], skip_chars: int = 0) -> str:
    parts = []
    for p in paths:
        raw = gzip.open(p, "rb").read() if p.endswith(".gz") else open(p, "rb").read()
        parts.append(raw.decode("utf-8", errors="replace"))
    text = "\n\n".join(parts)
    return text[skip_chars:]


def layer_types(config) -> list[str]:
    """Each layer's attention type. A model without layer_types whose config sets a sliding window
    (Mistral, Mixtral, Phi-3, Starcoder2; not disabled by use_sliding_window=False) applies it to
    every layer: such layers were recorded as full attention, their traces silently wrong."""
    n = config.num_hidden_layers
    types = getattr(config, "layer_types", None)
    if types:
        return list(types)
    window = getattr(config, "sliding_window", None)
    if window and getattr(config, "use_sliding_window", True) is not False:
        return ["sliding_attention"] * n
    return ["full_attention"] * n


def parse_layers(spec: str, config) -> tuple[list[int], list[int]]:
    """Returns (layers to record, sliding-window layers of the model)."""
    n = config.num_hidden_layers
    sliding = [i for i, t in enumerate(layer_types(config)) if t != "full_attention"]
    if spec in ("global", "full", "auto"):
        layers = [i for i in range(n) if i not in sliding]
    elif spec == "all":
        layers = list(range(n))
    else:
        layers = []
        for part in spec.split(","):
            try:
                if "-" in part.lstrip("-"):  # a range a-b ("-1" alone counts from the end)
                    a, b = (int(x) for x in part.split("-", 1))
                    if b < a:
                        raise SystemExit(f"--layers {spec!r}: range {part} is empty")
                    layers += list(range(a, b + 1))
                else:
                    layers.append(int(part) if int(part) >= 0 else n + int(part))
            except ValueError:
                raise SystemExit(f"--layers {spec!r}: {part!r} is not a layer index or a range a-b")
    for i in layers:
        if not 0 <= i < n:
            raise SystemExit(f"layer {i} out of range [0, {n})")
    return layers, sliding


class Recorder:
    """Holds the capture state that the registered attention function writes into."""

    def __init__(self, layers: list[int]):
        self.layers = set(layers)
        self.phase = "prefill"
        self.buf = {i: {"prefill": {"q": [], "k": [], "v": []},
                        "decode": {"q": [], "k": [], "v": [], "o": []}} for i in layers}
        self.scaling = {}
        self.extra = {}

    def attention(self, module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                  **kwargs):
        import torch
        from transformers.integrations.sdpa_attention import sdpa_attention_forward
        if kwargs.get("softcap") is not None:  # SDPA refuses it; kvrt has no soft-capping either
            raise SystemExit(f"the model soft-caps its attention logits (softcap="
                             f"{kwargs['softcap']}), which neither SDPA nor kvrt computes")
        out, w = sdpa_attention_forward(module, query, key, value, attention_mask,
                                        scaling=scaling, dropout=dropout, **kwargs)
        li = getattr(module, "layer_idx", None)
        if li in self.layers:
            n = query.shape[2]
            b = self.buf[li][self.phase]
            # query [B, Hq, n, d]; key/value [B, Hkv, kv_len, d] after the cache update: the new
            # rows are the last n (full-attention layers keep every token).
            b["q"].append(query[0].transpose(0, 1).detach().to("cpu", torch.float32, copy=True))
            b["k"].append(key[0, :, -n:].transpose(0, 1).detach().to("cpu", torch.float32, copy=True))
            b["v"].append(value[0, :, -n:].transpose(0, 1).detach().to("cpu", torch.float32, copy=True))
            if self.phase == "decode":
                b["o"].append(out[0].detach().to("cpu", torch.float32, copy=True))  # [n, Hq, d]
            self.scaling[li] = float(scaling if scaling is not None
                                     else query.shape[-1] ** -0.5)
            if kwargs.get("softcap") is not None:
                self.extra["softcap"] = str(kwargs["softcap"])
            if kwargs.get("s_aux") is not None:
                self.extra["attention_sinks"] = "learned (s_aux): NOT modelled by the trace"
        return out, w


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="gemma3-270m",
                    help="gemma3-270m | smollm2-135m | path to .gguf or HF folder")
    ap.add_argument("--text", nargs="+", required=True, help="text file(s), .gz read as gzip")
    ap.add_argument("--skip-chars", type=at_least(0), default=0,
                    help="skip this many characters first")
    ap.add_argument("--tokens", type=at_least(1), default=2048,
                    help="prompt length (tokens, BOS included)")
    ap.add_argument("--steps", type=at_least(0), default=16, help="greedy decode steps")
    ap.add_argument("--layers", default="global",
                    help="'global' (full-attention layers, default), 'all', or a list '5,11,17' / "
                         "'0-3' of original indices")
    ap.add_argument("--allow-sliding", action="store_true",
                    help="allow recording sliding-window layers (their real attention is local)")
    ap.add_argument("--dtype", default="f16", choices=["f32", "f16", "bf16"],
                    help="dtype of q/k/v in the trace (the model itself runs in f32)")
    ap.add_argument("--chunk", type=at_least(1), default=2048, help="prefill chunk (tokens)")
    ap.add_argument("--threads", type=at_least(1), default=2)
    ap.add_argument("--device", default="cpu", help="cpu | cuda (the recording runs there)")
    ap.add_argument("--no-decode-o", action="store_true", help="don't store L.decode.o")
    ap.add_argument("-o", "--output", required=True)
    args = ap.parse_args(argv)
    # Checked before the model loads (minutes for a GGUF conversion), as usage errors.
    for p in args.text:
        if not Path(p).is_file():
            ap.error(f"--text {p!r} is not a file")
    if not re.fullmatch(r"cpu|cuda(:\d+)?", args.device):
        ap.error(f"--device {args.device!r}: expected cpu, cuda or cuda:N")

    import torch
    torch.set_num_threads(args.threads)
    import models
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    from transformers import DynamicCache
    from safetensors.torch import save_file

    model, tok, label = models.load(args.model, log=log)
    model.to(args.device)
    cfg = model.config
    max_pos = getattr(cfg, "max_position_embeddings", None)
    if max_pos and args.tokens + args.steps > max_pos:
        raise SystemExit(f"--tokens + --steps = {args.tokens + args.steps} exceeds the model's "
                         f"context ({max_pos})")
    if getattr(cfg, "attn_logit_softcapping", None):
        raise SystemExit(f"the model soft-caps its attention logits (attn_logit_softcapping = "
                         f"{cfg.attn_logit_softcapping}), which neither SDPA nor kvrt computes")
    layers, sliding = parse_layers(args.layers, cfg)
    if sliding and all(i in sliding for i in range(cfg.num_hidden_layers)) and \
            getattr(cfg, "sliding_window", None) and \
            cfg.sliding_window >= args.tokens + args.steps:
        sliding = []  # a window past the whole context: every layer attends everything
    if not layers:
        raise SystemExit(f"every layer of the model attends a sliding window (sliding_window = "
                         f"{getattr(cfg, 'sliding_window', None)}): no full-attention layer to "
                         "record; --layers all --allow-sliding records them anyway")
    bad = [i for i in layers if i in sliding]
    if bad and not args.allow_sliding:
        raise SystemExit(f"layers {bad} are sliding-window layers (window {cfg.sliding_window}): "
                         "their real attention never sees cold tokens; pass --allow-sliding")

    text = read_text(args.text, args.skip_chars)
    ids = tok(text, return_tensors="pt", add_special_tokens=True).input_ids[0]
    if ids.numel() < args.tokens:
        raise SystemExit(f"text has only {ids.numel()} tokens, --tokens {args.tokens} asked")
    ids = ids[: args.tokens].unsqueeze(0)
    prompt_chars = len(tok.decode(ids[0], skip_special_tokens=True))
    log(f"prompt: {args.tokens} tokens (~{prompt_chars} chars) from {', '.join(args.text)}; "
        f"recording layers {layers} of {cfg.num_hidden_layers}; sliding layers skipped: {sliding}")

    rec = Recorder(layers)
    AttentionInterface.register("kvrt_record", rec.attention)
    AttentionMaskInterface.register("kvrt_record", sdpa_mask)
    model.set_attn_implementation("kvrt_record")

    fwd_params = inspect.signature(model.forward).parameters
    cache_kw = "cache" if "cache" in fwd_params else "past_key_values"
    cache = DynamicCache(config=cfg)

    def step(chunk_ids, start):
        chunk_ids = chunk_ids.to(args.device)
        pos = torch.arange(start, start + chunk_ids.shape[1], device=args.device).unsqueeze(0)
        kw = {cache_kw: cache, "position_ids": pos, "use_cache": True}
        if "logits_to_keep" in fwd_params:
            kw["logits_to_keep"] = 1
        with torch.inference_mode():
            out = model(input_ids=chunk_ids, **kw)
        return out.logits[0, -1]

    t0 = time.time()
    T = args.tokens
    logits = None
    for s in range(0, T, args.chunk):
        e = min(T, s + args.chunk)
        logits = step(ids[:, s:e], s)
        el = time.time() - t0
        log(f"  prefill {e}/{T} tokens  {el:.0f}s  ({e / el:.0f} tok/s, "
            f"eta {el / e * (T - e):.0f}s)")
    t_prefill = time.time() - t0

    rec.phase = "decode"
    gen = []
    nll_first = None
    t1 = time.time()
    for s in range(args.steps):
        nxt = int(torch.argmax(logits))
        gen.append(nxt)
        logits = step(torch.tensor([[nxt]]), T + s)
        if (s + 1) % 8 == 0 or s + 1 == args.steps:
            log(f"  decode {s + 1}/{args.steps}  {time.time() - t1:.1f}s")
    t_decode = time.time() - t1
    gen_text = tok.decode(gen)
    log(f"generated: {gen_text!r}")

    tdt = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    tensors = {}
    scales = set()
    for j, li in enumerate(layers):
        for phase in ("prefill", "decode"):
            for part in ("q", "k", "v"):
                # No rows (--steps 0): [0, heads, d], the shape the format asks for, not [0].
                like = rec.buf[li]["prefill"][part][0]
                x = torch.cat(rec.buf[li][phase][part], 0) if rec.buf[li][phase][part] else \
                    torch.zeros((0, *like.shape[1:]))
                tensors[f"{j}.{phase}.{part}"] = x.to(tdt).contiguous()
        if rec.buf[li]["decode"]["o"] and not args.no_decode_o:
            tensors[f"{j}.decode.o"] = torch.cat(rec.buf[li]["decode"]["o"], 0).contiguous()
        scales.add(rec.scaling[li])
        assert tensors[f"{j}.prefill.q"].shape[0] == T, tensors[f"{j}.prefill.q"].shape
        assert tensors[f"{j}.decode.k"].shape[0] == args.steps
    tensors["tokens.prompt"] = ids[0].to(torch.int32).contiguous()
    tensors["tokens.decode"] = torch.tensor(gen, dtype=torch.int32)
    if len(scales) != 1:
        raise SystemExit(f"recorded layers use different scales {scales}")
    scale = scales.pop()

    q0 = tensors["0.prefill.q"]
    k0 = tensors["0.prefill.k"]
    meta = {
        "format": "kvrt-trace",
        "format_version": "1",
        "model": label,
        "model_class": type(model).__name__,
        "num_layers": str(len(layers)),
        "num_q_heads": str(q0.shape[1]),
        "num_kv_heads": str(k0.shape[1]),
        "head_dim": str(q0.shape[2]),
        "dtype": args.dtype,
        "prompt_tokens": str(T),
        "decode_steps": str(args.steps),
        "scale": repr(scale),
        "post_rotary": "true",
        "source_layers": ",".join(map(str, layers)),
        "source_layer_types": ",".join(layer_types(cfg)[i] for i in layers),
        "model_num_layers": str(cfg.num_hidden_layers),
        "sliding_window_layers_skipped": ",".join(map(str, [i for i in sliding
                                                            if i not in layers])),
        "sliding_window": str(getattr(cfg, "sliding_window", None)),
        "max_position_embeddings": str(max_pos),
        "rope": json.dumps(getattr(cfg, "rope_parameters", None)
                           or {"rope_theta": getattr(cfg, "rope_theta", None)}),
        "softcap": rec.extra.get("softcap", "none"),
        "attention_sinks": rec.extra.get("attention_sinks", "none (no learned sink logits)"),
        "weights": ("GGUF de-quantized to f32 by transformers; model ran in f32"
                    if args.model in models.KNOWN or args.model.endswith(".gguf")
                    else "as stored in the model folder; model ran in f32"),
        "device": str(args.device),
        "source_text": ";".join(args.text),
        "source_skip_chars": str(args.skip_chars),
        "prompt_chars": str(prompt_chars),
        "generated_text": gen_text,
        "decode_o": "f32 attention output of the model per decode step (before o_proj)"
        if not args.no_decode_o else "absent",
        "recorder": "tools/record/record.py",
        "recorder_args": " ".join(sys.argv[1:]) if argv is None else " ".join(argv),
        "torch_version": torch.__version__,
        "transformers_version": __import__("transformers").__version__,
        "prefill_seconds": f"{t_prefill:.1f}",
        "decode_seconds": f"{t_decode:.1f}",
    }
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, args.output, metadata=meta)
    log(f"wrote {args.output}: {os.path.getsize(args.output) / 1e6:.1f} MB, layers {layers}, "
        f"T={T}, steps={args.steps}, scale={scale}, prefill {t_prefill:.0f}s, "
        f"decode {t_decode:.0f}s")


if __name__ == "__main__":
    main()
