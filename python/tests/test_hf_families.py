"""kvrt.hf on decoder families other than Gemma 3: tiny random models built from each family's
config (no download), exact mode against transformers' own cache, and the attention variants
kvrt cannot serve refused by name instead of answered wrongly (learned attention sinks, gpt-oss,
are served through the lse kvrt returns). Skipped without
torch/transformers; a family this transformers version lacks is skipped."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import kvrt  # noqa: E402
import kvrt.hf as kh  # noqa: E402
from conftest import COMMON, MLA, MLA_MOE  # noqa: E402
from kvrt.testing import sharpen  # noqa: E402

PROMPT, NEW = 200, 6

# family: (config class, model class, config fields over COMMON, reference attention). Chosen for
# what differs in their attention: GQA vs MHA, fused qkv projections (Phi-3, GPT-NeoX, Phi), q/k
# norms (Qwen3, OLMo 2), partial rotary (StableLM, Phi, GLM), a scale other than 1/sqrt(d)
# (Granite), layer types with sliding-window layers transformers keeps (Gemma 2 without
# soft-capping, OLMo 3), a head_dim apart from hidden / heads (Qwen3), learned attention sinks
# (gpt-oss: a logit per head in every softmax, on its sliding layers too; eager is its own
# implementation).
FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}, "sdpa"),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}, "sdpa"),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 64}, "sdpa"),
    "mistral": ("MistralConfig", "MistralForCausalLM", {"sliding_window": None}, "sdpa"),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {}, "sdpa"),
    "granite": ("GraniteConfig", "GraniteForCausalLM", {"attention_multiplier": 0.05}, "sdpa"),
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", {}, "sdpa"),
    "stablelm": ("StableLmConfig", "StableLmForCausalLM", {}, "sdpa"),
    "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM", {"num_key_value_heads": None}, "sdpa"),
    "phi": ("PhiConfig", "PhiForCausalLM", {}, "sdpa"),
    "glm": ("GlmConfig", "GlmForCausalLM", {}, "sdpa"),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", {"head_dim": 64}, "sdpa"),
    "cohere": ("CohereConfig", "CohereForCausalLM", {}, "sdpa"),
    "smollm3": ("SmolLM3Config", "SmolLM3ForCausalLM", {}, "sdpa"),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM",
                  {"head_dim": 32, "num_experts": 2, "num_experts_per_tok": 1,
                   "moe_intermediate_size": 64}, "sdpa"),
    "exaone4": ("Exaone4Config", "Exaone4ForCausalLM",
                {"num_hidden_layers": 4, "sliding_window": 64}, "sdpa"),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM",
               {"head_dim": 64, "attn_logit_softcapping": None, "sliding_window": 64}, "eager"),
    "olmo3": ("Olmo3Config", "Olmo3ForCausalLM",
              {"num_hidden_layers": 4, "sliding_window": 64}, "sdpa"),
    "gpt_oss": ("GptOssConfig", "GptOssForCausalLM",
                {"num_hidden_layers": 4, "head_dim": 32, "sliding_window": 64,
                 "num_local_experts": 2, "num_experts_per_tok": 1}, "eager"),
    # Multi-head latent attention: q/k of 48 dims (32 without rope + 16 rope), v of 24 (padded
    # for kvrt), a q low-rank path (q_b_proj), DeepSeek-V3's yarn attention scale.
    "deepseek_v3": ("DeepseekV3Config", "DeepseekV3ForCausalLM",
                    {**MLA, **MLA_MOE, "n_group": 1, "topk_group": 1,
                     "rope_parameters": {"rope_type": "yarn", "rope_theta": 10000.0,
                                         "factor": 4.0, "original_max_position_embeddings": 1024,
                                         "mscale": 1.0, "mscale_all_dim": 1.0,
                                         "beta_fast": 32.0, "beta_slow": 1.0}}, "sdpa"),
    "deepseek_v2": ("DeepseekV2Config", "DeepseekV2ForCausalLM",
                    {**MLA, **MLA_MOE, "q_lora_rank": None}, "sdpa"),
    "minicpm3": ("MiniCPM3Config", "MiniCPM3ForCausalLM", MLA, "sdpa"),
    "falcon": ("FalconConfig", "FalconForCausalLM",
               {"num_kv_heads": 2, "new_decoder_architecture": True}, "sdpa"),
    # Hybrid: linear-attention layers beside every fourth a full one, whose q_proj also computes
    # an output gate (twice the rows of its heads).
    "qwen3_next": ("Qwen3NextConfig", "Qwen3NextForCausalLM",
                   {"num_hidden_layers": 4, "head_dim": 32}, "sdpa"),
    # "Hybrid" layers: attention beside an SSM in each layer (kvrt's attention, transformers'
    # SSM states in the same cache layer).
    "falcon_h1": ("FalconH1Config", "FalconH1ForCausalLM", {"head_dim": 32}, "sdpa"),
    # Per-layer configs: global layers of head_dim 512 (the config's head_dim is per layer).
    "gemma4": ("Gemma4TextConfig", "Gemma4ForCausalLM", {"num_hidden_layers": 6}, "sdpa"),
    # A value head_dim (128) past q/k's (32; q and k padded for kvrt), learned sinks.
    "mimo_v2_flash": ("MiMoV2FlashConfig", "MiMoV2FlashForCausalLM", {"head_dim": 32}, "eager"),
    # q pre-scaled in the module, scaling=1.0 passed to the attention call.
    "opt": ("OPTConfig", "OPTForCausalLM",
            {"num_key_value_heads": None, "ffn_dim": 256, "word_embed_proj_dim": 128}, "sdpa"),
    "glm4_moe_lite": ("Glm4MoeLiteConfig", "Glm4MoeLiteForCausalLM", {**MLA, **MLA_MOE}, "sdpa"),
}


def _model(family: str, **fields):
    cfg_name, model_name, extra, _ = FAMILIES[family] if family in FAMILIES else (
        *family.split(":"), {}, None)
    cfg_cls, model_cls = getattr(transformers, cfg_name, None), getattr(transformers, model_name,
                                                                         None)
    if cfg_cls is None or model_cls is None:
        pytest.skip(f"transformers {transformers.__version__} has no {model_name}")
    torch.manual_seed(0)
    model = model_cls(cfg_cls(**{**COMMON, **extra, **fields})).eval()
    sharpen(model)  # so that the cold tokens and the sinks matter
    return model


def _switchable(model) -> None:
    """Skips a test of a model whose attention this transformers version cannot switch (its
    own code: Falcon before 5.2x), which kvrt.hf refuses (test_..._bypasses_...)."""
    can = getattr(model, "_can_set_attn_implementation", None)
    if can is not None and not can():
        pytest.skip(f"{type(model).__name__}'s attention is its own code in transformers "
                    f"{transformers.__version__}")


def _greedy(model, cache=None):
    ids = torch.randint(2, 258, (1, PROMPT), generator=torch.Generator().manual_seed(1))
    kw = {} if cache is None else {kh.cache_kwarg(model): cache}
    with torch.inference_mode():
        out = model.generate(ids, max_new_tokens=NEW, do_sample=False, output_logits=True,
                             return_dict_in_generate=True, **kw)
    return out.sequences[0, PROMPT:], torch.stack(out.logits)[:, 0]


def _logits(model, ids, cache=None, new_tokens=4, **generate_kwargs):
    """The logits of a greedy generate of new_tokens after ids [B, n], with `cache` or the
    model's own (generate_kwargs: e.g. attention_mask, prefill_chunk_size)."""
    kw = {} if cache is None else {kh.cache_kwarg(model): cache}
    with torch.inference_mode():
        out = model.generate(ids, max_new_tokens=new_tokens, do_sample=False, output_logits=True,
                             return_dict_in_generate=True, **generate_kwargs, **kw)
    return torch.stack(out.logits)


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(2)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_exact_mode_reproduces_the_full_cache_logits(family):
    model = _model(family)
    _switchable(model)
    model.set_attn_implementation(FAMILIES[family][3])
    ref_tokens, ref = _greedy(model)
    cache = kh.enable(model, index_kind="exact", sink_tokens=4, window_tokens=16,
                      worker_threads=2)
    tokens, got = _greedy(model, cache)
    assert torch.equal(tokens, ref_tokens)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
    # every global layer attended by kvrt at each decode forward after the prompt
    assert cache.stats().attend_calls == len(kh.kvrt_layers(model.config)) * (NEW - 1)
    cache.close()


def test_learned_attention_sinks_matter_in_these_logits():
    # The gpt-oss case above would pass with the sinks ignored if they changed nothing: they do.
    model = _model("gpt_oss")
    model.set_attn_implementation("eager")
    _, ref = _greedy(model)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(getattr(m, "sinks", None), torch.Tensor):
                m.sinks.fill_(-1e4)
    _, unsunk = _greedy(model)
    assert (ref - unsunk).abs().max() > 1e-2


def test_a_batch_with_learned_sinks_equals_the_full_cache():
    # Two rows (attend_batch with lse), a sparse kind at a budget covering every cold token.
    model = _model("gpt_oss")
    model.set_attn_implementation("eager")
    ids = torch.randint(2, 258, (2, PROMPT), generator=torch.Generator().manual_seed(3))
    ref = _logits(model, ids)
    cache = kh.enable(model, index_kind="flat", top_k=100000, sink_tokens=4, window_tokens=16,
                      worker_threads=2)
    torch.testing.assert_close(_logits(model, ids, cache), ref, rtol=1e-4, atol=1e-4)
    cache.close()


def _chunked_or_padded(model, form: str, seed: int, pads: int, **options):
    """kvrt (enable's options) against the model's own cache for a prompt in chunks of 64
    (chunked_prompt; the reference takes it whole) or a batch of two whose second row has `pads`
    left pads (attention_mask). Returns the cache, still open, and the ids."""
    ids = torch.randint(2, 258, (1 if form == "chunked" else 2, PROMPT),
                        generator=torch.Generator().manual_seed(seed))
    extra, opts = {}, {}
    if form == "chunked":
        extra, opts = {"prefill_chunk_size": 64}, {"chunked_prompt": True}
    else:
        mask = torch.ones_like(ids)
        mask[1, :pads] = 0
        ids[1, :pads] = 0
        extra = {"attention_mask": mask}
    ref = _logits(model, ids, **extra) if form == "padded" else _logits(model, ids)
    cache = kh.enable(model, sink_tokens=4, window_tokens=16, worker_threads=2, **opts, **options)
    torch.testing.assert_close(_logits(model, ids, cache, **extra), ref, rtol=1e-4, atol=1e-4)
    return cache, ids


@pytest.mark.parametrize("form", ["chunked", "padded"])
def test_gpt_oss_chunked_prompt_and_padded_rows_equal_the_full_cache(form):
    # The prompt in chunks (each attends the prompt so far with the sinks, lower-right causal)
    # and a batch whose second row is left-padded (the sink attention under a padding mask).
    model = _model("gpt_oss")
    model.set_attn_implementation("eager")
    cache, ids = _chunked_or_padded(model, form, 7, 37, index_kind="exact")
    assert cache.stats().attend_calls == 2 * 3 * ids.shape[0]  # full layers x steps x rows
    cache.close()


@pytest.mark.parametrize("mla", kh.MLA_FORMS)
@pytest.mark.parametrize("form", ["chunked", "padded"])
def test_latent_attention_chunked_prompt_and_padded_rows_equal_the_full_cache(form, mla):
    # MLA held as its latent (one kv head of 32 + 16; q absorbed, the output projected back) or
    # expanded (4 heads, values narrower than keys, padded), through the chunked prompt's
    # prefill and a batch (attend_batch) with a left-padded row, at a sparse kind whose budget
    # covers every cold token.
    model = _model("deepseek_v3")
    cache, _ = _chunked_or_padded(model, form, 5, 29, index_kind="flat", top_k=100000, mla=mla)
    c = cache.runtime.config
    assert (c.num_kv_heads, c.head_dim, c.values_are_keys) == (
        (1, 48, 1) if mla == "latent" else (4, 48, 0))
    assert kh.head_dims(model) == (48, 24) and kh.mla_dims(model) == (32, 32, 16, 24)
    cache.close()


MLA_FAMILIES = ["deepseek_v2", "deepseek_v3", "minicpm3", "glm4_moe_lite"]


@pytest.mark.parametrize("family", MLA_FAMILIES)
def test_latent_attention_held_as_its_latent_equals_the_expanded_form(family):
    # Both forms exact against the model's own cache; the latent holds one 48-wide row per token
    # (its value is its key) where the expanded form holds 4 heads' keys and values (the host
    # store's bytes say so).
    model = _model(family)
    _, ref = _greedy(model)
    held = {}
    for mla in kh.MLA_FORMS:
        cache = kh.enable(model, index_kind="exact", sink_tokens=4, window_tokens=16,
                          worker_threads=2, mla=mla)
        _, got = _greedy(model, cache)
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
        held[mla] = cache.stats().host_bytes
        cache.close()
    assert held["expanded"] == 8 * held["latent"]


def test_latent_attention_whose_keys_are_not_the_expansion_is_refused():
    # A model whose keys are not kv_b_proj of the latent it was given (here scaled after the
    # projection) cannot be held as the latent: refused on the prompt, before kvrt holds a token.
    model = _model("deepseek_v3")
    proj = model.model.layers[0].self_attn.kv_b_proj
    proj.register_forward_hook(lambda mod, args, out: out * 1.5)
    cache = kh.enable(model, index_kind="exact", sink_tokens=4, window_tokens=16)
    with pytest.raises(ValueError, match="not kv_b_proj's expansion.*mla=\"expanded\""):
        _greedy(model, cache)
    assert cache.runtime.stats().host_bytes == 0
    cache.close()
    cache = kh.enable(model, index_kind="exact", sink_tokens=4, window_tokens=16, mla="expanded")
    _greedy(model, cache)
    cache.close()
    with pytest.raises(ValueError, match="mla='compressed' is not one of"):
        kh.enable(model, mla="compressed")


def test_a_latent_past_the_gpu_backends_head_dim_runs_on_the_host_backend(monkeypatch):
    # DeepSeek-V3's latent width (512 + 64) on a CUDA model: the host backend, with a warning that
    # names the expanded form's memory; the expanded form keeps the GPU backend. (Any latent runs
    # there: values_are_keys is the host backend's.)
    model = _model("deepseek_v3", kv_lora_rank=512, qk_rope_head_dim=64)
    monkeypatch.setattr(type(model), "device", property(lambda self: torch.device("cuda", 0)))
    with pytest.warns(UserWarning, match=r"latent \(head_dim 576, its value its key: "
                                         r"values_are_keys\) runs on the host backend only "
                                         r"\(mla=\"expanded\" keeps the GPU backend at \d+x"):
        cfg = kh.runtime_config(model, index_kind="exact")
    assert (cfg.num_kv_heads, cfg.head_dim, cfg.use_gpu, cfg.values_are_keys) == (1, 576, 0, 1)
    with pytest.raises(ValueError, match="use_gpu=1 was given; pass mla=\"expanded\""):
        kh.runtime_config(model, index_kind="exact", use_gpu=1)
    cfg = kh.runtime_config(model, index_kind="exact", mla="expanded", values_are_keys=1)
    assert (cfg.num_kv_heads, cfg.head_dim, cfg.use_gpu, cfg.values_are_keys) == (4, 96, 1, 0)


def test_a_config_whose_heads_do_not_group_is_refused_by_name():
    # GPTBigCode without multi-query reads its kv heads off the config (no k_proj): a count that
    # does not divide the q heads is named before libkvrt would refuse it.
    model = _model("llama")
    model.config.num_key_value_heads = 3
    with pytest.raises(ValueError, match="4 q / 3 kv heads, not whole q heads per kv head"):
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(kh, "_attention_modules", lambda m: {})
            kh.runtime_config(model, index_kind="exact")


def test_full_attention_layers_of_different_shapes_are_refused(monkeypatch):
    # One runtime serves one shape: a per-layer config whose second layer has other kv heads.
    model = _model("llama")
    c = model.config

    class Layer:
        def __init__(self, kv):
            self.num_attention_heads, self.num_key_value_heads = 4, kv
            self.hidden_size, self.head_dim = c.hidden_size, 32

    monkeypatch.setattr(kh, "_layer_config", lambda m, i: Layer(2 if i == 0 else 4))
    with pytest.raises(ValueError, match=r"differ in head dims or kv heads \(layer 0: "
                                         r"\(32, 32\), 2; layer 1: \(32, 32\), 4\)"):
        kh.runtime_config(model, index_kind="exact")


def test_a_kvrt_layer_refuses_head_dims_its_runtime_was_not_made_for():
    model = _model("llama")
    cache = kh.enable(model, index_kind="exact")
    q = torch.zeros(1, 4, 1, 32)
    k = torch.zeros(1, 2, 1, 32)
    with pytest.raises(ValueError, match="v head_dim 48; the kvrt runtime's head_dim is 32"):
        cache.layers[0].attend(model.model.layers[0].self_attn, q, k, torch.zeros(1, 2, 1, 48),
                               None)
    cache.close()


def test_a_model_whose_attention_bypasses_the_attention_interface_is_refused():
    # XGLM computes its own attention: transformers only warns when asked to switch it, and its
    # attention would then never see the tokens kvrt holds.
    model = _model("XGLMConfig:XGLMForCausalLM", num_key_value_heads=None, d_model=128,
                   ffn_dim=256, attention_heads=4, num_layers=2)
    with pytest.raises(ValueError, match="does not go through transformers' AttentionInterface"):
        kh.enable(model, index_kind="exact")
    # A KvrtCache made without enable(): the first decode token's cache update finds the
    # prompt's update never attended through kvrt.
    cache = kh.KvrtCache(model, index_kind="exact", sink_tokens=4, window_tokens=16)
    with pytest.raises(RuntimeError, match="did not call kvrt's attention function"):
        _greedy(model, cache)
    cache.reset()  # drops the interrupted forward's pending layers
    assert not [x for x in getattr(kh._pending, "layers", {}).values() if x.cache is cache]
    cache.close()


@pytest.mark.parametrize("family, match", [
    ("DiffLlamaConfig:DiffLlamaForCausalLM", "more than once per cache update"),
    ("HrmTextConfig:HrmTextForCausalLM", "indexes its cache apart from its attention")])
def test_attention_that_kvrt_would_answer_from_the_wrong_tokens_is_refused(family, match):
    # DiffLlama attends twice per update (two value halves); HRM reuses its modules for cache
    # slots past their own layer index. Both go through the attention interface and raise on the
    # prompt, before any token is generated.
    model = _model(family)
    cache = kh.enable(model, index_kind="exact", sink_tokens=4, window_tokens=16)
    with pytest.raises(RuntimeError, match=match):
        _greedy(model, cache)
    cache.close()


def test_the_models_own_cache_after_a_kvrt_generation():
    # The attention function stays registered after a kvrt generation: a generation with the
    # model's own cache then runs transformers' SDPA (no kvrt layer pending), and is no "second
    # attention call per cache update" (0.3.24 raised that here).
    model = _model("llama")
    ref_tokens, ref = _greedy(model)
    cache = kh.enable(model, index_kind="exact", sink_tokens=4, window_tokens=16,
                      worker_threads=2)
    _greedy(model, cache)
    cache.close()
    tokens, got = _greedy(model)
    assert torch.equal(tokens, ref_tokens)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


def test_a_closed_latent_cache_leaves_no_latent_on_the_modules():
    # The latent's hook keeps kv_b_proj's input for an open cache only: a forward with the
    # model's own cache after close() leaves nothing on the modules (a long prompt's latent).
    model = _model("deepseek_v3")
    cache = kh.enable(model, index_kind="exact", sink_tokens=4, window_tokens=16)
    _greedy(model, cache)
    cache.close()
    _greedy(model)
    assert not [m for m in model.modules() if "_kvrt_latent" in m.__dict__]


def test_a_score_bias_in_the_mask_is_refused_on_the_prompt():
    # Falcon with ALiBi adds the bias to its float mask: kvrt's decode would drop it.
    model = _model("falcon", alibi=True, new_decoder_architecture=False, multi_query=False,
                   num_kv_heads=None, num_key_value_heads=4)
    _switchable(model)
    cache = kh.enable(model, index_kind="exact", sink_tokens=4, window_tokens=16)
    with pytest.raises(ValueError, match="adds a bias to the scores"):
        _greedy(model, cache)
    assert cache.stats().attend_calls == 0
    cache.close()


def test_a_scale_the_runtime_was_not_made_with_is_refused_once_tokens_are_in():
    # OPT's scale (1.0, q pre-scaled) remakes the runtime the cache made at the first call (the
    # "opt" family above); a runtime given to the cache, or a second scale later, is an error.
    model = _model("opt")
    cfg = kh.runtime_config(model, index_kind="exact", sink_tokens=4, window_tokens=16)
    assert cfg.scale != 1.0
    cache = kh.KvrtCache(model, runtime=kvrt.Runtime(cfg))
    model.set_attn_implementation(kh.register())
    with pytest.raises(ValueError, match="score scale 1, the kvrt runtime's is 0.17"):
        _greedy(model, cache)
    cache.reset()
    cache.runtime.close()
    cache = kh.enable(model, index_kind="exact", sink_tokens=4, window_tokens=16)
    _greedy(model, cache)
    assert cache.runtime.config.scale == 1.0
    layer = cache.layers[0]
    q = k = v = torch.zeros(1, 4, 1, 32)
    with pytest.raises(ValueError, match="score scale 0.5, the kvrt runtime's is 1"):
        layer.attend(model.model.decoder.layers[0].self_attn, q, k, v, None, scaling=0.5)
    cache.close()


@pytest.mark.parametrize("family, fields, match", [
    ("Gemma3nTextConfig:Gemma3nForCausalLM",
     dict(num_hidden_layers=10, num_kv_shared_layers=5, head_dim=32, sliding_window=64,
          vocab_size_per_layer_input=258, hidden_size_per_layer_input=16, laurel_rank=8,
          activation_sparsity_pattern=[0.0] * 10), "reuse another layer's K/V"),
    ("xLSTMConfig:xLSTMForCausalLM", dict(num_heads=4), "has no attention modules")])
def test_models_kvrt_cannot_serve_are_refused_at_enable(family, fields, match):
    # Gemma 3n's last layers attend K/V an earlier layer stored; xLSTM has no attention (and no
    # layer types, which would otherwise read as all full attention).
    model = _model(family, **fields)
    with pytest.raises(ValueError, match=match):
        kh.enable(model, index_kind="exact")


@pytest.mark.skipif(kh.KvrtHybridLayer is None, reason="transformers without hybrid layers")
def test_a_hybrid_layer_refuses_what_its_kvrt_part_cannot_do():
    model = _model("falcon_h1")
    cache = kh.enable(model, index_kind="exact")
    layer = cache.layers[kh.kvrt_layers(model.config)[0]]
    assert isinstance(layer, kh.KvrtHybridLayer) and not layer.is_croppable
    with pytest.raises(NotImplementedError, match="cropping"):
        layer.crop(1)
    with pytest.raises(NotImplementedError, match="beam search"):
        layer.reorder_cache(torch.zeros(1, dtype=torch.long))
    cache.close()


def test_a_kvrt_cache_layer_is_not_copied():
    import copy
    model = _model("llama")
    cache = kh.enable(model, index_kind="exact")
    with pytest.raises(NotImplementedError, match="copying a kvrt cache layer"):
        copy.deepcopy(cache.layers[0])
    with pytest.raises(NotImplementedError, match="copying a kvrt cache layer"):
        copy.copy(cache.layers[0])
    cache.close()


def test_soft_capping_is_refused():
    model = _model("Gemma2Config:Gemma2ForCausalLM", head_dim=64)
    with pytest.raises(ValueError, match="soft-capping"):
        kh.enable(model, index_kind="exact")


def test_a_model_of_sliding_window_layers_only_is_refused_with_its_layer_types():
    model = _model("mistral", sliding_window=64)
    with pytest.raises(ValueError, match=r"no full-attention layer.*sliding_attention"):
        kh.enable(model, index_kind="exact")


@pytest.mark.parametrize("kwargs, match", [({"s_aux": torch.zeros(2, 4)}, "s_aux"),
                                           ({"softcap": 30.0}, "soft-capping"),
                                           ({"sliding_window": 64}, "sliding window of 64")])
def test_attention_variants_asked_of_a_kvrt_layer_are_refused(kwargs, match):
    # A model whose config hides the variant still cannot get a wrong answer: the attention call
    # itself is checked.
    model = _model("llama")
    cache = kh.enable(model, index_kind="exact")
    layer = cache.layers[0]
    q = torch.zeros(1, 4, 1, 32)
    k = v = torch.zeros(1, 2, 1, 32)
    with pytest.raises(ValueError, match=match):
        layer.attend(model.model.layers[0].self_attn, q, k, v, None, **kwargs)
    cache.close()


def test_a_head_dim_past_the_gpu_backends_runs_on_the_host_backend(monkeypatch):
    # Gemma 4's global layers (head_dim 512) on a CUDA model: the host backend, with a warning,
    # unless use_gpu is asked for (then the library's own error names the limit).
    model = _model("gemma4")
    monkeypatch.setattr(type(model), "device", property(lambda self: torch.device("cuda", 0)))
    with pytest.warns(UserWarning, match="head_dim 512 is past the GPU backend's 256"):
        cfg = kh.runtime_config(model, index_kind="exact")
    assert (cfg.head_dim, cfg.use_gpu) == (512, 0)
    assert kh.runtime_config(model, index_kind="exact", use_gpu=1).use_gpu == 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("family", ["gpt_oss", "deepseek_v3", "qwen3_next", "gemma4"])
def test_families_on_the_gpu_backend(family, batch):
    # The device path: gpt-oss's lse written by the GPU's merge on the model's stream, the sink
    # applied there; MLA expanded, its padded values (head_dim 48, run padded to 64 on the device;
    # the latent runs on the host backend); Qwen3-
    # Next's gated heads; Gemma 4's head_dim 512 on the host backend from a CUDA model; exact
    # mode, f32, against the model's own attention on the same GPU.
    model = _model(family).to("cuda")
    model.set_attn_implementation(FAMILIES[family][3])
    ids = torch.randint(2, 258, (batch, PROMPT), generator=torch.Generator().manual_seed(5))
    ids = ids.to("cuda")
    ref = _logits(model, ids)
    cache = kh.enable(model, index_kind="exact", sink_tokens=4, window_tokens=16,
                      worker_threads=2, mla="expanded")
    assert cache.runtime.config.use_gpu == (0 if family == "gemma4" else 1)
    torch.testing.assert_close(_logits(model, ids, cache), ref, rtol=1e-3, atol=1e-3)
    cache.close()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("batch", [1, 2])
def test_latent_attention_of_a_cuda_model_on_the_host_backend(batch):
    # MLA held as its latent from a CUDA model: q absorbed and the output projected back on the
    # model's device, kvrt's rows copied to the host backend and back; exact, f32.
    model = _model("deepseek_v3").to("cuda")
    ids = torch.randint(2, 258, (batch, PROMPT), generator=torch.Generator().manual_seed(6))
    ids = ids.to("cuda")
    ref = _logits(model, ids)
    with pytest.warns(UserWarning, match="runs on the host backend only"):
        cache = kh.enable(model, index_kind="exact", sink_tokens=4, window_tokens=16,
                          worker_threads=2)
    assert (cache.runtime.config.use_gpu, cache.runtime.config.values_are_keys) == (0, 1)
    torch.testing.assert_close(_logits(model, ids, cache), ref, rtol=1e-3, atol=1e-3)
    cache.close()


def test_attention_with_sinks_edge_forms():
    # Sinks past f16's range once divided by the scale (the sink key carries a power of two) and a
    # mask of one key column (transformers' for a window of 1), which broadcasts as in eager.
    gpt_oss = pytest.importorskip("transformers.models.gpt_oss.modeling_gpt_oss")
    from types import SimpleNamespace
    torch.manual_seed(1)
    q, k, v = torch.randn(1, 4, 3, 128), torch.randn(1, 2, 11, 128), torch.randn(1, 2, 11, 128)
    see = torch.ones(1, 1, 3, 11, dtype=torch.bool).tril(8)
    for dt, sinks, mask in ((torch.float16, torch.full((4,), 20000.0), see),
                            (torch.float16, torch.tensor([3.0, -2.0, 9000.0, 0.5]), see),
                            (torch.float32, torch.randn(4) + 2, torch.ones(1, 1, 3, 1,
                                                                           dtype=torch.bool))):
        module = SimpleNamespace(sinks=sinks.to(dt), num_key_value_groups=2, training=False)
        bias = torch.zeros(mask.shape, dtype=dt).masked_fill(~mask, torch.finfo(dt).min)
        ref, _ = gpt_oss.eager_attention_forward(module, q.to(dt), k.to(dt), v.to(dt), bias,
                                                 scaling=128 ** -0.5)
        got, _ = kh._attend_with_sinks(q.to(dt), k.to(dt), v.to(dt), mask, True,
                                       s_aux=sinks.to(dt), scaling=128 ** -0.5)
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got.float(), ref.float(), rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("blocks", [False, True])
@pytest.mark.parametrize("case", ["causal", "chunk", "bool_pad", "float_pad", "sliding",
                                  "sliding_chunk", "sliding_pad", "bf16"])
def test_attention_with_sinks_equals_the_models_eager_attention(case, blocks, monkeypatch):
    # kvrt.hf's prompt and sliding-layer path for learned sinks (SDPA with the sink as a first
    # key) against gpt-oss's own eager attention, each mask form the attention call may get;
    # blocks: the queries in blocks of 2, as a long prompt's are where a mask tensor is used.
    if blocks:
        monkeypatch.setattr(kh, "_MASK_BLOCK_ENTRIES", 100)
    gpt_oss = pytest.importorskip("transformers.models.gpt_oss.modeling_gpt_oss")
    from types import SimpleNamespace
    torch.manual_seed(0)
    B, Hq, Hkv, d = 2, 8, 2, 64
    n, s = (16, 48) if case.endswith("chunk") else (40, 40)
    dt = torch.bfloat16 if case == "bf16" else torch.float32
    q, k, v = (torch.randn(B, h, m, d, dtype=dt) for h, m in ((Hq, n), (Hkv, s), (Hkv, s)))
    sinks = (torch.randn(Hq) * 2 + 3).to(dt)
    module = SimpleNamespace(sinks=sinks, num_key_value_groups=Hq // Hkv, training=False)
    i = torch.arange(n).unsqueeze(1) + (s - n)
    j = torch.arange(s).unsqueeze(0)
    see = (j <= i).expand(B, 1, n, s).clone()
    window = 8 if case.startswith("sliding") else None
    if window:
        see &= (j > i - window)
    if case.endswith("pad"):
        see[0, ..., :5] = False  # row 0's first keys are padding
    bias = torch.zeros(see.shape, dtype=dt).masked_fill(~see, torch.finfo(dt).min)
    ref, _ = gpt_oss.eager_attention_forward(module, q, k, v, bias, scaling=d ** -0.5)
    mask = {"bool_pad": see, "sliding_pad": see, "float_pad": bias}.get(case)
    got, _ = kh._attend_with_sinks(q, k, v, mask, True, s_aux=sinks, scaling=d ** -0.5,
                                   sliding_window=window)
    tol = 2e-2 if dt == torch.bfloat16 else 1e-5
    torch.testing.assert_close(got.float(), ref.float(), rtol=tol, atol=tol)
