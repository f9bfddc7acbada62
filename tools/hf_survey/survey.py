#!/usr/bin/env python3
"""kvrt.hf over transformers' decoder families: for each family of the installed transformers
(its causal-LM auto mapping, less overrides.SKIP), a tiny random model in exact mode against the
model's own cache, as python/tests/test_hf_families.py checks the families it covers. Each
family runs in a subprocess of its own (a hang or a crash is that family's result).

Classes: match (same tokens, logits within 1e-4, kvrt attended every kvrt layer at every decode
step), refused (a ValueError/NotImplementedError: kvrt.hf's, or transformers refusing a cache
not its own, as MiniMax's; or a RuntimeError of kvrt.hf naming what it does not serve), WRONG
(different output), CRASH (another error), killed (by a signal, mostly out of memory: a family
whose fields below do not reach its text model is built at its full default size), model (the
model could not be built or run by transformers itself at this size: not kvrt's).

    python tools/hf_survey/survey.py [--jobs 2] [--timeout 120] [--jsonl OUT] [FAMILY ...]
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

PROMPT, NEW = 200, 6
COMMON = dict(vocab_size=258, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
              pad_token_id=0, bos_token_id=1, eos_token_id=257)


def _result(cls: str, reason: str, **info) -> None:
    print("RESULT " + json.dumps({"class": cls, "reason": reason, **info}), flush=True)
    sys.exit(0)


def _build(family: str, fields: dict):
    import torch
    import transformers
    from kvrt.testing import sharpen
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    name = family.split("@")[0]
    cfg_cls = getattr(transformers, fields.pop("_config", CONFIG_MAPPING_NAMES[name]))
    model_cls = getattr(transformers, fields.pop("_model", MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[name]))
    try:  # COMMON's GQA field only where the family has one
        cfg_cls().num_key_value_heads
    except AttributeError:
        fields.setdefault("num_key_value_heads", "__drop__")
    except Exception:
        pass
    merged = {k: v for k, v in {**COMMON, **fields}.items() if v != "__drop__"}
    torch.manual_seed(0)
    model = model_cls(cfg_cls(**merged)).eval()
    sharpen(model)  # as the tests do: the cold tokens and the sinks matter
    return model


def _greedy(model, cache=None):
    import torch
    import kvrt.hf as kh
    ids = torch.randint(2, 258, (1, PROMPT), generator=torch.Generator().manual_seed(1))
    kw = {} if cache is None else {kh.cache_kwarg(model): cache}
    with torch.inference_mode():
        out = model.generate(ids, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False,
                             output_logits=True, return_dict_in_generate=True, **kw)
    return out.sequences[0, PROMPT:], torch.stack(out.logits)[:, 0]


def run_one(family: str, fields: dict) -> None:
    """The child: one family, one RESULT line."""
    import torch
    import kvrt.hf as kh
    torch.set_num_threads(1)
    try:
        model = _build(family, dict(fields))
        info = dict(layer_types=sorted(set(kh.layer_types(model.config))))
        try:
            model.set_attn_implementation("sdpa")
        except Exception:
            model.set_attn_implementation("eager")
        ref_tokens, ref = _greedy(model)
    except Exception as e:
        _result("model", f"{type(e).__name__}: {str(e)[:300]}")

    def refused_or_crash(where: str, e: Exception) -> None:
        named = isinstance(e, (ValueError, NotImplementedError)) or (
            isinstance(e, RuntimeError) and str(e).startswith("kvrt.hf:"))
        _result("refused" if named else "CRASH", f"{where}: {type(e).__name__}: {str(e)[:300]}",
                **info)

    try:
        cache = kh.enable(model, index_kind="exact", sink_tokens=4, window_tokens=16,
                          worker_threads=2)
    except Exception as e:
        refused_or_crash("enable", e)
    try:
        tokens, got = _greedy(model, cache)
    except Exception as e:
        refused_or_crash("generate", e)
    calls, want = cache.stats().attend_calls, len(kh.kvrt_layers(model.config)) * (NEW - 1)
    diff = (got.float() - ref.float()).abs().max().item()
    cache.close()
    if not torch.equal(tokens, ref_tokens) or not torch.allclose(got, ref, rtol=1e-4, atol=1e-4):
        _result("WRONG", f"max |logit diff| {diff:.3g}", **info)
    if calls != want:
        _result("WRONG", f"kvrt attended {calls} times, {want} expected", **info)
    _result("match", f"max |logit diff| {diff:.2g}", **info)


def _run(family: str, fields: dict, timeout: float) -> dict:
    try:
        p = subprocess.run([sys.executable, os.path.abspath(__file__), "--one", family,
                            json.dumps(fields)], capture_output=True, text=True, timeout=timeout)
        lines = [x for x in p.stdout.splitlines() if x.startswith("RESULT ")]
        tail = (p.stdout + p.stderr).strip().splitlines()[-1:] or [""]
        if lines:
            r = json.loads(lines[-1][7:])
        elif p.returncode < 0:  # a signal: SIGKILL is mostly the kernel's out-of-memory killer
            r = {"class": "killed", "reason": f"signal {-p.returncode} (9: out of memory?)"}
        else:
            r = {"class": "CRASH", "reason": f"exit {p.returncode}: {tail[0][:300]}"}
    except subprocess.TimeoutExpired:
        r = {"class": "model", "reason": f"no result in {timeout:g} s"}
    return {"family": family, **r}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("families", nargs="*", help="families (or family@variant) to run; default: "
                    "every causal-LM family of the installed transformers less overrides.SKIP")
    ap.add_argument("--jobs", type=int, default=2, help="families run at once (default 2)")
    ap.add_argument("--timeout", type=float, default=120, help="seconds per family (120)")
    ap.add_argument("--jsonl", help="also write one JSON line per family here")
    ap.add_argument("--one", nargs=2, metavar=("FAMILY", "FIELDS"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.one:
        run_one(a.one[0], json.loads(a.one[1]))
    if a.jobs < 1 or a.timeout <= 0:
        ap.error("--jobs must be at least 1 and --timeout positive")
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    from overrides import FIELDS, SKIP
    todo = a.families or ([f for f in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES if f not in SKIP] +
                          [f for f in FIELDS if "@" in f])
    unknown = [f for f in todo if f.split("@")[0] not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES]
    if unknown:
        ap.error(f"not a causal-LM family of transformers {transformers.__version__}: "
                 f"{', '.join(unknown)}")
    print(f"transformers {transformers.__version__}: {len(todo)} families", file=sys.stderr)
    out = open(a.jsonl, "w") if a.jsonl else None
    results = []
    with ThreadPoolExecutor(a.jobs) as ex:
        for i, r in enumerate(ex.map(lambda f: _run(f, FIELDS.get(f, {}), a.timeout), todo)):
            results.append(r)
            print(f"[{i + 1}/{len(todo)}] {r['family']}: {r['class']}", file=sys.stderr)
            if out:
                out.write(json.dumps(r) + "\n")
                out.flush()
    counts = collections.Counter(r["class"] for r in results)
    print("| family | class | reason |\n| --- | --- | --- |")
    for r in results:
        if r["class"] != "match":
            print(f"| {r['family']} | {r['class']} | {r['reason'][:160]} |")
    print("\n" + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    return 1 if counts.get("WRONG") or counts.get("CRASH") else 0


if __name__ == "__main__":
    sys.exit(main())
