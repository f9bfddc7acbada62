"""python -m kvrt.generate: generate text with a transformers model whose global attention layers
run on kvrt, and report time to first token, tokens/s, memory and kvrt's statistics.

  python -m kvrt.generate --model tiny-random --prompt-file notes.txt --new-tokens 64 \\
      --index flat --top-k 100 --window 2048
  python -m kvrt.generate --model tiny-random --prompt "kvrt keeps the sinks" --new-tokens 8

MODEL is a local Hugging Face model folder (config.json, weights, tokenizer) or "tiny-random"
(kvrt.testing: a 4-layer random Gemma 3 with a byte tokenizer; no download). Decoding is greedy
(one token per forward); --full runs transformers' own cache instead of kvrt, for comparison.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from pathlib import Path


def _progress(total: int, desc: str, quiet: bool):
    """tqdm when installed, else a plain counter on stderr."""
    if quiet:
        return _Plain(total, desc, silent=True)
    try:
        from tqdm import tqdm
        return tqdm(total=total, desc=desc, unit="tok", file=sys.stderr)
    except ImportError:
        return _Plain(total, desc)


class _Plain:
    def __init__(self, total: int, desc: str, silent: bool = False):
        self.total, self.desc, self.n, self.silent = total, desc, 0, silent
        self._last = 0.0

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.perf_counter()
        if not self.silent and (now - self._last > 0.5 or self.n >= self.total):
            print(f"\r{self.desc}: {self.n}/{self.total} tokens", end="", file=sys.stderr,
                  flush=True)
            self._last = now

    def close(self) -> None:
        if not self.silent:
            print(file=sys.stderr)


def _load(name: str, dtype: str, device: str):
    import torch
    tdt = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    if name == "tiny-random":
        from .testing import ByteTokenizer, tiny_random
        model, tok = tiny_random().to(tdt), ByteTokenizer()
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer
        tok = AutoTokenizer.from_pretrained(name)
        model = AutoModelForCausalLM.from_pretrained(name, dtype=tdt)
    return model.to(device).eval(), tok


def _rss_bytes() -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _gib(n: float) -> str:
    """Bytes in GiB, or MiB below 1 GiB."""
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def _at_least(lo: int):
    """An argparse type: an integer >= lo (a negative count was taken: --max-prompt-tokens -1
    dropped the prompt's first token)."""
    def parse(s: str) -> int:
        v = int(s)
        if v < lo:
            raise argparse.ArgumentTypeError(f"{s} must be >= {lo}")
        return v
    parse.__name__ = "int"
    return parse


def parse_args(argv=None):
    ap = argparse.ArgumentParser(
        prog="python -m kvrt.generate", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="The report: time to first token (the prompt forward, kvrt prefill included), "
               "decode tokens/s (tokens after the first / decode time), peak GPU memory "
               "(torch.cuda.max_memory_allocated), peak host memory (VmHWM), kvrt's memory per "
               "tier and its statistics (kvrt.Stats).")
    ap.add_argument("--model", required=True, help="model folder, or tiny-random")
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", metavar="TEXT", help="the prompt itself")
    src.add_argument("--prompt-file", help="text file: the prompt ('-': standard input)")
    ap.add_argument("--max-prompt-tokens", type=_at_least(0), default=0,
                    help="keep the prompt's last N tokens (0: all)")
    ap.add_argument("--new-tokens", type=_at_least(1), default=32, help="tokens to generate")
    ap.add_argument("--device", default="cpu", help="cpu or cuda[:N] (the model's device)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                    help="model dtype (kvrt stores K/V in the same)")
    ap.add_argument("--threads", type=_at_least(0), default=0,
                    help="torch threads and kvrt worker threads (0: library defaults)")
    k = ap.add_argument_group("kvrt options (kvrt.Config fields)")
    k.add_argument("--index", default="flat", help="index kind: exact, flat, ivf, hnsw, "
                   "landmark, attention-aware, cluster")
    k.add_argument("--top-k", type=_at_least(1), default=100, help="cold tokens per q head and step")
    k.add_argument("--sinks", type=_at_least(0), default=4, help="sink tokens on the GPU tier")
    k.add_argument("--window", type=_at_least(1), default=2048, help="recent tokens on the GPU tier")
    k.add_argument("--effort", type=_at_least(0), default=0, help="search effort (0: the kind's default)")
    k.add_argument("--cold-attention", default="cpu", choices=["cpu", "fetch", "auto"])
    k.add_argument("--use-gpu", type=int, default=None, choices=[-1, 0, 1],
                   help="kvrt backend (default: 1 when the model is on CUDA, else 0)")
    k.add_argument("--mla", default="latent", choices=["latent", "expanded"],
                   help="multi-head latent attention (DeepSeek-V2/V3, ...) held as its latent "
                        "(one kv head per token) or as the per-head K/V (kvrt.hf)")
    k.add_argument("--kvrt", action="append", default=[], metavar="FIELD=VALUE",
                   help="any other kvrt.Config field (repeatable), e.g. --kvrt "
                        "hot_cache_fraction=0.2 --kvrt cluster_miss_penalty=1")
    k.add_argument("--full", action="store_true",
                   help="no kvrt: transformers' own DynamicCache (a reference run)")
    ap.add_argument("--prefill-chunk", type=_at_least(0), default=0, metavar="N",
                    help="the prompt in forwards of N tokens (0: one forward): for prompts whose "
                         "activations do not fit one forward; kvrt uses chunked_prompt (the "
                         "prompt's K/V stay on the model's device until the first decode token)")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    args = ap.parse_args(argv)
    args.kvrt_options = {}
    for item in args.kvrt:
        field, sep, value = item.partition("=")
        if not sep or not field.strip():
            ap.error(f"--kvrt {item!r}: expected FIELD=VALUE")
        args.kvrt_options[field.strip()] = _number(value.strip())
    # Paths and the device are checked here, before the model loads (minutes for a large one),
    # and refused as usage errors (exit 2) like any other bad option value.
    prompt = None if args.prompt_file in (None, "-") else Path(args.prompt_file)
    if prompt is not None and (not prompt.is_file() or not os.access(prompt, os.R_OK)):
        why = "does not exist" if not prompt.exists() else (
            "is not a file" if not prompt.is_file() else "is not readable")
        ap.error(f"--prompt-file {args.prompt_file!r} {why}")
    if args.prompt == "":
        ap.error("--prompt: empty (the model needs at least one token)")
    if args.model != "tiny-random" and not Path(args.model).is_dir():
        ap.error(f"--model {args.model!r}: not a model folder (or 'tiny-random')")
    if not re.fullmatch(r"cpu|cuda(:\d+)?", args.device):
        ap.error(f"--device {args.device!r}: expected cpu, cuda or cuda:N")
    return args


def _prompt_text(args) -> str:
    """--prompt's text, --prompt-file's, or standard input's for --prompt-file -."""
    if args.prompt is not None:
        return args.prompt
    if args.prompt_file == "-":
        return sys.stdin.buffer.read().decode("utf-8", errors="replace")
    return Path(args.prompt_file).read_text(encoding="utf-8", errors="replace")


def _number(s: str):
    """A --kvrt value as the int or float it spells, else the string (enum names)."""
    for conv in (int, float):
        try:
            return conv(s)
        except ValueError:
            pass
    return s


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch
    from transformers import DynamicCache

    from . import hf
    from ._errors import KvrtError

    if args.threads:
        torch.set_num_threads(args.threads)
    model, tok = _load(args.model, args.dtype, args.device)
    text = _prompt_text(args)
    ids = tok(text, return_tensors="pt").input_ids
    if args.max_prompt_tokens:
        ids = ids[:, -args.max_prompt_tokens:]
    ids = ids.to(model.device)
    T = ids.shape[1]
    on_cuda = model.device.type == "cuda"

    if args.full:
        model.set_attn_implementation("sdpa")
        cache = DynamicCache(config=model.config)
    else:
        opts = dict(index_kind=args.index, top_k=args.top_k, sink_tokens=args.sinks,
                    window_tokens=args.window, search_effort=args.effort,
                    worker_threads=args.threads, cold_attention=args.cold_attention)
        if args.use_gpu is not None:
            opts["use_gpu"] = args.use_gpu
        opts.update(args.kvrt_options)
        try:
            cache = hf.enable(model, chunked_prompt=args.prefill_chunk > 0, mla=args.mla,
                              **opts)
        except (KvrtError, ValueError, TypeError) as e:  # a bad option value: no traceback
            print(f"python -m kvrt.generate: error: {e}", file=sys.stderr)
            return 2
        print(f"kvrt {cache.runtime!r}; kvrt layers {hf.kvrt_layers(model.config)}",
              file=sys.stderr)
        if args.kvrt_options:  # as the runtime took them (kvrt_runtime_config)
            eff = cache.runtime.config
            print("kvrt options: " + ", ".join(f"{f}={getattr(eff, f)}" for f in args.kvrt_options),
                  file=sys.stderr)
    kw = hf.cache_kwarg(model)
    sync = torch.cuda.synchronize if on_cuda else (lambda: None)
    if on_cuda:
        torch.cuda.reset_peak_memory_stats()

    bar = _progress(T, "prefill", args.quiet)
    t0 = time.perf_counter()
    step = args.prefill_chunk if args.prefill_chunk > 0 else T
    with torch.inference_mode():
        for a in range(0, T, step):
            b = min(T, a + step)
            pos = torch.arange(a, b, device=model.device).unsqueeze(0)
            logits = model(ids[:, a:b], **{kw: cache}, position_ids=pos, use_cache=True,
                           logits_to_keep=1).logits[0, -1]
            if b < T:
                sync()  # the bar shows the chunks as they finish
            bar.update(b - a)
        tok_id = int(torch.argmax(logits))
        sync()
    ttft = time.perf_counter() - t0
    bar.close()

    out = [tok_id]
    bar = _progress(args.new_tokens, "decode", args.quiet)
    bar.update(1)
    eos = getattr(tok, "eos_token_id", None)
    step_s = []
    with torch.inference_mode():
        for s in range(1, args.new_tokens):
            t1 = time.perf_counter()
            x = torch.tensor([[tok_id]], device=model.device)
            pos = torch.tensor([[T + s - 1]], device=model.device)
            logits = model(x, **{kw: cache}, position_ids=pos, use_cache=True).logits[0, -1]
            tok_id = int(torch.argmax(logits))  # syncs the device
            step_s.append(time.perf_counter() - t1)
            out.append(tok_id)
            bar.update(1)
            if tok_id == eos:
                break
    bar.close()
    # A chunked prompt reaches kvrt at the first decode step (hf.enable(chunked_prompt=True)):
    # that step carries kvrt's prefill and is reported apart from the decode rate.
    first_step_s = step_s.pop(0) if args.prefill_chunk > 0 and not args.full and step_s else None
    decode_s = sum(step_s)

    print(tok.decode(out))
    steps = len(step_s)
    print(f"\nprompt {T} tokens, generated {len(out)}; model {args.model} on {model.device}, "
          f"{args.dtype}; {'full cache (transformers DynamicCache)' if args.full else 'kvrt'}",
          file=sys.stderr)
    print(f"time to first token  {ttft * 1e3:10.1f} ms  ({T / ttft:.0f} prompt tokens/s)",
          file=sys.stderr)
    if first_step_s is not None:
        print(f"first decode step    {first_step_s * 1e3:10.1f} ms  (kvrt's prefill of the chunked "
              "prompt runs there)", file=sys.stderr)
    if steps:
        print(f"decode               {steps / decode_s:10.2f} tokens/s  "
              f"({decode_s / steps * 1e3:.1f} ms per token)", file=sys.stderr)
    if on_cuda:
        # torch's tensors only (weights, activations, a full cache): kvrt's own device buffers
        # are not torch's, and are reported on their own below.
        print(f"GPU memory (peak)    {_gib(torch.cuda.max_memory_allocated()):>13}  (torch's "
              "tensors; kvrt's own below)", file=sys.stderr)
    print(f"host memory (peak)   {_gib(_rss_bytes()):>13}", file=sys.stderr)
    if not args.full:
        st = cache.stats()
        n_attend = st.attend_calls
        print(f"kvrt memory          GPU tier {_gib(st.gpu_allocated_bytes)}, host store "
              f"{_gib(st.host_bytes)}, indexes {_gib(st.index_bytes)}", file=sys.stderr)
        print(f"kvrt host time       prefill {cache.time_prefill_s * 1e3:.1f} ms, append+attend "
              f"{cache.time_decode_s * 1e3:.1f} ms ({n_attend} layer attends, "
              f"{st.mean_attend_us:.0f} us each inside the library)", file=sys.stderr)
        print(f"kvrt stats           {st}", file=sys.stderr)
        cache.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
