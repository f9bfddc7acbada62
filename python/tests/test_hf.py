"""transformers integration on the tiny random Gemma 3 (skipped without torch/transformers)."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

import kvrt  # noqa: E402
import kvrt.hf as kh  # noqa: E402
from kvrt.testing import tiny_random  # noqa: E402

PROMPT = 300  # > sinks + window: most of the prompt is cold


def _ids(n=PROMPT, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(2, 258, (1, n), generator=g)


def _logits(model, ids, new_tokens, cache=None):
    """Greedy decoding, one token per forward: logits of each step [new_tokens, vocab]."""
    kw = {} if cache is None else {kh.cache_kwarg(model): cache}
    with torch.inference_mode():
        out = model.generate(ids, max_new_tokens=new_tokens, do_sample=False, output_logits=True,
                             return_dict_in_generate=True, **kw)
    return out.sequences[0, ids.shape[1]:], torch.stack(out.logits)[:, 0]


@pytest.fixture(scope="module")
def model():
    torch.set_num_threads(2)
    return tiny_random()


def test_exact_mode_reproduces_the_full_cache_logits(model):
    ids = _ids()
    model.set_attn_implementation("sdpa")
    ref_tokens, ref = _logits(model, ids, 12)
    cache = kh.enable(model, index_kind="exact", sink_tokens=4, window_tokens=16,
                      worker_threads=2)
    tokens, got = _logits(model, ids, 12, cache)
    assert torch.equal(tokens, ref_tokens)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
    st = cache.stats()
    # 2 global layers; 11 decode forwards after the prompt, each attended by kvrt
    assert st.attend_calls == 2 * 11
    assert st.host_tokens == 2 * (PROMPT + 11 - 4 - 16)
    assert cache.get_seq_length() == PROMPT + 11
    cache.close()


def test_no_layer_keeps_the_prompt_kv_after_the_prompt(model, monkeypatch):
    # kvrt copies what it needs in its calls; a K/V tensor a layer's update() was handed must be
    # free once the forward is done (0.3.20 kept every layer's prompt K/V until its next token).
    import gc
    import weakref
    cache = kh.enable(model, index_kind="exact", sink_tokens=4, window_tokens=16,
                      worker_threads=2)
    handed = []
    update = kh.KvrtLayer.update

    def spy(self, k, v, *args, **kwargs):
        handed.append((weakref.ref(k), weakref.ref(v)))
        return update(self, k, v, *args, **kwargs)

    monkeypatch.setattr(kh.KvrtLayer, "update", spy)
    with torch.inference_mode():
        model(_ids(), **{kh.cache_kwarg(model): cache}, use_cache=True, logits_to_keep=1)
    gc.collect()
    assert len(handed) == 2  # the tiny model's two global layers
    assert all(ref() is None for pair in handed for ref in pair)
    assert cache.get_seq_length() == PROMPT
    cache.close()


def test_exact_mode_batch_of_two_reproduces_the_full_cache_logits(model):
    # Two prompts of one length (no padding): each decode forward is one append_attend_batch
    # per kvrt layer.
    ids = torch.cat([_ids(seed=3), _ids(seed=4)])
    model.set_attn_implementation("sdpa")
    with torch.inference_mode():
        ref = model.generate(ids, max_new_tokens=6, do_sample=False, output_logits=True,
                             return_dict_in_generate=True)
        cache = kh.enable(model, index_kind="exact", sink_tokens=4, window_tokens=16,
                          worker_threads=2)
        got = model.generate(ids, max_new_tokens=6, do_sample=False, output_logits=True,
                             return_dict_in_generate=True, **{kh.cache_kwarg(model): cache})
    assert torch.equal(got.sequences, ref.sequences)
    torch.testing.assert_close(torch.stack(got.logits), torch.stack(ref.logits), rtol=1e-4,
                               atol=1e-4)
    assert len(cache.sequences) == 2 and cache.stats().attend_calls == 2 * 2 * 5
    cache.close()


def test_exact_mode_left_padded_batch_reproduces_the_full_cache_logits(model):
    # Rows of 300 and 260 prompt tokens, the shorter left-padded: its pads never enter kvrt, and
    # every step's logits match transformers' own cache over the same padded batch.
    ids = torch.cat([_ids(seed=5), torch.cat([torch.zeros(1, 40, dtype=torch.long),
                                              _ids(PROMPT - 40, seed=6)], dim=1)])
    am = torch.ones_like(ids)
    am[1, :40] = 0
    model.set_attn_implementation("sdpa")
    kw = dict(attention_mask=am, max_new_tokens=6, do_sample=False, output_logits=True,
              return_dict_in_generate=True)
    with torch.inference_mode():
        ref = model.generate(ids, **kw)
        cache = kh.enable(model, index_kind="exact", sink_tokens=4, window_tokens=16,
                          worker_threads=2)
        got = model.generate(ids, **kw, **{kh.cache_kwarg(model): cache})
    assert torch.equal(got.sequences, ref.sequences)
    torch.testing.assert_close(torch.stack(got.logits), torch.stack(ref.logits), rtol=1e-4,
                               atol=1e-4)
    # kvrt holds each row's real tokens only: 300 and 260 prompt tokens + 5 decode appends.
    assert [s.length(0) for s in cache.sequences] == [PROMPT + 5, PROMPT - 40 + 5]
    cache.close()
    with torch.inference_mode():
        cache = kh.enable(model, index_kind="exact", chunked_prompt=True, worker_threads=2)
        with pytest.raises(ValueError, match="padded batch rows"):
            model.generate(ids, **kw, prefill_chunk_size=128, **{kh.cache_kwarg(model): cache})
    cache.close()


def _exact(model):
    return kh.enable(model, index_kind="exact", sink_tokens=4, window_tokens=16, worker_threads=2)


def test_a_mask_hiding_keys_after_the_prompt_is_refused(model):
    """kvrt attends every key it holds past the prompt's own pads: a later forward whose mask
    hides keys (pads in the new tokens, a hole over earlier ones) was answered as if unmasked."""
    ids = torch.cat([_ids(60, seed=7), _ids(60, seed=8)])
    am = torch.ones_like(ids)
    am[1, :10] = 0  # the prompt's own pads: fine
    with torch.inference_mode():
        cache = _exact(model)
        kw = {kh.cache_kwarg(model): cache}
        model(ids, attention_mask=am, use_cache=True, **kw)
        nxt = torch.tensor([[11, 12], [0, 13]])
        ok = torch.cat([am, torch.ones(2, 2, dtype=am.dtype)], dim=1)
        model(nxt, attention_mask=ok, use_cache=True, **kw)  # all new tokens real
        for hide in ((1, 62), (0, 30)):  # a new pad, then a hole over a prompt token
            bad = torch.cat([ok, torch.ones(2, 2, dtype=am.dtype)], dim=1)
            bad[hide] = 0
            with pytest.raises(ValueError, match="hides keys after the prompt"):
                model(torch.tensor([[14, 15], [16, 17]]), attention_mask=bad, use_cache=True,
                      **kw)
            cache.reset()
            model(ids, attention_mask=am, use_cache=True, **kw)
            model(nxt, attention_mask=ok, use_cache=True, **kw)
    cache.close()


@pytest.fixture(scope="module")
def llama():
    """Global layers only: in Gemma 3 transformers' own sliding layers run first (they refuse a
    batch of another size themselves and hold a refused forward's K/V until reset())."""
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)).eval()


def test_a_batch_of_another_size_after_the_prompt_is_refused(llama):
    with torch.inference_mode():
        cache = _exact(llama)
        kw = {kh.cache_kwarg(llama): cache}
        llama(torch.cat([_ids(40, seed=1), _ids(40, seed=2)]), use_cache=True, **kw)
        # Row 1 alone was answered from row 0's sequence.
        with pytest.raises(ValueError, match="batch size changed from 2 to 1"):
            llama(torch.tensor([[12]]), use_cache=True, **kw)
    cache.close()


def test_a_refused_prompt_leaves_nothing_prefilled(llama):
    ids = torch.cat([_ids(40, seed=3), _ids(40, seed=4)])
    am = torch.ones_like(ids)
    am[1] = 0  # row 1 all padding
    with torch.inference_mode():
        cache = _exact(llama)
        kw = {kh.cache_kwarg(llama): cache}
        with pytest.raises(ValueError, match="all padding"):
            llama(ids, attention_mask=am, use_cache=True, **kw)
        assert all(s.length(0) == 0 for s in cache.sequences)
        llama(ids, use_cache=True, **kw)  # the same cache takes a good prompt without reset()
        assert [s.length(0) for s in cache.sequences] == [40, 40]
    cache.close()


def test_query_sample_is_the_rows_kvrt_reads_of_each_rows_real_tokens(model, monkeypatch):
    """Only the prompt queries kvrt reads cross to its side (kvrt_prefill_query_rows, here made
    a stride of 3 to see it), counted over each batch row's real tokens."""
    cache = kh.enable(model, index_kind="cluster", worker_threads=2)
    monkeypatch.setattr(cache.runtime, "prefill_query_rows", lambda n: (n // 3, 3))
    q = torch.randn(2, 4, 10, 64)  # [B, Hq, n, d]
    keep = torch.ones(2, 10, dtype=torch.bool)
    keep[1, :4] = False  # row 1: real tokens 4..9, of which kvrt reads the 0th and 3rd
    got = cache._query_sample(q, keep)
    assert torch.equal(got[0], cache._rows(q[0:1, :, [0, 3, 6]])[0])
    assert torch.equal(got[1], cache._rows(q[1:2, :, [4, 7]])[0])
    got = cache._query_sample(q, None)  # no padding: the same rows of every batch row
    assert [tuple(t.shape) for t in got] == [(3, 4, 64)] * 2
    assert torch.equal(got[1], cache._rows(q[1:2, :, [0, 3, 6]])[0])
    cache.close()
    cache = kh.enable(model, index_kind="exact", worker_threads=2)  # reads no queries
    assert cache._query_sample(q, keep) == [None, None]
    cache.close()


def test_padded_keys_from_bool_and_additive_masks():
    # Row 1 left-padded by two: its first two keys are attended by no query.
    causal = torch.ones(4, 4, dtype=torch.bool).tril()
    m = torch.stack([causal, causal.clone()])[:, None]  # [2, 1, 4, 4]
    m[1, :, :, :2] = False
    want = torch.tensor([[True] * 4, [False, False, True, True]])
    assert torch.equal(kh._padded_keys(m), want)
    additive = torch.zeros(m.shape).masked_fill(~m, torch.finfo(torch.float32).min)
    assert torch.equal(kh._padded_keys(additive), want)
    assert kh._padded_keys(None) is None
    assert kh._padded_keys(torch.stack([causal, causal])[:, None]) is None  # no padding


def test_retrieval_changes_logits_but_stays_close(model):
    ids = _ids(seed=1)
    model.set_attn_implementation("sdpa")
    _, ref = _logits(model, ids, 4)
    cache = kh.enable(model, index_kind="flat", top_k=2, sink_tokens=1, window_tokens=4,
                      worker_threads=2)
    _, got = _logits(model, ids, 4, cache)
    assert not torch.allclose(got, ref, atol=1e-4)  # 2 of ~300 cold tokens: not exact
    assert cache.stats().cold_tokens_attended == 2 * 3 * 4 * 2  # layers x steps x q heads x k


def test_teacher_forced_chunk_equals_single_steps(model):
    """A forward of n tokens after the prompt is attended token by token."""
    ids = _ids(seed=2)
    cont = torch.randint(2, 258, (1, 5), generator=torch.Generator().manual_seed(3))
    kw = kh.cache_kwarg(model)

    def run(chunks):
        cache = kh.enable(model, index_kind="flat", top_k=8, sink_tokens=2, window_tokens=8,
                          worker_threads=1)
        with torch.inference_mode():
            model(ids, **{kw: cache})
            outs = [model(c, **{kw: cache}).logits for c in chunks]
        return torch.cat(outs, dim=1)

    together = run([cont])
    one_by_one = run([cont[:, i:i + 1] for i in range(5)])
    torch.testing.assert_close(together, one_by_one, rtol=1e-4, atol=1e-4)


def _generate_chunked(model, ids, new_tokens, cache, chunk):
    with torch.inference_mode():
        out = model.generate(ids, max_new_tokens=new_tokens, do_sample=False, output_logits=True,
                             return_dict_in_generate=True, prefill_chunk_size=chunk,
                             **{kh.cache_kwarg(model): cache})
    return out.sequences[0, ids.shape[1]:], torch.stack(out.logits)[:, 0]


def test_chunked_prompt_reproduces_the_full_cache_logits(model):
    """generate(prefill_chunk_size=...) with chunked_prompt: each chunk attends the prompt so
    far, the first decode token prefills kvrt with the whole prompt (exact mode: the full
    cache's logits), and kvrt attends only the decode tokens."""
    ids = _ids(seed=4)
    model.set_attn_implementation("sdpa")
    ref_tokens, ref = _logits(model, ids, 8)
    cache = kh.enable(model, chunked_prompt=True, index_kind="exact", sink_tokens=4,
                      window_tokens=16, worker_threads=2)
    tokens, got = _generate_chunked(model, ids, 8, cache, chunk=128)  # 128 + 128 + 44
    assert torch.equal(tokens, ref_tokens)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
    st = cache.stats()
    assert st.attend_calls == 2 * 7  # the decode forwards only
    assert st.host_tokens == 2 * (PROMPT + 7 - 4 - 16)
    assert cache.get_seq_length() == PROMPT + 7
    cache.close()


def test_mask_is_left_out_for_a_plain_causal_chunk():
    """A causal chunk without padding gets no mask tensor (kvrt's attention aligns the causal
    mask itself); padding and sliding windows still get transformers' mask."""
    from transformers.masking_utils import sliding_window_causal_mask_function
    kw = dict(batch_size=1, q_length=4, kv_length=10, q_offset=6, kv_offset=0, device="cpu")
    assert kh.mask(**kw) is None
    assert kh.mask(**kw, attention_mask=torch.ones(1, 10, dtype=torch.bool)) is None
    padded = torch.ones(1, 10, dtype=torch.bool)
    padded[0, 0] = False
    m = kh.mask(**kw, attention_mask=padded)
    assert m is not None and not bool(m[0, 0, :, 0].any()) and bool(m[0, 0, -1, 1:].all())
    m = kh.mask(**kw, mask_function=sliding_window_causal_mask_function(3))
    assert m is not None and int(m[0, 0, -1].sum()) == 3


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_causal_chunk_attention_is_aligned_to_the_last_positions(device):
    """_sdpa of 5 queries over 12 keys (GQA 4/2): query i sees keys 0 .. 7 + i, as an explicit
    mask over repeated K/V gives (on CUDA: torch's flash kernel without a mask tensor)."""
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    g = torch.Generator().manual_seed(0)
    dt = torch.float32 if device == "cpu" else torch.bfloat16
    q, k, v = (torch.randn(1, h, n, 64, generator=g).to(device, dt)
               for h, n in ((4, 5), (2, 12), (2, 12)))
    module = type("Attn", (), {"is_causal": True})()
    got, _ = kh._sdpa(module, q, k, v, None, scaling=0.125)
    pos = torch.arange(12, device=device)
    allowed = pos[None, :] <= pos[:5, None] + 7
    ref = torch.nn.functional.scaled_dot_product_attention(
        q.float(), k.float().repeat_interleave(2, 1), v.float().repeat_interleave(2, 1),
        attn_mask=allowed, scale=0.125).transpose(1, 2)
    torch.testing.assert_close(got.float(), ref, rtol=2e-2 if device == "cuda" else 1e-5,
                               atol=2e-2 if device == "cuda" else 1e-5)


def test_chunked_prompt_keeps_an_even_query_sample(model):
    """The prompt's queries are kept at a stride that doubles past the cap; the index kinds that
    build from them (attention-aware here) still retrieve every cold token at a large k."""
    ids = _ids(seed=5)
    model.set_attn_implementation("sdpa")
    _, ref = _logits(model, ids, 4)
    cache = kh.enable(model, chunked_prompt=True, index_kind="attention-aware", top_k=400,
                      sink_tokens=4, window_tokens=16, worker_threads=2)
    cache._QUERY_KEEP = 40  # 300 prompt queries: stride 8, 38 kept
    _, got = _generate_chunked(model, ids, 4, cache, chunk=64)
    torch.testing.assert_close(got, ref, rtol=1e-3, atol=1e-3)
    assert not cache._prompt  # handed to kvrt at the first decode token
    cache.close()


def test_runtime_config_comes_from_the_model(model):
    cfg = kh.runtime_config(model, index_kind="landmark", top_k=50, num_layers=99)
    assert (cfg.num_layers, cfg.num_q_heads, cfg.num_kv_heads, cfg.head_dim) == (2, 4, 1, 64)
    assert cfg.dtype == "f32" and cfg.index_kind == "landmark" and cfg.top_k == 50
    assert abs(cfg.scale - 64 ** -0.5) < 1e-7
    assert kh.kvrt_layers(model.config) == [1, 3]
    with pytest.raises(kvrt.InvalidArgumentError, match="unknown index kind"):
        kh.enable(model, index_kind="bogus")
    # A Config or a dict sets what it names, not its defaults: given as one, an f32 model's K/V
    # were stored in bf16 (the Config's default dtype), its scale and backend the defaults too.
    for given in (kvrt.Config(index_kind="landmark", top_k=50),
                  {"index_kind": "landmark", "top_k": 50}):
        cfg = kh.runtime_config(model, given)
        assert cfg.dtype == "f32" and cfg.index_kind == "landmark" and cfg.top_k == 50, given
        assert abs(cfg.scale - 64 ** -0.5) < 1e-7
    assert kh.runtime_config(model, kvrt.Config(dtype="f16")).dtype == "f16"
    assert kh.runtime_config(model, {"dtype": "bf16"}).dtype == "bf16"


def test_output_attentions_warns_once_and_leaves_them_empty(model):
    """kvrt has no attention weights to give; the request used to pass in silence."""
    ids = _ids(60, seed=9)
    with torch.inference_mode():
        cache = _exact(model)
        kw = {kh.cache_kwarg(model): cache}
        with pytest.warns(UserWarning, match="output_attentions=True is not supported") as rec:
            out = model(ids, output_attentions=True, use_cache=True, **kw)
            model(ids[:, :1], output_attentions=True, use_cache=True, **kw)
        assert sum("output_attentions" in str(w.message) for w in rec) == 1
        assert all(a is None for a in (out.attentions or ()))
    cache.close()
