"""Config mirrors kvrt_config (defaults included); Stats fields move as the runtime works."""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import pytest

import kvrt
from conftest import SHAPE, kv


def test_config_defaults_are_the_librarys():
    assert kvrt.Config() == kvrt.Config.from_dict(kvrt._kvrt.config_default())


def test_runtime_from_config_dataclass_and_keywords():
    cfg = kvrt.Config(**SHAPE, dtype="f32", index_kind="attention-aware", top_k=7)
    rt = kvrt.Runtime(cfg, window_tokens=32, cold_attention="auto")
    eff = rt.config
    assert (eff.index_kind, eff.top_k, eff.window_tokens) == ("attention-aware", 7, 32)
    assert eff.cold_attention == "auto" and eff.use_gpu == 0
    assert abs(eff.scale - 1 / np.sqrt(32)) < 1e-7  # 0 resolved by the library
    assert eff.worker_threads >= 1
    assert cfg.window_tokens == 2048  # the dataclass passed in is not changed
    assert kvrt.Runtime({"num_layers": 3}).config.num_layers == 3


def test_config_round_trips_every_field():
    cfg = kvrt.Config(num_layers=3, num_q_heads=4, num_kv_heads=4, head_dim=16, dtype="f16",
                      scale=0.25, sink_tokens=1, window_tokens=9, top_k=5, index_kind="landmark",
                      search_effort=3, worker_threads=1, record_attended=1, use_gpu=0,
                      host_memory_limit=1 << 30, gpu_memory_limit=1 << 29, check_finite=0,
                      group_search=1, cold_attention="fetch", hot_cache_fraction=0.25,
                      cluster_budget_fraction=0.05, cuda_device=2, worker_cpu_first=0,
                      worker_cpu_count=1)
    assert kvrt.Runtime(cfg).config == cfg


def test_cluster_miss_penalty_round_trips_and_is_checked():
    assert kvrt.Config().cluster_miss_penalty == 0.5  # the library's default (0.3.9)
    for penalty in (0.0, 0.25, 2.0, 64):
        cfg = kvrt.Config(**SHAPE, index_kind="cluster", cluster_miss_penalty=penalty)
        assert kvrt.Runtime(cfg).config.cluster_miss_penalty == penalty
    for bad in (float("nan"), -1.0, 65.0, float("inf")):
        with pytest.raises(kvrt.InvalidArgumentError, match=r"config\.cluster_miss_penalty = "):
            kvrt.Runtime(**SHAPE, cluster_miss_penalty=bad)
    with pytest.raises(kvrt.InvalidArgumentError, match=r"config\.cluster_miss_penalty must be"):
        kvrt.Runtime(**SHAPE, cluster_miss_penalty="high")


def test_cluster_keys_round_trip_zero_means_sixteen_and_is_checked():
    assert kvrt.Config().cluster_keys == 16  # the library's default (0.3.10)
    for keys, want in ((8, 8), (0, 16), (256, 256)):
        cfg = kvrt.Config(**SHAPE, index_kind="cluster", cluster_keys=keys)
        assert kvrt.Runtime(cfg).config.cluster_keys == want
    for bad in (1, -1, 257):
        with pytest.raises(kvrt.InvalidArgumentError, match=r"config\.cluster_keys = "):
            kvrt.Runtime(**SHAPE, cluster_keys=bad)


def test_cluster_rescore_round_trip_turns_the_direct_step_off_and_is_checked():
    assert kvrt.Config().cluster_rescore == 0.0  # the library's default (0.3.11): off
    for value, direct in ((0.0, 1), (1.0, 1), (4.0, 0), (64, 0)):
        eff = kvrt.Runtime(kvrt.Config(**SHAPE, index_kind="cluster", cluster_rescore=value)).config
        assert (eff.cluster_rescore, eff.cluster_direct_step) == (value, direct)
    for bad in (-1.0, 65.0, float("nan")):
        with pytest.raises(kvrt.InvalidArgumentError, match=r"config\.cluster_rescore = "):
            kvrt.Runtime(**SHAPE, cluster_rescore=bad)


def test_cluster_rescore_bits_round_trip_and_is_checked():
    assert kvrt.Config().cluster_rescore_bits == 0  # keys (0.3.13; before: reserved)
    for bits in (0, 1, 2, 4, 8):
        rt = kvrt.Runtime(kvrt.Config(**SHAPE, index_kind="cluster", cluster_rescore=4.0,
                                      cluster_rescore_bits=bits))
        assert rt.config.cluster_rescore_bits == bits
        assert ("-bit codes" in rt.describe_search()) == (bits > 0)
        rt.close()
    for bad in (-1, 3, 16):
        with pytest.raises(kvrt.InvalidArgumentError, match=r"config\.cluster_rescore_bits = "):
            kvrt.Runtime(**SHAPE, cluster_rescore_bits=bad)
    # Without cluster_rescore (0.3.14): one stage, the clusters ranked on their rows' codes.
    rt = kvrt.Runtime(kvrt.Config(**SHAPE, index_kind="cluster", cluster_rescore_bits=2))
    text = rt.describe_search()
    assert "ranked by their rows' 2-bit codes" in text and "two stages" not in text, text
    rt.close()


def test_cluster_value_bits_round_trip_and_is_checked():
    assert kvrt.Config().cluster_value_bits == 0  # value means (0.3.15)
    for bits in (0, 1, 2, 4, 8):
        rt = kvrt.Runtime(kvrt.Config(**SHAPE, index_kind="cluster", cluster_rescore_bits=2,
                                      cluster_value_bits=bits))
        assert rt.config.cluster_value_bits == bits
        assert ("value codes" in rt.describe_search()) == (bits > 0)
        assert bits == 0 or rt.config.cluster_direct_step == 0  # the CPU selects
        rt.close()
    for bad in (-1, 3, 16):
        with pytest.raises(kvrt.InvalidArgumentError, match=r"config\.cluster_value_bits = "):
            kvrt.Runtime(**SHAPE, index_kind="cluster", cluster_rescore_bits=2,
                         cluster_value_bits=bad)
    # Only with the selection on codes.
    with pytest.raises(kvrt.InvalidArgumentError, match=r"needs the selection on codes"):
        kvrt.Runtime(**SHAPE, index_kind="cluster", cluster_value_bits=2)


def test_values_are_keys_round_trips_and_stores_one_row(rng):
    # 0.3.25: each token's value is its key; the same output as the keys passed as values, half
    # the host store; the GPU backend refuses it by name.
    assert kvrt.Config().values_are_keys == 0
    k = kv(rng, 300)
    q = rng.standard_normal((8, 32), dtype=np.float32)
    outs, held = [], []
    for shared in (0, 1):
        rt = kvrt.Runtime(**SHAPE, dtype="f32", index_kind="exact", window_tokens=16,
                          values_are_keys=shared)
        assert rt.config.values_are_keys == shared
        s = rt.sequence()
        s.prefill(0, None, k, k)
        outs.append(s.attend(0, q))
        held.append(rt.stats().host_bytes)
        rt.close()
    np.testing.assert_array_equal(outs[0], outs[1])
    assert held[0] == 2 * held[1] > 0
    with pytest.raises(kvrt.InvalidArgumentError, match=r"values_are_keys"):
        kvrt.Runtime(**SHAPE, values_are_keys=2)
    with pytest.raises(kvrt.InvalidArgumentError, match=r"values_are_keys = 1 runs on the host"):
        kvrt.Runtime(**SHAPE, values_are_keys=1, use_gpu=1)


def test_values_are_keys_takes_no_values(rng):
    # v=None where kvrt reads no values, as the C calls take a NULL v (it was refused as a
    # missing argument); a runtime that reads values refuses it by name.
    k = kv(rng, 300)
    q = rng.standard_normal((8, 32), dtype=np.float32)
    rt = kvrt.Runtime(**SHAPE, dtype="f32", index_kind="exact", window_tokens=16,
                      values_are_keys=1)
    a, b = rt.sequence(), rt.sequence()
    a.prefill(0, None, k, k)
    b.prefill(0, None, k, None)
    row = kv(rng, 1)
    a.append(0, row, row)
    b.append(0, row, None)
    np.testing.assert_array_equal(a.append_attend(0, q, row, row), b.append_attend(0, q, row, None))
    row, qs = kv(rng, 1), rng.standard_normal((1, 8, 32), dtype=np.float32)
    np.testing.assert_array_equal(rt.append_attend_batch([a], 0, qs, row, row),
                                  rt.append_attend_batch([b], 0, qs, row, None))
    rt.close()
    rt = kvrt.Runtime(**SHAPE, dtype="f32", index_kind="exact", window_tokens=16)
    with pytest.raises(ValueError, match="values_are_keys"):
        rt.sequence().prefill(0, None, k, None)
    rt.close()


def test_a_runtime_describes_its_own_search():
    rt = kvrt.Runtime(**SHAPE, index_kind="cluster", cluster_keys=8, cluster_group_select=0,
                      cluster_rescore=4.0)
    text = rt.describe_search()
    assert "clusters of ~8 keys" in text and "per query" in text and "two stages" in text, text
    assert "two stages" not in kvrt.describe_search("cluster", rt.config.top_k)
    rt.close()
    with pytest.raises(kvrt.FailedPreconditionError):
        rt.describe_search()


def test_worker_cpu_range_is_checked_and_reported():
    eff = kvrt.Runtime(**SHAPE, worker_cpu_first=0, worker_cpu_count=1).config
    assert (eff.worker_cpu_first, eff.worker_cpu_count, eff.worker_threads) == (0, 1, 1)
    for first, count in ((os.cpu_count(), 1), (0, -1), (1 << 20, 2)):
        with pytest.raises(kvrt.InvalidArgumentError, match="worker_cpu_(first|count)"):
            kvrt.Runtime(**SHAPE, worker_cpu_first=first, worker_cpu_count=count)


def test_stats_fields_move(rng):
    rt = kvrt.Runtime(**SHAPE, dtype="f32", index_kind="flat", top_k=10, sink_tokens=4,
                      window_tokens=32)
    s0 = rt.stats()
    assert isinstance(s0, kvrt.Stats) and s0.sequences == 0 and s0.attend_calls == 0
    seq = rt.sequence()
    seq.prefill(0, None, kv(rng, 500), kv(rng, 500))
    s1 = rt.stats()
    assert s1.sequences == 1
    assert s1.gpu_tokens == 4 + 32 and s1.host_tokens == 500 - 36
    assert s1.host_bytes == (500 - 36) * 2 * 2 * 32 * 4  # k and v, 2 kv heads, f32
    for _ in range(5):
        seq.append(0, kv(rng, 1), kv(rng, 1))
        seq.attend(0, rng.standard_normal((8, 32), dtype=np.float32))
    s2 = rt.stats()
    d = s2 - s1
    assert d.attend_calls == 5 and d.evicted_tokens == 5 and d.host_tokens == 5
    assert d.cold_tokens_attended == 5 * 8 * 10  # top_k per q head per attend
    assert d.keys_scored > 0 and d.time_attend_ns > 0
    assert 0 < s2.scanned_fraction <= 1 and s2.mean_attend_us > 0
    seq.release()
    assert rt.stats().sequences == 0 and rt.stats().host_tokens == 0


def test_index_bytes_is_the_real_size_between_the_cluster_kinds_segments(rng):
    # An append reserves the index's growth as an upper bound; the cluster kind indexes whole
    # segments only, so no refresh trued it up and index_bytes showed the bound (2.45x after
    # 1000 appends) until the next segment (0.3.36).
    rt = kvrt.Runtime(**SHAPE, dtype="f32", index_kind="cluster", sink_tokens=4, window_tokens=64)
    seq = rt.sequence()
    n = 9000  # one 8192-row segment clustered, a tail
    seq.prefill(0, rng.standard_normal((n, 8, 32), dtype=np.float32), kv(rng, n), kv(rng, n))
    seq.wait()
    real = rt.stats().index_bytes
    assert real > 0
    for _ in range(200):
        seq.append(0, kv(rng, 1), kv(rng, 1))
    assert rt.stats().index_bytes == real
    seq.release()
    assert rt.stats().index_bytes == 0


def test_a_wait_for_the_prompts_index_build_is_not_d2h(rng):
    # The host backend has no D2H; an attend right after a prefill waits for the prompt's
    # background build, which was counted in time_d2h_ns as well as time_background_wait_ns
    # (0.3.36): the parts of one attend summed to twice its wall time.
    rt = kvrt.Runtime(num_layers=1, num_q_heads=8, num_kv_heads=2, head_dim=64, dtype="f32",
                      index_kind="ivf", top_k=32, sink_tokens=4, window_tokens=64,
                      worker_threads=2)
    seq = rt.sequence()
    k = rng.standard_normal((20000, 2, 64), dtype=np.float32)
    seq.prefill(0, None, k, k)
    seq.attend(0, rng.standard_normal((8, 64), dtype=np.float32))
    st = rt.stats()
    assert st.time_d2h_ns + st.time_background_wait_ns <= st.time_attend_ns
    seq.release()


def test_stats_is_a_frozen_dataclass_with_every_c_field():
    names = [f.name for f in dataclasses.fields(kvrt.Stats)]
    assert names == list(kvrt.Runtime(**SHAPE).stats().as_dict())
    assert len(names) == len(kvrt._kvrt.Runtime(dict(SHAPE)).stats())


def test_module_surface():
    assert kvrt.library_version() == kvrt.__version__
    assert "flat" in kvrt.index_kinds() and "cluster" in kvrt.index_kinds()
    assert "ef=" in kvrt.describe_search("hnsw", 100)
    rt = kvrt.Runtime(**SHAPE)
    assert "host backend" in repr(rt)
    rt.set_search_effort(5)
    assert rt.config.search_effort == 5
    rt.set_head_policy(0, 1, "streaming")
    try:
        rt.set_head_policy(0, 99, "streaming")
    except kvrt.InvalidArgumentError as e:
        assert "99" in str(e)
    else:
        raise AssertionError("q head 99 accepted")


def test_an_older_or_other_minor_library_is_refused_at_import(monkeypatch):
    # A libkvrt on LD_LIBRARY_PATH ranks above the package's own: an older one (no fixes, fields
    # ignored) was loaded in silence before 0.3.37.
    import pytest
    major, minor, patch = kvrt._kvrt.header_version()
    assert kvrt.__version__ == f"{major}.{minor}.{patch}"
    kvrt._check_library()  # the library this test runs on
    for other in (f"{major}.{minor}.{patch - 1}", f"{major}.{minor + 1}.0", "garbage"):
        monkeypatch.setattr(kvrt._kvrt, "version", lambda v=other: v)
        with pytest.raises(ImportError, match=f"needs libkvrt {major}.{minor}.{patch} .* loaded "
                                              f"{other} from .*libkvrt.so"):
            kvrt._check_library()
    monkeypatch.setattr(kvrt._kvrt, "version", lambda: f"{major}.{minor}.{patch + 1}")
    kvrt._check_library()  # a later patch of the same minor version is fine


def test_numpy_scalars_are_config_numbers_and_f32_limits_are_refused():
    # NumPy's scalars were refused ("must be an integer, not <class 'numpy.int64'>"); a scale
    # that rounds to 0 in f32 silently became the default 1/sqrt(head_dim).
    rt = kvrt.Runtime(**SHAPE, top_k=np.int64(64), search_effort=np.int32(3),
                      scale=np.float32(0.125), hot_cache_fraction=np.float64(0.25))
    c = rt.config
    assert (c.top_k, c.search_effort, c.scale, c.hot_cache_fraction) == (64, 3, 0.125, 0.25)
    with pytest.raises(kvrt.InvalidArgumentError, match=r"config\.scale .*rounds to 0 in f32"):
        kvrt.Runtime(**SHAPE, scale=1e-50)
    with pytest.raises(kvrt.InvalidArgumentError, match=r"config\.scale .*past f32's range"):
        kvrt.Runtime(**SHAPE, scale=1e50)
    with pytest.raises(kvrt.InvalidArgumentError, match=r"config\.top_k must be an integer"):
        kvrt.Runtime(**SHAPE, top_k=64.0)
    with pytest.raises(kvrt.InvalidArgumentError, match=r"config\.scale must be a number"):
        kvrt.Runtime(**SHAPE, scale="0.1")
