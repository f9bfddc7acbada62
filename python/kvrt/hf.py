"""kvrt for Hugging Face transformers: an attention function and a Cache, on in two lines::

    cache = kvrt.hf.enable(model, index_kind="flat", top_k=100, window_tokens=2048)
    out = model.generate(input_ids, cache=cache, max_new_tokens=256)   # past_key_values= on 4.x

enable() registers the attention function "kvrt" with transformers' AttentionInterface (and
mask(), transformers' SDPA mask builder without the mask of a plain causal chunk, under that name),
switches the model to it, and returns a KvrtCache.
Works for decoders whose attention modules call `cache.update(...)` and then the attention
interface (Llama, Qwen2, Gemma 3, SmolLM, Mistral, ...). Multi-head latent attention (DeepSeek-V2/
V3, Kimi K2, MiniCPM3, GLM-4-MoE-Lite) is held as its latent by default (mla="latent": one kv head
of kv_lora_rank + qk_rope_head_dim per token, read off kv_b_proj's input; each q head's nope part
absorbed through kv_b_proj's key rows, the output through its value rows), or as the per-head K/V
the model expands from it (mla="expanded": values padded with zeros to the keys' width).

What runs where:
  - Global (full-attention) layers are kvrt layers, renumbered 0..n-1. Their prompt (the first
    forward) goes to kvrt as one Sequence.prefill per batch row, then runs transformers' SDPA
    over the prompt itself (exact; kvrt has no prefill attention; kvrt's work on the prompt runs
    in the background beside it). Each later token i of a
    forward: Sequence.append(k_i, v_i), then attend(q_i) (attend_batch for several rows): sinks +
    window + retrieved cold tokens, merged inside libkvrt. A later forward of n tokens is
    appended and attended token by token, so token i sees exactly what n single-token steps
    would. transformers keeps no K/V for these layers.
  - A prompt in several forwards (generate's prefill_chunk_size, when the prompt's activations do
    not fit in one forward): enable(model, chunked_prompt=True). Each chunk then runs SDPA over
    the prompt so far, whose K/V stay on the model's device (as in DynamicCache) until the first
    single-token forward, which hands the whole prompt to kvrt. Without it a later chunk is
    decoded token by token (above). No [chunk, prompt so far] mask is built for such a chunk
    (without padding): its causal mask is torch's lower-right causal bias (at 1M tokens
    transformers' materialised mask ran out of memory).
  - Sliding-window (and other non-global) layers keep transformers' own cache and SDPA.
  - Model on a CUDA device and a CUDA build of libkvrt: the GPU backend (use_gpu=1), device
    tensors on torch's current stream, no host copy of q/k/v/out. With use_gpu=0 and a CUDA model
    the tensors are copied to the host and back (for libkvrt builds without CUDA).

Tensor parallelism (transformers' tp_plan="auto" under torchrun): each rank's attention modules
compute only that rank's heads, so each rank's enable() makes its own runtime over its local q and
kv heads (read from the sharded q_proj/k_proj weights, checked against the tensors of every
call), on the rank's GPU (cuda_device = the modules' device). Nothing of kvrt talks
across ranks: transformers' collectives (o_proj's all-reduce) do. cpu_share() gives each rank of a
host its own range of CPUs for kvrt's worker threads. docs/tensor-parallel.md.

Padded batch rows (generate with an attention_mask, left padding): kvrt has no attention mask,
so a row's pad tokens never enter it: the prompt's kvrt_prefill takes only the row's real tokens
(read off the model's mask), and decode tokens are real. Not with chunked_prompt (refused).

Limits: no beam search, cropping or assisted decoding. Refused (ValueError at enable() or on the
prompt, before any token enters kvrt; README, "Python"): attention logit soft-capping (Gemma 2),
a score bias in the mask (ALiBi), layers sharing K/V (Gemma 3n), kvrt layers of different shapes
or scales, a model whose attention does not go through transformers' AttentionInterface; a second
attention call per cache update (DiffLlama) or a cache indexed apart from the attention modules
raise RuntimeError.
"""

from __future__ import annotations

import math
import threading
import weakref
from typing import Any, Optional

import torch
from transformers import AttentionInterface, DynamicCache
from transformers.cache_utils import CacheLayerMixin
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, causal_mask_function, sdpa_mask

from ._config import Config, make_config
from ._runtime import Runtime, Sequence
from ._stats import Stats

ATTENTION_NAME = "kvrt"
_GPU_MAX_HEAD_DIM = 256  # kvrt.h, use_gpu: the GPU backend's widest head
_DTYPES = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16"}
_TORCH_DTYPES = {v: k for k, v in _DTYPES.items()}

# The KvrtLayer that the current forward just updated, per model layer index: the attention
# function (which transformers does not hand the cache) takes it from here. Per thread, so that
# two models may decode in two threads.
_pending = threading.local()


def _text_config(config):
    return config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config


def layer_types(config) -> list[str]:
    """The model's attention layer types ("full_attention", "sliding_attention", ...)."""
    c = _text_config(config)
    types = _get(c, "layer_types")
    if types is None:
        sliding = (_get(c, "sliding_window") is not None
                   and getattr(c, "use_sliding_window", True))
        types = ["sliding_attention" if sliding else "full_attention"] * c.num_hidden_layers
    return list(types)


def kvrt_layers(config) -> list[int]:
    """Model layer indices that kvrt serves: the full-attention layers."""
    kinds = ("full_attention", "hybrid") if _HybridBase is not None else ("full_attention",)
    return [i for i, t in enumerate(layer_types(config)) if t in kinds]


def _attention_modules(model) -> dict[int, torch.nn.Module]:
    return {m.layer_idx: m for m in model.modules()
            if hasattr(m, "layer_idx") and hasattr(m, "scaling")
            and (hasattr(m, "head_dim") or hasattr(m, "qk_head_dim"))}


def _get(config, name: str):
    """config.name, or None when it has none; transformers raises its own error (not an
    AttributeError) for a per-layer attribute read off a config whose layers differ."""
    try:
        return getattr(config, name, None)
    except Exception:
        return None


def _layer_config(model, layer: int):
    """The config of one decoder layer: its entry of per_layer_config where the model has one
    (Gemma 4: global layers with another head_dim and kv head count than sliding ones)."""
    c = _text_config(model.config)
    per = _get(c, "per_layer_config")
    return per[layer] if per else c


def head_dims(model, layer: Optional[int] = None,
              modules: Optional[dict] = None) -> tuple[int, int]:
    """(query/key, value) head dims of the attention of `layer` (default: the first kvrt
    layer), from its attention module where it says, else from the layer's config. Multi-head
    latent attention (DeepSeek-V2/V3, Kimi K2, MiniCPM3, GLM-4-MoE-Lite, ...: qk_nope_head_dim +
    qk_rope_head_dim for queries and keys, v_head_dim for values; its config's head_dim is the
    rope part only) attends over per-head K/V expanded from its latent, which kvrt is handed.
    modules: _attention_modules(model), when the caller has it (a walk of every module)."""
    if layer is None:
        layers = kvrt_layers(model.config)
        layer = layers[0] if layers else 0
    c = _layer_config(model, layer)
    mod = (_attention_modules(model) if modules is None else modules).get(layer)
    nope, rope = _get(c, "qk_nope_head_dim"), _get(c, "qk_rope_head_dim")
    qk = (_get(mod, "qk_head_dim") or _get(mod, "head_dim") or
          (nope + rope if nope is not None and rope is not None else None) or
          _get(c, "head_dim") or c.hidden_size // c.num_attention_heads)
    return qk, _get(mod, "v_head_dim") or _get(c, "v_head_dim") or qk


MLA_FORMS = ("latent", "expanded")


def mla_dims(model, layer: Optional[int] = None,
             modules: Optional[dict] = None) -> Optional[tuple[int, int, int, int]]:
    """(kv_lora_rank, qk_nope_head_dim, qk_rope_head_dim, v_head_dim) of `layer`'s attention
    (default: the first kvrt layer) when it is multi-head latent attention: a kv_b_proj that maps
    the latent to each head's nope key part and value. None for any other attention."""
    if layer is None:
        layers = kvrt_layers(model.config)
        layer = layers[0] if layers else 0
    mod = (_attention_modules(model) if modules is None else modules).get(layer)
    if mod is None or getattr(mod, "kv_b_proj", None) is None:
        return None
    c = _layer_config(model, layer)
    dims = tuple(_get(mod, n) or _get(c, n)
                 for n in ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"))
    return dims if all(isinstance(x, int) and x > 0 for x in dims) else None


def _latent_maps(module, heads: int, dims: tuple[int, int, int, int]):
    """kv_b_proj as (key rows [heads, nope, rank], value rows [heads, v, rank]): views of a plain
    floating weight (this rank's shard under tensor parallelism), else (a quantized or wrapped
    projection) its map read off the identity, as the model applies it."""
    rank, nope, _, dv = dims
    proj = module.kv_b_proj
    w = getattr(proj, "weight", None)
    if (isinstance(proj, torch.nn.Linear) and proj.bias is None and w is not None
            and w.dtype.is_floating_point):
        w = (w.to_local() if hasattr(w, "to_local") else w).detach()
    else:
        p = next(proj.parameters(), None)
        dt = p.dtype if p is not None and p.dtype.is_floating_point else torch.float32
        eye = torch.eye(rank, dtype=dt, device=p.device if p is not None else None)
        with torch.no_grad():
            w = (proj(eye) - proj(torch.zeros_like(eye[:1]))).T.contiguous()
    if w.shape != (heads * (nope + dv), rank):
        raise ValueError(f"kvrt.hf: kv_b_proj maps {tuple(w.shape)[::-1]} where {heads} heads of "
                         f"{nope} + {dv} from a latent of {rank} were expected; pass "
                         "mla=\"expanded\"")
    w = w.view(heads, nope + dv, rank)
    return w[:, :nope], w[:, nope:]


def _keep_latent(module, cache: "KvrtCache") -> None:
    """A hook on kv_b_proj's input, the latent of the tokens of this forward (normalized, as the
    model expands it), kept on the attention module for kvrt's attention call to take; only while
    `cache` (the last KvrtCache made for the module) is open, so that a forward with the model's
    own cache does not leave its latent on the module (a long prompt's: 128 MB per layer)."""
    module.__dict__["_kvrt_latent_cache"] = weakref.ref(cache)
    if getattr(module, "_kvrt_latent_hook", None) is not None:
        return
    ref = weakref.ref(module)

    def keep(_proj, args):
        m = ref()
        owner = m.__dict__.get("_kvrt_latent_cache") if m is not None else None
        owner = owner() if owner is not None else None
        if owner is not None and not owner._closed and args:
            m.__dict__["_kvrt_latent"] = args[0]
    module._kvrt_latent_hook = module.kv_b_proj.register_forward_pre_hook(keep)


def _forget_attended_on_forward(module) -> None:
    """A pre-hook on an attention module: each of its forwards starts without a record of an
    earlier attention call (attention()'s check for two calls per cache update looks within one
    forward: a later forward with the model's own cache, after a kvrt generation, is no second
    call)."""
    if getattr(module, "_kvrt_forward_hook", None) is not None:
        return
    ref = weakref.ref(module)

    def forget(*_):
        attended = getattr(_pending, "attended", None)
        idx = getattr(ref(), "layer_idx", None)
        last = attended.get(idx) if attended else None
        if last is not None and last() is ref():
            del attended[idx]
    module._kvrt_forward_hook = module.register_forward_pre_hook(forget)


def _shard_rows(weight) -> tuple[int, int]:
    """(rows this process holds, rows of the whole weight / tp) of a projection: its local shard
    under tensor parallelism (a DTensor knows its global shape; a plain shard does not)."""
    local = (weight.to_local() if hasattr(weight, "to_local") else weight).shape[0]
    return local, weight.shape[0] if hasattr(weight, "to_local") else None


def local_heads(model) -> tuple[int, int]:
    """(q heads, kv heads) that this process's attention modules compute, under tensor
    parallelism this rank's share. kv heads: the rows of the first kvrt layer's k_proj (its
    local shard, colwise under transformers' tp_plan) over head_dim. q heads: the layer config's
    count, under tensor parallelism scaled by the share of q_proj's rows this rank holds (a
    q_proj that also computes an output gate, as Qwen3-Next's, has more rows than heads).
    Attention without separate q_proj/k_proj: the config's counts divided by model.tp_size."""
    layers = kvrt_layers(model.config)
    c = _layer_config(model, layers[0] if layers else 0)
    q = c.num_attention_heads
    kv = _get(c, "num_key_value_heads") or q
    tp = getattr(model, "tp_size", None) or 1
    mod = _attention_modules(model).get(layers[0]) if layers else None
    qp, kp = getattr(mod, "q_proj", None), getattr(mod, "k_proj", None)
    if not all(hasattr(p, "weight") for p in (qp, kp)):
        if q % tp or kv % tp:
            raise ValueError(f"kvrt.hf: {q} q / {kv} kv heads do not split over tp_size {tp}")
        return q // tp, kv // tp
    head_dim = head_dims(model)[0]
    k_rows = _shard_rows(kp.weight)[0]
    local, whole = _shard_rows(qp.weight)
    whole = whole or local * tp
    if k_rows % head_dim or (local * q) % whole:
        raise ValueError(f"kvrt.hf: a projection shard ({k_rows} k rows, {local} of {whole} q "
                         f"rows) is not whole heads of {head_dim}: the tensor-parallel plan "
                         "splits a head")
    return local * q // whole, k_rows // head_dim


def cpu_share(local_rank: Optional[int] = None, local_world_size: Optional[int] = None) -> dict:
    """This rank's share of the host's online CPUs for kvrt's worker threads, as Config fields:
    {"worker_cpu_first": f, "worker_cpu_count": n}, the CPUs split into local_world_size equal
    contiguous ranges (defaults: torchrun's LOCAL_RANK and LOCAL_WORLD_SIZE, else 0 and 1). Use
    it as kvrt.hf.enable(model, **kvrt.hf.cpu_share(), ...). It does not look at NUMA nodes (see
    docs/tensor-parallel.md); a launcher that already binds each rank (numactl, taskset) needs
    none of this. ValueError when there are fewer CPUs than ranks."""
    import os
    rank = int(os.environ.get("LOCAL_RANK", 0)) if local_rank is None else local_rank
    world = (int(os.environ.get("LOCAL_WORLD_SIZE", 1)) if local_world_size is None
             else local_world_size)
    cpus = _online_cpus()
    per = len(cpus) // world if world >= 1 else 0  # world < 1 (LOCAL_WORLD_SIZE=0): refused
    if per < 1 or not 0 <= rank < world:
        raise ValueError(f"kvrt.hf.cpu_share: rank {rank} of {world} on {len(cpus)} CPUs")
    mine = cpus[rank * per:(rank + 1) * per]
    if mine[-1] - mine[0] + 1 != per:
        raise ValueError(f"kvrt.hf.cpu_share: the online CPUs {cpus} leave rank {rank} a "
                         "range with gaps; set worker_cpu_first/worker_cpu_count yourself")
    return {"worker_cpu_first": mine[0], "worker_cpu_count": per}


def _online_cpus() -> list[int]:
    """The online CPU ids (/sys/devices/system/cpu/online, as libkvrt checks them)."""
    import os
    try:
        with open("/sys/devices/system/cpu/online") as f:
            ids = []
            for part in f.read().strip().split(","):
                lo, _, hi = part.partition("-")
                ids.extend(range(int(lo), int(hi or lo) + 1))
            return sorted(ids)
    except (OSError, ValueError):
        return list(range(os.cpu_count() or 1))


def runtime_config(model, config: Optional[Config] = None, *, mla: str = "latent",
                   **options: Any) -> Config:
    """The kvrt.Config for `model`'s global layers: shapes (this rank's heads under tensor
    parallelism: local_heads), dtype (the model's), scale (the attention modules' own) and backend
    (GPU when the model is on CUDA, on the attention modules' device), then `config` / `options`
    (e.g. index_kind, top_k, sink_tokens, window_tokens, worker_threads): what they set wins over
    the model's dtype, scale and backend - a dict's keys, a Config's fields that differ from
    kvrt.Config()'s defaults, every keyword option (pass a default value, e.g. dtype="bf16" for
    an f32 model, as a keyword or in a dict). mla: how multi-head
    latent attention is held ("latent": q heads over one kv head of kv_lora_rank +
    qk_rope_head_dim; "expanded": the per-head K/V; see the module's docstring)."""
    if mla not in MLA_FORMS:
        raise ValueError(f"kvrt.hf: mla={mla!r} is not one of {MLA_FORMS}")
    c = _text_config(model.config)
    if _get(c, "attn_logit_softcapping"):
        raise ValueError("kvrt.hf: attention logit soft-capping (attn_logit_softcapping = "
                         f"{c.attn_logit_softcapping}) is not supported")
    if _get(c, "num_kv_shared_layers"):
        # Gemma 3n / 4: the last layers attend the K/V an earlier layer stored, which kvrt
        # holds for that layer only (their attention would see the new token alone).
        raise ValueError(f"kvrt.hf: {c.num_kv_shared_layers} layers reuse another layer's K/V "
                         "(num_kv_shared_layers), which kvrt does not serve")
    layers = kvrt_layers(model.config)
    if not layers:
        raise ValueError("kvrt.hf: the model has no full-attention layer for kvrt to serve "
                         f"(layer types: {sorted(set(layer_types(model.config)))})")
    if not any("attention" in type(m).__name__.lower() for m in model.modules()):
        raise ValueError(f"kvrt.hf: {type(model).__name__} has no attention modules for kvrt "
                         "to serve")
    # kvrt's rows are as wide as the widest of q/k and v: a narrower one is padded with zeros
    # (MLA's values; the output's padding is dropped), which changes no score and no output.
    mods = _attention_modules(model)
    shapes = {i: (head_dims(model, i, mods), _get(_layer_config(model, i), "num_key_value_heads"))
              for i in layers}
    first = shapes[layers[0]]
    odd = [i for i in layers if shapes[i] != first]
    if odd:
        raise ValueError(f"kvrt.hf: the full-attention layers differ in head dims or kv heads "
                         f"(layer {layers[0]}: {first[0]}, {first[1]}; layer {odd[0]}: "
                         f"{shapes[odd[0]][0]}, {shapes[odd[0]][1]}); one kvrt runtime serves "
                         "one shape")
    qk_dim, v_dim = first[0]
    head_dim = max(qk_dim, v_dim)
    scale = float(getattr(mods.get(layers[0]), "scaling", qk_dim ** -0.5))
    dtype = _DTYPES.get(model.dtype)
    if dtype is None:
        raise ValueError(f"kvrt.hf: model dtype {model.dtype} is not one of {list(_DTYPES)}")
    q_heads, kv_heads = local_heads(model)
    latent = mla_dims(model, layers[0], mods) if mla == "latent" else None
    expanded = 2 * kv_heads * head_dim  # values per token held as the model's heads: K and V
    if latent is not None:
        # The score of q head h over the latent: (its nope part through kv_b_proj's key rows of
        # h) . latent + its rope part . the shared rope key, the model's score term by term. Its
        # value is the key (values_are_keys): the output's first kv_lora_rank dims are the
        # weighted latent, the rest (the rope part's) are dropped.
        kv_heads, head_dim = 1, latent[0] + latent[2]
    if kv_heads <= 0 or q_heads % kv_heads:
        raise ValueError(f"kvrt.hf: the model's config gives {q_heads} q / {kv_heads} kv heads, "
                         "not whole q heads per kv head: its attention computes other heads "
                         "than its config says")
    # What the caller set wins over the model's dtype, scale and backend: a dict's keys, a
    # Config's fields that differ from the defaults (its other fields are the defaults, not a
    # choice: taking them gave an f32 model a bf16 store), and the keyword options. Shape fields
    # always come from the model.
    if isinstance(config, dict):
        cfg = make_config(config).to_dict()
        cfg = {k: cfg[k] for k in config}
    elif config is not None:
        defaults = Config().to_dict()
        cfg = {k: v for k, v in make_config(config).to_dict().items() if v != defaults[k]}
    else:
        cfg = {}
    chosen = {**cfg, **options}
    use_gpu = 1 if model.device.type == "cuda" else 0
    # (A use_gpu given in config or options wins below, as for any field.)
    host_only = latent is not None or head_dim > _GPU_MAX_HEAD_DIM
    if use_gpu and host_only and "use_gpu" not in chosen:
        import warnings
        why = (f"multi-head latent attention held as its latent (head_dim {head_dim}, its value "
               "its key: values_are_keys) runs on the host backend only (mla=\"expanded\" keeps "
               f"the GPU backend at {expanded / head_dim:.0f}x the memory per token)"
               if latent is not None else
               f"head_dim {head_dim} is past the GPU backend's {_GPU_MAX_HEAD_DIM}")
        warnings.warn(f"kvrt.hf: {why}: kvrt runs on its host backend (q, k, v and the output "
                      "are copied between the model's device and the host)", stacklevel=3)
        use_gpu = 0
    base = dict(num_layers=len(layers), num_q_heads=q_heads, num_kv_heads=kv_heads,
                head_dim=head_dim, dtype=dtype, scale=scale, use_gpu=use_gpu,
                values_are_keys=int(latent is not None))
    params = mods[layers[0]].parameters() if layers[0] in mods else iter(())
    device = next(params, None)
    device = device.device if device is not None else model.device
    if device.type == "cuda" and device.index is not None:
        base["cuda_device"] = device.index  # a rank's own GPU, whatever device is current
    merged = dict(chosen)
    merged.update({k: v for k, v in base.items()
                   if k not in merged or k in ("num_layers", "num_q_heads", "num_kv_heads",
                                               "head_dim", "values_are_keys")})
    if latent is not None and merged.get("use_gpu") == 1:
        raise ValueError("kvrt.hf: multi-head latent attention held as its latent runs on kvrt's "
                         "host backend (its value is its key), and use_gpu=1 was given; pass "
                         "mla=\"expanded\" for the GPU backend")
    return make_config(None, **merged)


class KvrtLayer(CacheLayerMixin):
    """The cache of one global layer: holds nothing but a token count; update() returns the new
    k/v only and leaves itself for the attention function, which hands them to kvrt."""

    is_sliding = False
    is_compileable = False
    is_croppable = False

    def __init__(self, cache: "KvrtCache", kvrt_layer: int):
        super().__init__()
        self.cache = cache
        self.kvrt_layer = kvrt_layer
        self.tokens = 0  # per batch row
        self.is_initialized = True

    def lazy_initialization(self, key_states, value_states) -> None:
        pass

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        # Only the layer is noted for the attention function, which gets the K/V as arguments:
        # holding them here kept every layer's prompt K/V on the GPU until its first decode
        # token (0.3.20 and before), the full KV of the prompt at once, as DynamicCache holds it.
        pending = getattr(_pending, "layers", None)
        if pending is None:
            pending = _pending.layers = {}
        if pending.get(self.layer_idx) is self:
            # The K/V of this layer's last update never reached kvrt: kvrt holds no copy, so
            # the model attended without them and would again.
            raise RuntimeError(
                f"kvrt.hf: layer {self.layer_idx}'s attention did not call kvrt's attention "
                "function after its cache update: the model's attention does not go through "
                "transformers' AttentionInterface, or a forward was interrupted (reset() the "
                "cache before the next generation)")
        pending[self.layer_idx] = self
        getattr(_pending, "attended", {}).pop(self.layer_idx, None)
        return key_states, value_states

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        # The mask of a kvrt layer only matters for the prompt: SDPA over the prompt itself, or
        # over every chunk so far for a chunked prompt (KvrtCache(chunked_prompt=True)).
        if self.cache._prompt_chunk(self.kvrt_layer, query_length):
            return self.tokens + query_length, 0
        return query_length, self.tokens

    def get_seq_length(self) -> int:
        return self.tokens

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.tokens = 0

    def __deepcopy__(self, memo):
        # A copy would share the runtime's sequences (native handles) with the original: a
        # looped model's per-loop copies (Dory) would append every loop's K/V to one sequence.
        raise NotImplementedError("kvrt.hf: copying a kvrt cache layer (a per-loop or per-branch "
                                  "copy of the cache) is not supported")

    __copy__ = lambda self: self.__deepcopy__(None)  # noqa: E731

    def reorder_cache(self, beam_idx) -> None:
        raise NotImplementedError("kvrt.hf: beam search is not supported")

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("kvrt.hf: cropping (assisted decoding) is not supported")

    def batch_repeat_interleave(self, repeats: int) -> None:
        raise NotImplementedError("kvrt.hf: expanding the batch of a KvrtCache is not supported")

    def batch_select_indices(self, indices) -> None:
        raise NotImplementedError("kvrt.hf: selecting batch rows of a KvrtCache is not supported")

    def offload(self):
        pass

    def prefetch(self):
        pass

    def attend(self, module, query, key, value, attention_mask, **kwargs):
        """The attention of this layer for one forward: query [B, Hq, n, d], key/value
        [B, Hkv, n, d] (the new tokens). Returns ([B, n, Hq, d] in query's dtype, None)."""
        return self.cache._attend(self, module, query, key, value, attention_mask, **kwargs)


try:  # transformers' cache of a linear-attention (SSM) layer's states, since 5.x
    from transformers.cache_utils import LinearAttentionLayer as _HybridBase
except ImportError:
    _HybridBase = None


if _HybridBase is not None:
    class KvrtHybridLayer(_HybridBase, KvrtLayer):
        """A "hybrid" layer (Falcon-H1, Zamba2: attention beside an SSM in one layer): its
        attention in kvrt, its SSM's conv and recurrent states in transformers' own layer."""

        # kvrt's answers where both define one: the attention's tokens cannot be cropped or
        # reordered (beam search), so neither are the SSM's.
        is_compileable = False
        is_croppable = False
        crop = KvrtLayer.crop
        reorder_cache = KvrtLayer.reorder_cache
        get_max_length = KvrtLayer.get_max_length

        def __init__(self, cache: "KvrtCache", kvrt_layer: int, number_of_states: int = 1):
            KvrtLayer.__init__(self, cache, kvrt_layer)
            _HybridBase.__init__(self, number_of_states=number_of_states)

        def lazy_initialization(self, *args, **kwargs) -> None:
            if not args:  # the SSM's states (keywords); the attention part holds nothing
                _HybridBase.lazy_initialization(self, **kwargs)

        def reset(self) -> None:
            _HybridBase.reset(self)
            KvrtLayer.reset(self)

        def get_seq_length(self) -> int:
            return KvrtLayer.get_seq_length(self)

        def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
            return KvrtLayer.get_mask_sizes(self, query_length)
else:
    KvrtHybridLayer = None


class KvrtCache(DynamicCache):
    """A transformers Cache whose global layers live in kvrt (one kvrt Sequence per batch row)
    and whose sliding-window layers are transformers' own. Build it with kvrt.hf.enable(model,
    ...) or KvrtCache(model, ...) after register(); a new cache (or reset()) per generation.

    Attributes: runtime (the kvrt.Runtime; one the cache made is remade, before any token
    enters it, when the model's first attention call passes another scale than its modules'
    `scaling` attribute, as OPT's does), sequences (one per batch row, after the prompt),
    layer_map ({model layer: kvrt layer}), time_prefill_s / time_decode_s (host seconds in kvrt
    calls; the device work they enqueue on the current stream is not waited for, so that the host
    runs ahead into the next layer as it does for transformers' own attention; a prompt's index is
    built in the background, so its time falls in the first decode calls, time_decode_s). Of a
    prompt's queries only the rows kvrt reads cross to its side (kvrt_prefill_query_rows: for the
    kinds that build from queries, 4096 per kv head over its q heads; none for the others).

    chunked_prompt: the prompt may come in several forwards of more than one token (generate's
    prefill_chunk_size). Their K/V stay on the model's device, each chunk attends every chunk so
    far (SDPA, exact), and the first single-token forward prefills kvrt with the whole prompt:
    the device holds the prompt's K/V of the kvrt layers until then. kvrt_prefill's query sample
    (the cluster and attention-aware kinds build from the prompt's queries) is taken from up to
    2 x 4096 evenly spaced prompt queries kept meanwhile."""

    _QUERY_KEEP = 8192  # prompt queries kept per layer for the query sample (chunked_prompt)

    def __init__(self, model, config: Optional[Config] = None, runtime: Optional[Runtime] = None,
                 *, chunked_prompt: bool = False, mla: str = "latent", **options: Any):
        super().__init__(config=model.config)
        # The config asked for (the attention modules' scale), kept to remake the runtime when
        # the first attention call passes another scale (see _check_scale). First: it refuses
        # the models kvrt cannot serve before their cache layers are touched.
        self._requested = (runtime_config(model, config, mla=mla, **options) if runtime is None
                           else None)
        if mla not in MLA_FORMS:
            raise ValueError(f"kvrt.hf: mla={mla!r} is not one of {MLA_FORMS}")
        self.chunked_prompt = chunked_prompt
        # kvrt layer -> the prompt so far (chunked_prompt): k, v [B, Hkv, tokens, d] as the model
        # gives them, kept queries [B, m, Hq, d] (a list of chunks), their stride, tokens seen.
        self._prompt: dict[int, dict[str, Any]] = {}
        self.layer_map = {src: i for i, src in enumerate(kvrt_layers(model.config))}
        for src, kl in self.layer_map.items():
            if layer_types(model.config)[src] == "hybrid":
                # As many SSM states as the layer transformers made for it.
                states = getattr(self.layers[src], "number_of_states", 1)
                layer = KvrtHybridLayer(self, kl, states)
            else:
                layer = KvrtLayer(self, kl)
            layer.layer_idx = src
            if src >= len(self.layers):
                raise ValueError(f"kvrt.hf: transformers' cache for this model has "
                                 f"{len(self.layers)} layers, not one per layer: its layer {src} "
                                 "shares another's cache, which kvrt does not serve")
            self.layers[src] = layer
        self.runtime = runtime or Runtime(self._requested)
        self._owns_runtime = runtime is None
        self._tdt = _TORCH_DTYPES[self.runtime.config.dtype]
        self._on_gpu = self.runtime.config.use_gpu == 1
        self._heads = (self.runtime.config.num_q_heads, self.runtime.config.num_kv_heads)
        self._width = self.runtime.config.head_dim
        # Multi-head latent attention held as its latent: its dims and, per kvrt layer,
        # kv_b_proj's key and value rows (_latent_maps).
        mods = _attention_modules(model)
        self._mla = mla_dims(model, None, mods) if mla == "latent" else None
        self._maps = {}
        self._latent_modules: list = []  # weak references: the modules whose latent is kept
        self._closed = False
        self._warned_weights = False  # output_attentions=True warned about (attention())
        for src, kl in self.layer_map.items():
            if src in mods:
                _forget_attended_on_forward(mods[src])
            if self._mla is not None:
                self._maps[kl] = _latent_maps(mods[src], self._heads[0], self._mla)
                _keep_latent(mods[src], self)
                self._latent_modules.append(weakref.ref(mods[src]))
        self.sequences: list[Sequence] = []
        self._prefilled: set[int] = set()
        # The prompt's length with its pads and each row's pads (the keys kvrt never held).
        self._prompt_shape: Optional[tuple[int, list[int]]] = None
        self.time_prefill_s = 0.0
        self.time_decode_s = 0.0
        self.tokens_decoded = 0

    # -- cache protocol ------------------------------------------------------------------------
    def reset(self):
        """Releases the sequences: the next forward starts a new prompt."""
        # transformers' own layers (a sliding window's) hold tensors generate() made under
        # inference mode; some versions zero them in place, which outside that mode raises.
        with torch.inference_mode():
            super().reset()
        pending = getattr(_pending, "layers", None)
        for src, layer in list((pending or {}).items()):
            if getattr(layer, "cache", None) is self:  # an interrupted forward's
                del pending[src]
        for s in self.sequences:
            s.release()
        self.sequences = []
        self._prefilled.clear()
        self._prompt.clear()
        self._prompt_shape = None

    def close(self) -> None:
        """Releases the sequences and, when the cache created it, the runtime."""
        self.reset()
        self._closed = True
        for ref in self._latent_modules:  # an interrupted forward's latent
            m = ref()
            if m is not None:
                m.__dict__.pop("_kvrt_latent", None)
        if self._owns_runtime:
            self.runtime.close()

    def stats(self) -> Stats:
        return self.runtime.stats()

    # -- the attention -------------------------------------------------------------------------
    def _rows(self, t: torch.Tensor) -> torch.Tensor:
        """[B, H, n, d] -> [B, n, H, width] in kvrt's dtype, contiguous, on kvrt's side; a d
        below the runtime's head_dim (MLA's values) padded with zeros."""
        t = t.transpose(1, 2).to(self._tdt)
        if t.shape[-1] < self._width:
            t = torch.nn.functional.pad(t, (0, self._width - t.shape[-1]))
        if not self._on_gpu and t.device.type != "cpu":
            # Laid out on the device, then one copy into pinned memory (torch's caching host
            # allocator keeps it for the next layer): a prompt's K for DeepSeek-V2-Lite's latent is
            # 38 MB at 32K (its q, 600 MB, before only the sampled rows were copied), which .cpu()
            # copied into pageable memory at 2.6 GB/s on an H100 machine, and whose transposed
            # rows it left the host to reorder.
            t = t.contiguous()
            if t.device.type != "cuda":
                return t.cpu()
            host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
            host.copy_(t, non_blocking=True)
            torch.cuda.current_stream(t.device).synchronize()
            return host
        return t.contiguous()

    def _check_scale(self, layer_idx: int, scaling: Optional[float], d: int) -> None:
        """The score scale a layer's attention call asks for (None: SDPA's 1/sqrt(d)) against the
        runtime's. Some models pre-scale q and pass scaling=1.0 (OPT, XGLM, ...), which the
        modules' `scaling` attribute, read at enable(), does not show: before any token entered
        kvrt, a runtime this cache made is remade with the call's scale; after, or for a runtime
        given to the cache, another scale is an error (kvrt has one scale per runtime)."""
        want = d ** -0.5 if scaling is None else float(scaling)
        have = self.runtime.config.scale
        if math.isclose(want, have, rel_tol=1e-6):
            return
        if self._owns_runtime and not self.sequences and not self._prompt:
            self.runtime.close()
            self.runtime = Runtime(make_config(self._requested, scale=want))
            return
        raise ValueError(
            f"kvrt.hf: layer {layer_idx} attends with score scale {want:g}, the kvrt runtime's "
            f"is {have:g}: layers with different scales, or a runtime made for another model")

    def _prompt_chunk(self, kl: int, n: int) -> bool:
        """Whether a forward of n tokens on kvrt layer kl is a chunk of a chunked prompt."""
        return self.chunked_prompt and kl not in self._prefilled and n > 1

    def _attend_prompt_chunk(self, layer: KvrtLayer, module, query, key, value, attention_mask,
                             held, **kwargs):
        """SDPA of a prompt chunk over the prompt so far; the chunk's K/V and some of its queries
        are kept for the prefill (held: q, k, v as kvrt holds them, see _attend)."""
        kl, n = layer.kvrt_layer, query.shape[2]
        p = self._prompt.get(kl)
        if p is None:
            p = self._prompt[kl] = {"k": key, "v": value, "q": [], "stride": 1, "seen": 0}
        else:
            p["k"] = torch.cat((p["k"], key), dim=2)
            p["v"] = torch.cat((p["v"], value), dim=2)
        if self._mla is not None:  # the latent beside the K/V that SDPA attends
            kept = (("lk", held[1]),) if held[2] is held[1] else (("lk", held[1]), ("lv", held[2]))
            for name, t in kept:
                p[name] = t if name not in p else torch.cat((p[name], t), dim=2)
        out = _sdpa(module, query, p["k"], p["v"], attention_mask, **kwargs)
        # Queries at positions that are multiples of the stride; the stride doubles (dropping
        # every other kept query) whenever more than _QUERY_KEEP are kept.
        first = (-p["seen"]) % p["stride"]
        p["q"].append(self._rows(held[0][:, :, first::p["stride"]]))
        p["seen"] += n
        kept = sum(t.shape[1] for t in p["q"])
        while kept > self._QUERY_KEEP:
            q_all = torch.cat(p["q"], dim=1)
            p["q"] = [q_all[:, ::2].contiguous()]
            p["stride"] *= 2
            kept = p["q"][0].shape[1]
        layer.tokens += n
        return out

    def _prefill_chunked(self, kl: int) -> None:
        """kvrt's prefill of the chunked prompt of layer kl (then its K/V leave the device)."""
        p = self._prompt.pop(kl)
        k, v = p.pop("k"), p.pop("v")
        if "lk" in p:  # the latent (its value the key itself when there is no "lv")
            k, v = p.pop("lk"), p.pop("lv", None)
        k = self._rows(k)
        v = k if v is None else self._rows(v)
        kept = torch.cat(p["q"], dim=1)
        # The rows kvrt reads queries of (kvrt_prefill_query_rows) get the kept query nearest
        # before each: the sample of the prompt's queries as kvrt would take it from all.
        count, stride = self.runtime.prefill_query_rows(k.shape[1])
        at = torch.clamp(torch.arange(count, device=kept.device) * stride // p["stride"],
                         max=kept.shape[1] - 1)
        q = kept.index_select(1, at)
        self._prefill(kl, [q[b] if count else None for b in range(k.shape[0])], k, v)

    def _query_sample(self, q: torch.Tensor, keep: Optional[torch.Tensor]) -> list:
        """Per batch row, the prompt's queries that kvrt reads (kvrt_prefill_query_rows, of the
        row's real tokens), as kvrt holds them: [m, Hq, width], or None when it reads none. q:
        [B, Hq, n, d] on the model's device. The copy to kvrt's side is of these rows only (a
        128K prompt of DeepSeek-V2-Lite's latent: 256 rows of 131072, 2.4 GB per layer)."""
        B, n = q.shape[0], q.shape[2]
        full = keep is None or bool(keep.all())
        lens = [n] * B if full else [int(r.sum()) for r in keep]
        picks = []
        for b in range(B):
            count, stride = (0, 1) if lens[b] == 0 else self.runtime.prefill_query_rows(lens[b])
            rows = torch.arange(count, device=q.device) * stride
            if not full and count:
                rows = keep[b].nonzero().squeeze(1).to(q.device)[rows]
            picks.append(rows)
        if full:  # the same rows of every batch row: one copy
            rows = self._rows(q.index_select(2, picks[0])) if picks[0].numel() else None
            return [None if rows is None else rows[b] for b in range(B)]
        return [self._rows(q[b:b + 1].index_select(2, r))[0] if r.numel() else None
                for b, r in enumerate(picks)]

    def _prefill(self, kl: int, qs: list, k: torch.Tensor, v: torch.Tensor,
                 keep: Optional[torch.Tensor] = None) -> None:
        """kvrt_prefill of layer kl for every batch row: k, v [B, n, Hkv, d] (kvrt's rows), qs
        per batch row the sampled queries of its real tokens (_query_sample) or None; makes the
        sequences at the first prefill. keep [B, n] (bool, or None for all): the rows' real
        tokens; padding never enters kvrt (it has no attention mask), so a padded row holds only
        its own tokens, as the model's mask would have it."""
        import time
        B = k.shape[0]
        if not self.sequences:
            self.sequences = [self.runtime.sequence() for _ in range(B)]
        elif len(self.sequences) != B:
            raise ValueError(f"kvrt.hf: batch size changed from {len(self.sequences)} to {B}")
        # Every row checked before any enters kvrt: a refusal half-way left the first rows
        # prefilled and the cache unusable until reset().
        real = [k.shape[1]] * B if keep is None else [int(keep[b].sum()) for b in range(B)]
        for b, count in enumerate(real):
            if count == 0:
                raise ValueError(f"kvrt.hf: batch row {b} of the prompt is all padding")
        if not self._prefilled:
            self._prompt_shape = (k.shape[1], [k.shape[1] - count for count in real])
        t0 = time.perf_counter()
        for b, s in enumerate(self.sequences):
            if keep is None or real[b] == k.shape[1]:
                s.prefill(kl, qs[b], k[b], v[b], sampled=True)
            else:
                at = keep[b].nonzero().squeeze(1).to(k.device)
                s.prefill(kl, qs[b], k[b].index_select(0, at), v[b].index_select(0, at),
                          sampled=True)
        self.time_prefill_s += time.perf_counter() - t0
        self._prefilled.add(kl)

    def _check_decode_mask(self, total: int) -> None:
        """After the prompt kvrt attends every key it holds: a forward whose padding mask (the
        2D mask the mask builder saw, [B, total]) hides a key kvrt holds, new pads or holes over
        earlier tokens, would be answered as if unmasked. A ValueError instead; the prompt's own
        pads, which never entered kvrt, may stay masked."""
        padding = getattr(_pending, "padding", None)
        if padding is None or self._prompt_shape is None or padding.dim() != 2:
            return
        B = len(self.sequences)
        if padding.shape[0] != B or padding.shape[1] != total:
            return  # not this forward's mask (another model's, or one sliced otherwise)
        prompt, pads = self._prompt_shape
        hidden = ~padding.bool()
        # One read back per forward: each row's hidden keys, all and past the prompt.
        counts = torch.stack((hidden.sum(dim=1), hidden[:, prompt:].sum(dim=1))).tolist()
        if any(counts[1]) or counts[0] != pads:
            raise ValueError(
                "kvrt.hf: the attention mask hides keys after the prompt (padding in new tokens, "
                "or holes over earlier ones); kvrt attends every key it holds past the prompt's "
                "own padding, so it cannot honour this mask: pass new tokens unpadded (a batch "
                "row per sequence of its own length: one forward per length), or use "
                "DynamicCache")

    def _latent(self, layer: KvrtLayer, module, query, key, value):
        """An MLA layer's q, k, v as kvrt holds them: q [B, H, n, rank + rope] (each head's nope
        part through its key rows of kv_b_proj, then its rope part), k [B, 1, n, rank + rope] (the
        latent, then the rope key all heads share), v: k itself (values_are_keys: the output's
        first rank dims are the weighted latent), or the latent [B, 1, n, rank] for a runtime
        given to the cache without values_are_keys."""
        rank, nope, rope, _ = self._mla
        c = module.__dict__.pop("_kvrt_latent", None)
        B, _, n, d = query.shape
        # [B, n, rank], or with a head axis of 1 as some versions shape it ([B, 1, n, rank]).
        if c is not None and c.shape[0] == B and c.shape[-1] == rank and c.numel() == B * n * rank:
            c = c.reshape(B, n, rank)
        if c is None or tuple(c.shape) != (B, n, rank) or d != nope + rope:
            raise RuntimeError(
                f"kvrt.hf: layer {layer.layer_idx}'s latent attention (q/k head_dim {d}) did not "
                f"pass kv_b_proj a latent of [{B}, {n}, {rank}] in this forward (got "
                f"{None if c is None else tuple(c.shape)}); pass mla=\"expanded\"")
        w_k, _ = self._maps[layer.kvrt_layer]
        c = c.to(query.dtype)
        q = torch.cat((torch.matmul(query[..., :nope], w_k.to(query.dtype)), query[..., nope:]),
                      dim=-1)
        k = torch.cat((c.unsqueeze(1), key[:, :1, :, nope:]), dim=-1)
        if layer.kvrt_layer not in self._prefilled:
            self._check_latent(layer, c, key, value)
        # The value: the latent, which the key holds as its first rank dims (a runtime of
        # values_are_keys, runtime_config's, does not read it).
        return q, k, (k if self.runtime.config.values_are_keys else c.unsqueeze(1))

    def _check_latent(self, layer: KvrtLayer, c, key, value) -> None:
        """On the prompt, before any token enters kvrt: the model's keys and values are
        kv_b_proj's expansion of the latent kept (its first tokens) and every head has the same
        rope key, as the latent form assumes; else a ValueError naming the difference."""
        _, nope, _, dv = self._mla
        w_k, w_v = self._maps[layer.kvrt_layer]
        m = min(c.shape[1], 16)
        part = c[:, None, :m]
        got = (torch.matmul(part, w_k.transpose(1, 2).to(c.dtype)),
               torch.matmul(part, w_v.transpose(1, 2).to(c.dtype)))
        rope = key[:, :, :m, nope:]
        pairs = zip(got + (rope,), (key[:, :, :m, :nope], value[:, :, :m, :dv], rope[:, :1]))
        diff = max(float((g.float() - w.float()).abs().max() /
                         w.float().abs().max().clamp_min(1e-30)) for g, w in pairs)
        if diff > (1e-3 if c.dtype == torch.float32 else 3e-2):
            raise ValueError(
                f"kvrt.hf: layer {layer.layer_idx}'s keys and values are not kv_b_proj's expansion "
                f"of the latent it was given, or its heads' rope keys differ (relative difference "
                f"{diff:.3g}): kvrt cannot hold this attention as its latent; pass "
                "mla=\"expanded\"")

    def _from_latent(self, layer: KvrtLayer, out, query):
        """kvrt's output over the latent [B, n, H, width] -> each head's through its value rows
        of kv_b_proj: [B, n, H, v_head_dim] in query's dtype, on its device."""
        rank = self._mla[0]
        _, w_v = self._maps[layer.kvrt_layer]
        lat = out[..., :rank].to(device=query.device, dtype=query.dtype).transpose(1, 2)
        return torch.matmul(lat, w_v.transpose(1, 2).to(query.dtype)).transpose(1, 2).contiguous()

    def _attend(self, layer: KvrtLayer, module, query, key, value, attention_mask, **kwargs):
        import time
        d = query.shape[-1]
        kl = layer.kvrt_layer
        _refuse_unsupported(layer.layer_idx, kwargs)
        self._check_scale(layer.layer_idx, kwargs.get("scaling"), d)
        if kl not in self._prefilled:
            _refuse_bias(layer.layer_idx, attention_mask)
        # q, k, v as kvrt holds them: the latent's for MLA held as its latent, else the model's.
        held = (self._latent(layer, module, query, key, value) if self._mla is not None
                else (query, key, value))
        B, Hq, n, dk = held[0].shape
        dv = held[2].shape[-1]
        if held[1].shape[-1] != dk or max(dk, dv) != self._width:
            raise ValueError(
                f"kvrt.hf: layer {layer.layer_idx} attends with q/k head_dim {dk} "
                f"(k: {held[1].shape[-1]}) and v head_dim {dv}; the kvrt runtime's head_dim is "
                f"{self._width}: a runtime made for another model (or another mla form)")
        if (Hq, held[1].shape[1]) != self._heads:
            # NOTE: kvrt would refuse the shapes too, but not say why: under tensor parallelism
            # the heads a rank computes are its shard, and the runtime must have been made for it.
            raise ValueError(
                f"kvrt.hf: layer {layer.layer_idx} computes {Hq} q / {held[1].shape[1]} kv heads, "
                f"the kvrt runtime serves {self._heads[0]} / {self._heads[1]} (read from the "
                "model's config, or this rank's share of it): a model whose attention computes "
                "other heads than its config says, or a runtime made for another model or shard")
        if self._prompt_chunk(kl, n):
            if _padded_keys(attention_mask) is not None:
                raise ValueError(
                    "kvrt.hf: a chunked prompt (chunked_prompt=True) with padded batch rows is not "
                    "supported; pass rows of one length, or a batch of one")
            return self._attend_prompt_chunk(layer, module, query, key, value, attention_mask,
                                             held, **kwargs)
        if kl in self._prompt:  # the first single-token forward after a chunked prompt
            self._prefill_chunked(kl)
        if kl not in self._prefilled:
            # kvrt_prefill first: it queues its copies behind what the caller's stream holds and
            # returns, so that its background job (the GPU build, the copy into the host store)
            # runs beside this layer's attention over the prompt instead of after it: the last
            # layer's job was what the first decode token waited for.
            k = self._rows(held[1])
            keep = _padded_keys(attention_mask)
            self._prefill(kl, self._query_sample(held[0], keep), k,
                          k if held[2] is held[1] else self._rows(held[2]), keep)
            out = _sdpa(module, query, key, value, attention_mask, **kwargs)
            layer.tokens += n
            return out
        if len(self.sequences) != B:
            raise ValueError(f"kvrt.hf: batch size changed from {len(self.sequences)} to {B}")
        if kl == 0:  # one check per forward: every layer gets the same mask
            self._check_decode_mask(layer.tokens + n)
        q, k = self._rows(held[0]), self._rows(held[1])
        v = k if held[2] is held[1] else self._rows(held[2])
        out = torch.empty((B, n, Hq, self._width), dtype=torch.float32, device=q.device)
        sinks = kwargs.get("s_aux")
        # Learned attention sinks (gpt-oss): the layer's lse comes back beside out.
        lse = None if sinks is None else torch.empty((B, n, Hq), dtype=torch.float32,
                                                     device=q.device)
        t0 = time.perf_counter()
        # One call per layer-step (append + attend): the binding's cost is paid once.
        for i in range(n):
            if B == 1:
                self.sequences[0].append_attend(kl, q[0, i], k[0, i:i + 1], v[0, i:i + 1],
                                                out=out[0, i],
                                                lse=None if lse is None else lse[0, i])
            else:
                rows = out[:, i].contiguous()
                lse_rows = None if lse is None else lse[:, i].contiguous()
                self.runtime.append_attend_batch(self.sequences, kl, q[:, i].contiguous(),
                                                 k[:, i].contiguous(), v[:, i].contiguous(),
                                                 out=rows, lse=lse_rows)
                out[:, i] = rows
                if lse is not None:
                    lse[:, i] = lse_rows
        if lse is not None:
            # A sink s is one more logit in each softmax with a zero value: the output over the
            # tokens shrinks by e^lse / (e^lse + e^s).
            out.mul_(torch.sigmoid(lse - sinks.to(device=out.device, dtype=torch.float32))
                     .unsqueeze(-1))
        self.time_decode_s += time.perf_counter() - t0
        if kl == 0:
            self.tokens_decoded += n * B
        layer.tokens += n
        if self._mla is not None:
            return self._from_latent(layer, out, query), None
        if dv < self._width:
            out = out[..., :dv]
        return out.to(device=query.device, dtype=query.dtype).contiguous(), None


def _refuse_bias(layer_idx: int, attention_mask) -> None:
    """An additive mask holding values other than 0 and "masked" (ALiBi folded into the mask by
    Falcon, a relative position bias) is a score bias kvrt's softmax does not have: checked on
    the prompt's forwards (one reduction each), before any token enters kvrt."""
    m = attention_mask
    if not isinstance(m, torch.Tensor) or not m.dtype.is_floating_point:
        return
    if bool(((m != 0) & (m > torch.finfo(m.dtype).min / 2)).any()):
        raise ValueError(f"kvrt.hf: layer {layer_idx}'s attention mask adds a bias to the scores "
                         "(ALiBi or a position bias), which kvrt does not support")


def _refuse_unsupported(layer_idx: int, kwargs: dict) -> None:
    """Attention variants a model may ask of a kvrt layer that kvrt's exact softmax over every
    token would silently get wrong: raised instead. (Learned sinks, s_aux, are served: the
    layer's lse from kvrt takes them exactly.)"""
    sinks = kwargs.get("s_aux")
    if sinks is not None and (not isinstance(sinks, torch.Tensor) or sinks.dim() != 1):
        raise ValueError(f"kvrt.hf: layer {layer_idx} passes learned attention sinks (s_aux) "
                         "that are not one logit per q head")
    if kwargs.get("softcap"):
        raise ValueError(f"kvrt.hf: layer {layer_idx} asks for attention logit soft-capping "
                         f"(softcap = {kwargs['softcap']}), which kvrt does not support")
    if kwargs.get("sliding_window") is not None:
        raise ValueError(f"kvrt.hf: layer {layer_idx} asks for a sliding window of "
                         f"{kwargs['sliding_window']} tokens; kvrt serves full-attention layers")


def attention(module, query, key, value, attention_mask, **kwargs):
    """The attention function registered as "kvrt": kvrt for a global layer whose KvrtCache was
    just updated, transformers' SDPA for every other call."""
    layers = getattr(_pending, "layers", None)
    idx = getattr(module, "layer_idx", None)
    layer = layers.pop(idx, None) if layers else None
    attended = getattr(_pending, "attended", None)
    if attended is None:
        attended = _pending.attended = {}
    if layer is None:
        # Not a kvrt layer's call, unless the model indexes its cache and its attention apart
        # or attends twice per update: kvrt would answer either from the wrong tokens.
        if layers:
            raise RuntimeError(
                f"kvrt.hf: the attention of layer {idx} ran while kvrt layer(s) {sorted(layers)} "
                "had updated the cache without attending: the model indexes its cache apart from "
                "its attention modules (recurrent or shared layers), which kvrt does not serve")
        last = attended.get(idx)
        if idx is not None and last is not None and last() is module:
            raise RuntimeError(
                f"kvrt.hf: layer {idx} calls the attention function more than once per cache "
                "update (e.g. differential attention), which kvrt does not serve")
        return _sdpa(module, query, key, value, attention_mask, **kwargs)
    attended[idx] = weakref.ref(module)  # not kept alive past its model
    if kwargs.get("output_attentions") and not layer.cache._warned_weights:
        # As transformers' SDPA does: a warning (once per cache), and the attentions stay empty.
        # kvrt has no [queries, keys] weights to give: it attends a selection of its tokens.
        layer.cache._warned_weights = True
        import warnings
        warnings.warn("kvrt.hf: output_attentions=True is not supported: kvrt attends a "
                      "selection of the tokens it holds and returns no attention weights, so "
                      "the output's attentions stay empty", stacklevel=2)
    return layer.attend(module, query, key, value, attention_mask, **kwargs)


def _sdpa(module, query, key, value, attention_mask, **kwargs):
    """transformers' SDPA, except for a causal forward of n > 1 queries over more keys (a prompt
    chunk after earlier ones) without a mask (mask() left it out): the queries are the last n
    positions, so the causal mask is aligned to the lower right, which SDPA's is_causal (upper
    left) is not; torch's causal_lower_right bias runs it without a mask tensor. With learned
    sinks (s_aux), which SDPA has no term for: _attend_with_sinks."""
    n, s = query.shape[2], key.shape[2]
    causal = kwargs.get("is_causal")
    causal = getattr(module, "is_causal", True) if causal is None else causal
    if kwargs.get("s_aux") is not None:
        return _attend_with_sinks(query, key, value, attention_mask, causal, **kwargs)
    if attention_mask is not None or n == 1 or n == s or not causal:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    from torch.nn.attention.bias import causal_lower_right
    key, value, gqa = _gqa(query, key, value)
    out = torch.nn.functional.scaled_dot_product_attention(
        query, key, value, attn_mask=causal_lower_right(n, s), scale=kwargs.get("scaling"), **gqa)
    return out.transpose(1, 2).contiguous(), None


def _gqa(query, key, value):
    """key, value and SDPA's keyword for a group of q heads per kv head: enable_gqa since torch
    2.5, the kv heads repeated before it (as transformers' repeat_kv)."""
    group = query.shape[1] // key.shape[1]
    if group <= 1:
        return key, value, {}
    if tuple(int(x) for x in torch.__version__.split(".")[:2]) < (2, 5):
        return key.repeat_interleave(group, 1), value.repeat_interleave(group, 1), {}
    return key, value, {"enable_gqa": True}


# Queries per SDPA call where a mask tensor is used: SDPA turns a boolean mask into a float bias
# of [queries, keys] per call, so a long prompt goes in blocks of at most this many mask entries.
_MASK_BLOCK_ENTRIES = 1 << 26


def _attend_with_sinks(query, key, value, attention_mask, causal: bool, *, s_aux,
                       scaling=None, sliding_window=None, **_):
    """Softmax attention with one learned logit per q head (s_aux: gpt-oss's `sinks`) in each
    softmax's denominator and no value, through torch's SDPA (its fused kernels: no [n, keys]
    score matrix, so a long prompt fits as it does without sinks; _sink_sdpa says how). The masks
    mask() leaves out are made here: causal aligned to the lower right (the queries are the last
    n positions) and, for a sliding layer, its window. Where a mask tensor is used the queries go
    in blocks (a sliding layer's block attends only the keys its window can reach)."""
    n, s = query.shape[2], key.shape[2]
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling
    window = sliding_window if sliding_window is not None and s > sliding_window else None
    if attention_mask is not None and attention_mask.shape[-1] == 1 and s > 1:
        # A mask of one key column broadcasts over the keys (as eager's addition does).
        attention_mask = attention_mask.expand(*attention_mask.shape[:-1], s)
    masked = attention_mask is not None or (window is not None and causal and n > 1)
    block = max(1, _MASK_BLOCK_ENTRIES // (s + 1))
    if not masked or n <= block:
        return _sink_sdpa(query, key, value, attention_mask, causal, s_aux, scale, window), None
    outs = []
    for a in range(0, n, block):
        b = min(n, a + block)
        # Causal: query a + i sits at key position s - n + a + i, so the block's keys lie in
        # [lo, hi) (lo > 0 only under a window) and its queries are the last b - a of them. A
        # given mask hides at least what causality and the window hide: its slice is exact.
        lo, hi = 0, s
        if causal:
            hi = s - n + b
            lo = max(0, s - n + a - window + 1) if window is not None else 0
        k, v = key[:, :, lo:hi], value[:, :, lo:hi]
        if attention_mask is not None:
            m = attention_mask[..., lo:hi]
            m = m if m.shape[-2] == 1 else m[..., a:b, :]
            outs.append(_sink_sdpa(query[:, :, a:b], k, v, m, causal, s_aux, scale, None))
        else:
            outs.append(_sink_sdpa(query[:, :, a:b], k, v, None, causal, s_aux, scale, window))
    return torch.cat(outs, dim=1), None


def _sink_sdpa(query, key, value, attention_mask, causal: bool, s_aux, scale: float,
               window: Optional[int]) -> torch.Tensor:
    """One SDPA call of _attend_with_sinks, [B, n, heads, d] out. The sink is one more key,
    first, with a zero value, whose score is the head's logit: q carries s_h / (scale c) in two
    extra dims (a head and a tail in q's dtype, so that bf16 keeps the logit to ~1e-4), the sink
    key c there (a power of two that keeps q's part within f16's range) and every real key zeros.
    window: the keys a query sees end there (mask None)."""
    B, Hq, n, d = query.shape
    Hkv, s, dv = key.shape[1], key.shape[2], value.shape[-1]
    dt, dev = query.dtype, query.device
    pad = 8  # the extra dims (2 used) keep head_dim a multiple of 8 for the fused kernels
    logit = s_aux.to(device=dev, dtype=torch.float32) / scale
    # On the device (no host sync: sliding layers call this at every decode token).
    c = torch.exp2(torch.clamp(torch.ceil(torch.log2(logit.abs().amax() / 1024.0)), min=0.0))
    logit = logit / c
    head = logit.to(dt)
    tail = (logit - head.float()).to(dt)
    qx = torch.zeros((B, Hq, n, pad), dtype=dt, device=dev)
    qx[..., 0] = head.view(1, Hq, 1)
    qx[..., 1] = tail.view(1, Hq, 1)
    sink_key = torch.zeros((B, Hkv, 1, d + pad), dtype=dt, device=dev)
    sink_key[..., d:d + 2] = c.to(dt)
    q2 = torch.cat([query, qx], dim=-1)
    k2 = torch.cat([sink_key, torch.nn.functional.pad(key, (0, pad))], dim=2)
    v2 = torch.cat([torch.zeros((B, Hkv, 1, dv + pad), dtype=value.dtype, device=dev),
                    torch.nn.functional.pad(value, (0, pad))], dim=2)
    mask = None
    if attention_mask is not None:
        m = attention_mask[..., :s]
        first = torch.ones if m.dtype == torch.bool else torch.zeros
        mask = torch.cat([first((*m.shape[:-1], 1), dtype=m.dtype, device=m.device), m], dim=-1)
    elif n > 1 and causal:
        if window is not None:
            i = torch.arange(n, device=dev).unsqueeze(1) + (s - n)
            j = torch.arange(s, device=dev).unsqueeze(0)
            see = (j <= i) & (j > i - window)
            mask = torch.cat([torch.ones((n, 1), dtype=torch.bool, device=dev), see], dim=-1)
        else:
            from torch.nn.attention.bias import causal_lower_right
            mask = causal_lower_right(n, s + 1)
    k2, v2, gqa = _gqa(q2, k2, v2)
    out = torch.nn.functional.scaled_dot_product_attention(q2, k2, v2, attn_mask=mask,
                                                           scale=scale, **gqa)
    return out[..., :dv].transpose(1, 2).contiguous()


def _padded_keys(attention_mask) -> Optional[torch.Tensor]:
    """[B, keys] bool of the keys some query of the row may attend (False: padding), from the
    mask the attention function receives ([B, 1 or heads, queries, keys]: bool, True = attend,
    or additive, 0 = attend); None when nothing is masked out that way (no mask, or no padding).
    A real key is attended at least by its own query (causal); a pad key by none."""
    if attention_mask is None or attention_mask.dim() != 4:
        return None
    m = attention_mask
    attend = m if m.dtype == torch.bool else m > torch.finfo(m.dtype).min / 2
    keep = attend.any(dim=2).any(dim=1)
    return None if bool(keep.all()) else keep


def mask(*args, **kwargs):
    """The mask builder registered with the attention function: transformers' SDPA mask, except
    that a plain causal mask without padding is left out (None) also when the queries are not the
    first positions: a chunk of a long prompt would otherwise materialise a [chunk, prompt so far]
    mask, which SDPA then turns into a bias (80 GiB for a 64K chunk at 640K tokens), and the
    attention function above aligns the causal mask itself."""
    padding = kwargs.get("attention_mask")
    # For the decode check of the kvrt attention (KvrtCache._check_decode_mask) of this forward.
    _pending.padding = padding
    if (kwargs.get("mask_function", causal_mask_function) is causal_mask_function and
            kwargs.get("allow_is_causal_skip", True) and kwargs.get("local_size") is None and
            not args and (padding is None or bool(padding.all()))):
        return None
    return sdpa_mask(*args, **kwargs)


def register(name: str = ATTENTION_NAME) -> str:
    """Registers the attention function (and its mask builder, mask()) under `name`."""
    AttentionInterface.register(name, attention)
    AttentionMaskInterface.register(name, mask)
    return name


def enable(model, config: Optional[Config] = None, *, chunked_prompt: bool = False,
           mla: str = "latent", **options: Any) -> KvrtCache:
    """Registers "kvrt", switches `model` to it and returns a KvrtCache for one generation.
    `config` / `options` are kvrt.Config fields (index_kind, top_k, sink_tokens, window_tokens,
    search_effort, worker_threads, use_gpu, ...); shapes, dtype and scale come from the model.
    chunked_prompt: see KvrtCache (for generate's prefill_chunk_size). mla: how multi-head latent
    attention is held, "latent" or "expanded" (the module's docstring)."""
    name = register()
    model.set_attn_implementation(name)
    if getattr(_text_config(model.config), "_attn_implementation", name) != name:
        # transformers only warns for a model whose attention is its own code, and keeps it:
        # that attention would see none of the tokens kvrt holds.
        raise ValueError(f"kvrt.hf: {type(model).__name__}'s attention does not go through "
                         "transformers' AttentionInterface, so kvrt cannot serve it")
    return KvrtCache(model, config, chunked_prompt=chunked_prompt, mla=mla, **options)


def cache_kwarg(model) -> str:
    """The name under which this transformers version's generate()/forward() takes a cache:
    "cache" (5.x) or "past_key_values" (4.x)."""
    import inspect
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
