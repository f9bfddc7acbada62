"""Exact mode equals full attention; other kinds agree where they must; outputs are zero-copy."""

from __future__ import annotations

import numpy as np
import pytest

import kvrt
from conftest import SHAPE, kv, reference_attention


def make(**kw):
    cfg = dict(SHAPE, dtype="f32", index_kind="exact", sink_tokens=4, window_tokens=64,
               worker_threads=2)
    cfg.update(kw)
    return kvrt.Runtime(**cfg)


@pytest.mark.parametrize("prompt", [10, 700])  # all on the GPU tier / most of it cold
def test_exact_prefill_attend_equals_full_attention(rng, prompt):
    rt = make()
    seq = rt.sequence()
    scale = 1 / np.sqrt(32)
    ks, vs = {}, {}
    for layer in range(2):
        ks[layer], vs[layer] = kv(rng, prompt), kv(rng, prompt)
        seq.prefill(layer, kv(rng, prompt, 8), ks[layer], vs[layer])
    for _ in range(3):  # decode steps: append then attend, every layer
        for layer in range(2):
            k1, v1 = kv(rng, 1), kv(rng, 1)
            seq.append(layer, k1, v1)
            ks[layer] = np.concatenate([ks[layer], k1])
            vs[layer] = np.concatenate([vs[layer], v1])
            q = rng.standard_normal((8, 32), dtype=np.float32)
            out = seq.attend(layer, q)
            assert out.dtype == np.float32 and out.shape == (8, 32)
            np.testing.assert_allclose(out, reference_attention(q, ks[layer], vs[layer], scale),
                                       rtol=2e-4, atol=2e-5)
    assert seq.length(0) == prompt + 3


def reference_lse(q: np.ndarray, k: np.ndarray, scale: float) -> np.ndarray:
    """log sum exp of each q head's scaled scores over k [T, Hkv, d], float64, [Hq]."""
    g = q.shape[0] // k.shape[1]
    s = np.einsum("hd,thd->ht", q.astype(np.float64),
                  np.repeat(k.astype(np.float64), g, axis=1)) * scale
    m = s.max(axis=1)
    return m + np.log(np.exp(s - m[:, None]).sum(axis=1))


@pytest.mark.parametrize("kind", ["exact", "cluster"])
def test_lse_merges_with_attention_of_our_own(rng, kind):
    """lse= gives each head's log-sum-exp over the layer's tokens: kvrt's output over a prefix
    merged in lse space with our own attention over the rest equals attention over all of it, and
    a learned sink logit (gpt-oss) is out * sigmoid(lse - s). Through attend, append_attend and
    the batch forms."""
    extra = dict(top_k=100000) if kind == "cluster" else {}
    rt = make(index_kind=kind, **extra)
    scale = 1 / np.sqrt(32)
    seqs = [rt.sequence(), rt.sequence()]
    ks = [kv(rng, 600), kv(rng, 500)]
    vs = [kv(rng, 600), kv(rng, 500)]
    for s, k, v in zip(seqs, ks, vs):
        s.prefill(0, None, k, v)
    q = rng.standard_normal((2, 8, 32), dtype=np.float32)
    lse = np.full((8,), np.nan, dtype=np.float32)
    out = seqs[0].attend(0, q[0], lse=lse)
    np.testing.assert_allclose(lse, reference_lse(q[0], ks[0], scale), rtol=0, atol=1e-4)
    # Ours: 50 more tokens kvrt never saw, merged exactly.
    k2, v2 = kv(rng, 50), kv(rng, 50)
    o2, l2 = reference_attention(q[0], k2, v2, scale), reference_lse(q[0], k2, scale)
    w = 1 / (1 + np.exp(l2 - lse.astype(np.float64)))
    merged = w[:, None] * out + (1 - w[:, None]) * o2
    np.testing.assert_allclose(
        merged, reference_attention(q[0], np.concatenate([ks[0], k2]),
                                    np.concatenate([vs[0], v2]), scale), rtol=2e-4, atol=2e-5)
    # A sink logit per head: one more logit in the softmax, with a zero value.
    sinks = rng.standard_normal(8) + lse
    sunk = out * (1 / (1 + np.exp(sinks - lse)))[:, None]
    full = np.exp(reference_lse(q[0], ks[0], scale) - np.logaddexp(reference_lse(q[0], ks[0],
                                                                                scale), sinks))
    np.testing.assert_allclose(sunk, reference_attention(q[0], ks[0], vs[0], scale)
                               * full[:, None], rtol=2e-4, atol=2e-5)
    # The batch forms, and append_attend.
    lse2 = np.full((2, 8), np.nan, dtype=np.float32)
    k1, v1 = kv(rng, 2), kv(rng, 2)
    rt.append_attend_batch(seqs, 0, q, k1, v1, lse=lse2)
    for i in range(2):
        ks[i], vs[i] = np.concatenate([ks[i], k1[i:i + 1]]), np.concatenate([vs[i], v1[i:i + 1]])
        np.testing.assert_allclose(lse2[i], reference_lse(q[i], ks[i], scale), atol=1e-4)
    rt.attend_batch(seqs, 0, q, lse=lse2)
    np.testing.assert_allclose(lse2[1], reference_lse(q[1], ks[1], scale), atol=1e-4)
    k1, v1 = kv(rng, 1), kv(rng, 1)
    seqs[1].append_attend(0, q[1], k1, v1, lse=lse)
    np.testing.assert_allclose(
        lse, reference_lse(q[1], np.concatenate([ks[1], k1]), scale), atol=1e-4)
    with pytest.raises(kvrt.InvalidArgumentError, match="lse"):
        seqs[0].attend(0, q[0], lse=np.zeros((4,), dtype=np.float32))
    with pytest.raises(kvrt.InvalidArgumentError, match="lse"):
        rt.attend_batch(seqs, 0, q, lse=np.zeros((2, 8), dtype=np.float64))


def test_scale_is_applied(rng):
    rt = make(scale=0.5)
    assert rt.config.scale == 0.5
    seq = rt.sequence()
    k, v = kv(rng, 300), kv(rng, 300)
    seq.prefill(0, None, k, v)
    q = rng.standard_normal((8, 32), dtype=np.float32)
    np.testing.assert_allclose(seq.attend(0, q), reference_attention(q, k, v, 0.5),
                               rtol=2e-4, atol=2e-5)


def test_flat_with_large_top_k_is_exact_and_small_top_k_is_not(rng):
    k, v = kv(rng, 2000), kv(rng, 2000)
    q = rng.standard_normal((8, 32), dtype=np.float32)
    ref = reference_attention(q, k, v, 1 / np.sqrt(32))
    outs = {}
    for top_k in (2000, 4):
        rt = make(index_kind="flat", top_k=top_k)
        seq = rt.sequence()
        seq.prefill(0, None, k, v)
        seq.wait()  # nothing in the background on the host backend: returns at once
        outs[top_k] = seq.attend(0, q)
    np.testing.assert_allclose(outs[2000], ref, rtol=2e-4, atol=2e-5)
    assert np.abs(outs[4] - ref).max() > 1e-3  # retrieval of 4 tokens out of ~1900 is lossy


def test_output_is_written_into_the_given_array(rng):
    rt = make()
    seq = rt.sequence()
    seq.prefill(0, None, kv(rng, 50), kv(rng, 50))
    out = np.full((8, 32), np.nan, dtype=np.float32)
    got = seq.attend(0, rng.standard_normal((8, 32), dtype=np.float32), out=out)
    assert got is out
    assert np.isfinite(out).all()
    # a view into a larger buffer: written in place, the rest untouched
    buf = np.zeros((3, 8, 32), dtype=np.float32)
    seq.attend(0, rng.standard_normal((8, 32), dtype=np.float32), out=buf[1])
    assert np.abs(buf[1]).sum() > 0 and not buf[0].any() and not buf[2].any()


def test_inputs_are_not_copied_read_only_is_fine(rng):
    rt = make()
    seq = rt.sequence()
    k = kv(rng, 20)
    k.flags.writeable = False
    seq.prefill(0, None, k, k)
    assert seq.length(0) == 20


def test_attend_batch_equals_one_attend_per_sequence(rng):
    rt = make(index_kind="flat", top_k=50)
    seqs = [rt.sequence() for _ in range(3)]
    for i, s in enumerate(seqs):
        s.prefill(0, None, kv(rng, 500 + 100 * i), kv(rng, 500 + 100 * i))
    q = rng.standard_normal((3, 8, 32), dtype=np.float32)
    batched = rt.attend_batch(seqs, 0, q)
    assert batched.shape == (3, 8, 32)
    for i, s in enumerate(seqs):
        np.testing.assert_allclose(s.attend(0, q[i]), batched[i], rtol=1e-5, atol=1e-6)


def test_append_attend_equals_append_then_attend(rng):
    # Two runtimes fed the same rows: one through the two calls, one through the one call; the
    # flat kind with a small top_k, so that rows entering the cold tier matter to the result.
    two, one = make(index_kind="flat", top_k=20), make(index_kind="flat", top_k=20)
    a, b = two.sequence(), one.sequence()
    k, v = kv(rng, 300), kv(rng, 300)
    a.prefill(0, None, k, v)
    b.prefill(0, None, k, v)
    for _ in range(80):  # past the window of 64: rows leave it for the cold tier
        k1, v1 = kv(rng, 1), kv(rng, 1)
        q = rng.standard_normal((8, 32), dtype=np.float32)
        a.append(0, k1, v1)
        want = a.attend(0, q)
        out = np.full((8, 32), np.nan, dtype=np.float32)
        assert b.append_attend(0, q, k1, v1, out=out) is out
        np.testing.assert_array_equal(out, want)
    assert b.length(0) == a.length(0) == 380


def test_append_attend_batch_equals_one_call_per_sequence(rng):
    rt, ref = make(index_kind="flat", top_k=50), make(index_kind="flat", top_k=50)
    seqs, refs = [rt.sequence() for _ in range(3)], [ref.sequence() for _ in range(3)]
    for i in range(3):
        k, v = kv(rng, 200 + 50 * i), kv(rng, 200 + 50 * i)
        seqs[i].prefill(0, None, k, v)
        refs[i].prefill(0, None, k, v)
    for _ in range(3):
        q = rng.standard_normal((3, 8, 32), dtype=np.float32)
        k, v = kv(rng, 3), kv(rng, 3)
        got = rt.append_attend_batch(seqs, 0, q, k, v)
        assert got.shape == (3, 8, 32)
        for i in range(3):
            np.testing.assert_allclose(refs[i].append_attend(0, q[i], k[i:i + 1], v[i:i + 1]),
                                       got[i], rtol=1e-5, atol=1e-6)
    assert [s.length(0) for s in seqs] == [203, 253, 303]


KINDS = ["exact", "flat", "ivf", "hnsw", "landmark", "attention-aware", "cluster"]
# (q heads, kv heads, head_dim, sinks, window, storage dtype): MHA, odd head dims, one kv head,
# no sinks, a window of one token.
ODD_SHAPES = [(4, 4, 8, 0, 1, "f32"), (6, 2, 72, 1, 16, "f16"), (8, 1, 100, 4, 300, "f32"),
              (3, 1, 16, 0, 16, "f16")]


@pytest.mark.parametrize("shape", ODD_SHAPES, ids=lambda s: "q{}kv{}d{}s{}w{}{}".format(*s))
@pytest.mark.parametrize("kind", KINDS)
def test_every_kind_is_exact_with_a_top_k_covering_every_token(rng, kind, shape):
    hq, hkv, d, sinks, window, dtype = shape
    np_dt = np.float32 if dtype == "f32" else np.float16
    rt = kvrt.Runtime(num_layers=1, num_q_heads=hq, num_kv_heads=hkv, head_dim=d, dtype=dtype,
                      sink_tokens=sinks, window_tokens=window, index_kind=kind, top_k=100000,
                      worker_threads=2)
    seq = rt.sequence()
    k = kv(rng, 700, hkv, d).astype(np_dt)
    v = kv(rng, 700, hkv, d).astype(np_dt)
    seq.prefill(0, None, k, v)
    for _ in range(3):
        k1, v1 = kv(rng, 1, hkv, d).astype(np_dt), kv(rng, 1, hkv, d).astype(np_dt)
        q = rng.standard_normal((hq, d), dtype=np.float32).astype(np_dt)
        out = seq.append_attend(0, q, k1, v1)
        k, v = np.concatenate([k, k1]), np.concatenate([v, v1])
        want = reference_attention(q.astype(np.float32), k.astype(np.float32),
                                   v.astype(np.float32), 1 / np.sqrt(d))
        np.testing.assert_allclose(out, want, rtol=1e-3, atol=1e-4 if dtype == "f32" else 2e-3)
    rt.close()


def test_f16_storage(rng):
    rt = make(dtype="f16")
    seq = rt.sequence()
    k, v = kv(rng, 400).astype(np.float16), kv(rng, 400).astype(np.float16)
    seq.prefill(0, None, k, v)
    q = rng.standard_normal((8, 32)).astype(np.float16)
    np.testing.assert_allclose(seq.attend(0, q), reference_attention(q, k, v, 1 / np.sqrt(32)),
                               rtol=1e-2, atol=1e-3)


def test_record_attended_names_positions(rng):
    rt = make(index_kind="flat", top_k=10, record_attended=1, sink_tokens=2, window_tokens=8)
    seq = rt.sequence()
    seq.prefill(0, None, kv(rng, 300), kv(rng, 300))
    seq.attend(0, rng.standard_normal((8, 32), dtype=np.float32))
    ids = seq.attended(0, 3)
    assert ids.dtype == np.int64 and len(ids) == 2 + 8 + 10
    assert set(ids[:10]) == {0, 1, *range(292, 300)}
    assert all(2 <= i < 292 for i in ids[10:])
    assert seq.estimate_lse(0, 3) == -np.inf  # flat estimates nothing


def test_estimate_lse_needs_record_attended(rng):
    rt = make(index_kind="flat", top_k=10)
    seq = rt.sequence()
    seq.prefill(0, None, kv(rng, 300), kv(rng, 300))
    seq.attend(0, rng.standard_normal((8, 32), dtype=np.float32))
    with pytest.raises(kvrt.KvrtError, match="record_attended"):
        seq.estimate_lse(0, 0)


def test_prefill_from_the_query_rows_kvrt_reads(rng):
    """prefill(..., sampled=True) with the rows prefill_query_rows names builds the index of every
    query (the cluster kind's query-aware metric; two segments of 8192 clustered rows)."""
    n = 20000
    k, v = kv(rng, n), kv(rng, n)
    skew = np.linspace(3, 0.2, 32, dtype=np.float32)  # queries that favour some dimensions
    q = rng.standard_normal((n, 8, 32), dtype=np.float32) * skew
    steps = rng.standard_normal((3, 8, 32), dtype=np.float32)
    count, stride = make(index_kind="cluster").prefill_query_rows(n)
    assert (count, stride) == (1000, 20)  # at most 4096 query rows per kv head over 4 q heads
    assert make(index_kind="flat").prefill_query_rows(n) == (0, 1)
    outs = []
    for queries, sampled in ((q, False), (q[:count * stride:stride].copy(), True), (None, False)):
        seq = make(index_kind="cluster", record_attended=1).sequence()
        seq.prefill(0, queries, k, v, sampled=sampled)
        outs.append([(seq.attend(0, s), seq.attended(0, 5)) for s in steps])
    for (a, ids_a), (b, ids_b) in zip(outs[0], outs[1]):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(ids_a, ids_b)
    # Without queries the index differs: the equality above could fail.
    assert any(not np.array_equal(a[1], c[1]) for a, c in zip(outs[0], outs[2]))


def test_a_sample_of_no_rows_is_no_queries(rng):
    """The README's recipe on a kind that reads no queries: prefill_query_rows names no rows, and
    the empty slice it gives is taken as q=None (it was refused as "no tokens")."""
    T = 300
    q = rng.standard_normal((T, 8, 32), dtype=np.float32)
    k, v = kv(rng, T), kv(rng, T)
    rt = make(index_kind="flat")
    n, s = rt.prefill_query_rows(T)
    assert (n, s) == (0, 1)
    step = rng.standard_normal((8, 32), dtype=np.float32)
    outs = []
    for queries, sampled in ((q[:n * s:s].copy(), True), (None, False)):
        seq = rt.sequence()
        seq.prefill(0, queries, k, v, sampled=sampled)
        outs.append(seq.attend(0, step))
    np.testing.assert_array_equal(outs[0], outs[1])
    with pytest.raises(kvrt.InvalidArgumentError, match="shape"):  # the other extents still count
        rt.sequence().prefill(0, np.zeros((0, 4, 32), np.float32), k, v, sampled=True)
    with pytest.raises(kvrt.InvalidArgumentError, match="q has dtype float64"):  # and the dtype
        rt.sequence().prefill(0, np.zeros((0, 8, 32), np.float64), k, v, sampled=True)


def test_sampled_prefill_errors(rng):
    seq = make(index_kind="cluster").sequence()
    k = kv(rng, 300)
    with pytest.raises(kvrt.InvalidArgumentError, match="q"):  # rows != n without sampled
        seq.prefill(0, kv(rng, 10, 8), k, k)
    with pytest.raises(kvrt.InvalidArgumentError, match="n_queries"):
        seq.prefill(0, kv(rng, 301, 8), k, k, sampled=True)
    with pytest.raises(kvrt.InvalidArgumentError, match="n_tokens"):
        seq.runtime.prefill_query_rows(0)
    seq.prefill(0, kv(rng, 10, 8), k, k, sampled=True)
    assert seq.length(0) == 300
