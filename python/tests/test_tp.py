"""Tensor parallelism on the CPU: the tiny random Gemma 3 (2 kv heads) loaded with transformers'
tp_plan="auto" in two ranks (gloo), each rank's attention on its own kvrt runtime over its local
heads, against the same checkpoint in one process; and a tiny DeepSeek-V3, whose multi-head latent
attention every rank holds as the whole latent. Skipped without torch or transformers; the
two-rank tests also without gloo or accelerate (transformers' tp_plan loading needs it)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

import kvrt  # noqa: E402
import kvrt.hf as kh  # noqa: E402
from kvrt.testing import tiny_random  # noqa: E402
from conftest import COMMON, MLA, MLA_MOE  # noqa: E402
from tp_worker import MODES, PROMPT, decode  # noqa: E402

WORLD = 2
HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """{"one": {mode: result}, "ranks": [rank 0's, rank 1's]}: the checkpoint decoded in this
    process (no tensor parallelism) and by two ranks (tp_worker.py)."""
    return _tp_runs(tmp_path_factory, tiny_random(kv_heads=2))


@pytest.fixture(scope="module")
def mla_runs(tmp_path_factory):
    """runs' results for a tiny random DeepSeek-V3 (4 heads, latent 32 + 16)."""
    import transformers
    from kvrt.testing import sharpen
    cfg = transformers.DeepseekV3Config(**{**COMMON, **MLA, **MLA_MOE, "n_group": 1,
                                           "topk_group": 1})
    torch.manual_seed(0)
    model = transformers.DeepseekV3ForCausalLM(cfg).eval()
    sharpen(model)
    return _tp_runs(tmp_path_factory, model)


def _tp_runs(tmp_path_factory, model):
    pytest.importorskip("accelerate", reason="transformers' tp_plan loading needs accelerate")
    if not (torch.distributed.is_available() and torch.distributed.is_gloo_available()):
        pytest.skip("torch.distributed with gloo is not available")
    tmp = tmp_path_factory.mktemp("tp")
    model_dir = tmp / "tiny"
    torch.set_num_threads(2)
    model.save_pretrained(model_dir)
    procs = [_start_rank(r, model_dir, tmp) for r in range(WORLD)]
    logs = []
    for p in procs:
        try:
            out, _ = p.communicate(timeout=240)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail("a tensor-parallel rank did not finish in 240 s")
        logs.append(out.decode(errors="replace")[-4000:])
    for r, (p, log) in enumerate(zip(procs, logs)):
        assert p.returncode == 0, f"rank {r} failed:\n{log}"
    from transformers import AutoModelForCausalLM
    one = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    return {"one": {mode: decode(one, mode, worker_threads=2) for mode in MODES},
            "ranks": [torch.load(tmp / f"rank{r}.pt") for r in range(WORLD)]}


def _start_rank(rank, model_dir, tmp):
    """One rank as torchrun would start it (its environment variables), with the process group
    from a file instead of a TCP port (no port to collide with)."""
    env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD),
               LOCAL_WORLD_SIZE=str(WORLD), OMP_NUM_THREADS="1")
    env.setdefault("GLOO_SOCKET_IFNAME", "lo")  # the ranks meet on loopback
    # The kvrt this test imported, and tp_worker beside it.
    kvrt_root = os.path.dirname(os.path.dirname(os.path.abspath(kvrt.__file__)))
    env["PYTHONPATH"] = os.pathsep.join([kvrt_root, HERE, env.get("PYTHONPATH", "")])
    return subprocess.Popen(
        [sys.executable, os.path.join(HERE, "tp_worker.py"), "--model", str(model_dir), "--out",
         str(tmp), "--init-file", str(tmp / "pg")],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def test_each_rank_serves_its_local_heads(runs):
    one = runs["one"]["exact"]
    assert (one["config"]["num_q_heads"], one["config"]["num_kv_heads"]) == (4, 2)
    for r, rank in enumerate(runs["ranks"]):
        assert rank["local_heads"] == (2, 1), r
        got = rank["exact"]
        assert (got["config"]["num_q_heads"], got["config"]["num_kv_heads"]) == (2, 1)
        # The same tokens in every tier, half the heads: half the bytes and half the cold
        # tokens attended (they count per q head), the same number of attends.
        for field in ("host_bytes", "gpu_bytes", "cold_tokens_attended"):
            assert 2 * got["stats"][field] == one["stats"][field] > 0, (r, field)
        for field in ("host_tokens", "gpu_tokens", "attend_calls"):
            assert got["stats"][field] == one["stats"][field] > 0, (r, field)


def test_exact_mode_two_ranks_give_the_logits_of_one(runs):
    one = runs["one"]["exact"]
    assert one["stats"]["attend_calls"] == 2 * (MODES["exact"][1] - 1)  # 2 global layers
    for rank in runs["ranks"]:
        assert torch.equal(rank["exact"]["tokens"], one["tokens"])
        # NOTE: not bitwise: o_proj's all-reduce sums the two ranks' partial products in another
        # order than one matmul does.
        torch.testing.assert_close(rank["exact"]["logits"], one["logits"], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(runs["ranks"][0]["exact"]["logits"],
                               runs["ranks"][1]["exact"]["logits"], rtol=0, atol=0)


def test_flat_retrieval_under_two_ranks_runs_and_stays_close(runs):
    one = runs["one"]["flat"]
    top_k, steps = MODES["flat"][0]["top_k"], MODES["flat"][1] - 1
    for rank in runs["ranks"]:
        got = rank["flat"]
        # 2 global layers x steps x 2 local q heads x top_k
        assert got["stats"]["cold_tokens_attended"] == 2 * steps * 2 * top_k
        torch.testing.assert_close(got["logits"], one["logits"], rtol=1e-3, atol=1e-3)
    exact = runs["one"]["exact"]["logits"][:len(one["logits"])]
    assert not torch.allclose(one["logits"], exact, atol=1e-4), "top-8 of 280 is not exact"


def test_ranks_run_on_their_own_cpus(runs):
    if (os.cpu_count() or 1) < WORLD:
        pytest.skip("fewer CPUs than ranks: the ranks were not bound")
    ranges = []
    for r, rank in enumerate(runs["ranks"]):
        cfg = rank["exact"]["config"]
        want = kh.cpu_share(local_rank=r, local_world_size=WORLD)
        assert (cfg["worker_cpu_first"], cfg["worker_cpu_count"]) == (
            want["worker_cpu_first"], want["worker_cpu_count"])
        assert cfg["worker_threads"] == cfg["worker_cpu_count"]
        ranges.append(set(range(cfg["worker_cpu_first"],
                                cfg["worker_cpu_first"] + cfg["worker_cpu_count"])))
    assert not ranges[0] & ranges[1]


def test_latent_attention_under_two_ranks(mla_runs):
    # Each rank absorbs its 2 q heads through its shard of kv_b_proj and holds the whole latent
    # (one kv head of 32 + 16, its value its key): the bytes of one process's runtime, not half.
    for mode in MODES:
        one = mla_runs["one"][mode]
        assert (one["config"]["num_q_heads"], one["config"]["num_kv_heads"],
                one["config"]["head_dim"], one["config"]["values_are_keys"]) == (4, 1, 48, 1)
        for rank in mla_runs["ranks"]:
            got = rank[mode]
            assert (got["config"]["num_q_heads"], got["config"]["num_kv_heads"]) == (2, 1)
            assert got["stats"]["host_bytes"] == one["stats"]["host_bytes"] > 0
            assert torch.equal(got["tokens"], one["tokens"])
            torch.testing.assert_close(got["logits"], one["logits"], rtol=1e-4, atol=1e-4)


def test_a_runtime_made_for_another_shard_is_refused():
    """The head check that guards a rank against a runtime of the wrong shape: a model of 2 kv
    heads handed a runtime of 1 (what a rank's shard would have)."""
    model = tiny_random(kv_heads=2)
    shard = kh.runtime_config(model, index_kind="exact").replace(num_q_heads=2, num_kv_heads=1)
    model.set_attn_implementation(kh.register())
    cache = kh.KvrtCache(model, runtime=kvrt.Runtime(shard))
    with pytest.raises(ValueError, match="computes 4 q / 2 kv heads"):
        with torch.inference_mode():
            model(torch.randint(2, 258, (1, 8)), **{kh.cache_kwarg(model): cache})


def test_cpu_share_splits_the_cpus():
    n = len(kh._online_cpus())
    assert kh.cpu_share(0, 1) == {"worker_cpu_first": kh._online_cpus()[0], "worker_cpu_count": n}
    if n >= 2:
        a, b = kh.cpu_share(0, 2), kh.cpu_share(1, 2)
        assert a["worker_cpu_count"] == b["worker_cpu_count"] == n // 2
        assert b["worker_cpu_first"] == a["worker_cpu_first"] + n // 2
    with pytest.raises(ValueError):
        kh.cpu_share(0, n + 1)
    with pytest.raises(ValueError):  # was ZeroDivisionError (LOCAL_WORLD_SIZE=0)
        kh.cpu_share(0, 0)
