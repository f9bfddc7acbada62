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


def test_runtime_config_comes_from_the_model(model):
    cfg = kh.runtime_config(model, index_kind="landmark", top_k=50, num_layers=99)
    assert (cfg.num_layers, cfg.num_q_heads, cfg.num_kv_heads, cfg.head_dim) == (2, 4, 1, 64)
    assert cfg.dtype == "f32" and cfg.index_kind == "landmark" and cfg.top_k == 50
    assert abs(cfg.scale - 64 ** -0.5) < 1e-7
    assert kh.kvrt_layers(model.config) == [1, 3]
    with pytest.raises(kvrt.InvalidArgumentError, match="unknown index kind"):
        kh.enable(model, index_kind="bogus")
