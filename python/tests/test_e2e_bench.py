"""tools/gpu_bench/e2e_bench.py (issue 15 item 4) in its CPU smoke mode: the plumbing of the
end-to-end benchmark (tiny Llama, DynamicCache and kvrt; skipped without torch/transformers)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

SCRIPT = Path(__file__).resolve().parents[2] / "tools" / "gpu_bench" / "e2e_bench.py"


def _bench():
    spec = importlib.util.spec_from_file_location("e2e_bench", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _run(tmp_path, *extra):
    out = tmp_path / "e2e.jsonl"
    rc = _bench().main(["--device", "cpu", "--tiny", "--contexts", "300", "--new-tokens", "3",
                        "--warmup-tokens", "0", "--json", str(out), *extra])
    assert rc == 0
    return {r["cache"]: r for r in map(json.loads, out.read_text().splitlines())}


def test_cpu_smoke_dynamic_and_kvrt(tmp_path):
    recs = _run(tmp_path)
    assert list(recs) == ["dynamic", "offloaded", "kvrt"]
    assert recs["offloaded"]["status"].startswith("skipped")  # needs CUDA
    for kind in ("dynamic", "kvrt"):
        r = recs[kind]
        assert r["status"] == "ok", r
        assert r["context"] == 300 and r["layers"] == 2 and r["new_tokens"] == 3
        assert r["ttft_s"] > 0 and r["decode_tokens_per_s"] > 0
        assert r["ttft_ms_per_layer"] == pytest.approx(r["ttft_s"] * 1e3 / 2)
        assert "peak_gpu_bytes" not in r  # CPU: no GPU figures
    k = recs["kvrt"]
    assert k["kvrt_config"]["index_kind"] == "cluster" and k["kvrt_config"]["use_gpu"] == 0
    # 300 prompt tokens + 3 decoded, window 64: most of them are cold, in kvrt's host tier.
    assert k["kvrt_stats"]["host_tokens"] > 0 and k["kvrt_stats"]["attend_calls"] == 3 * 2
    # kvrt's calls' time per token: one entry per token, each within that token's time.
    assert len(k["kvrt_ms_tokens"]) == len(k["decode_ms_tokens"]) == 3
    assert all(0 < c <= t for c, t in zip(k["kvrt_ms_tokens"], k["decode_ms_tokens"]))
    assert "kvrt_ms_tokens" not in recs["dynamic"]


def test_cpu_smoke_gpt_oss(tmp_path):
    """--family gpt-oss: learned sinks and sliding layers; the DynamicCache peer on kvrt.hf's SDPA
    attention with sinks (transformers has none), kvrt on its full-attention layers."""
    recs = _run(tmp_path, "--family", "gpt-oss", "--caches", "dynamic,kvrt")
    assert recs["dynamic"]["status"] == "ok", recs["dynamic"]
    k = recs["kvrt"]
    assert k["status"] == "ok", k
    # 2 layers: one sliding (transformers' cache), one full (kvrt): 1 attend per decode step.
    assert k["kvrt_stats"]["attend_calls"] == 3 and k["kvrt_config"]["num_q_heads"] == 8


def test_cpu_smoke_deepseek_latent_and_expanded(tmp_path):
    """--family deepseek-v2-lite: MLA held as its latent (kvrt) and expanded (kvrt-b) in one run;
    the latent holds one row of kv_lora_rank + qk_rope_head_dim (64 + 16) per token (its value
    is its key), the expanded form 4 heads of 48 (32 + 16), keys and values: its host store is
    2 x 4 x 48 / 80 = 4.8x the latent's."""
    recs = _run(tmp_path, "--family", "deepseek-v2-lite", "--caches", "dynamic,kvrt,kvrt-b",
                "--kvrt-b", "mla=expanded")
    for kind in ("dynamic", "kvrt", "kvrt-b"):
        assert recs[kind]["status"] == "ok", recs[kind]
    lat, exp = recs["kvrt"], recs["kvrt-b"]
    assert (lat["kvrt_config"]["num_kv_heads"], lat["kvrt_config"]["head_dim"]) == (1, 80)
    assert (lat["kvrt_config"]["values_are_keys"], exp["kvrt_config"]["values_are_keys"]) == (1, 0)
    assert (exp["kvrt_config"]["num_kv_heads"], exp["kvrt_config"]["head_dim"]) == (4, 48)
    assert lat["kvrt_stats"]["host_tokens"] == exp["kvrt_stats"]["host_tokens"] > 0
    assert exp["kvrt_stats"]["host_bytes"] * 80 == lat["kvrt_stats"]["host_bytes"] * 2 * 4 * 48


def test_cpu_smoke_chunked_prompt(tmp_path):
    """--prefill-chunk: the prompt in forwards of 128 tokens (kvrt with chunked_prompt), the
    same tokens in every tier as in one forward, and kvrt attends only the decode tokens."""
    recs = _run(tmp_path, "--prefill-chunk", "128", "--caches", "dynamic,kvrt")
    for kind in ("dynamic", "kvrt"):
        assert recs[kind]["status"] == "ok" and recs[kind]["prefill_chunk"] == 128
    st = recs["kvrt"]["kvrt_stats"]
    assert st["attend_calls"] == 3 * 2
    assert st["host_tokens"] + st["gpu_tokens"] == 2 * (300 + 3)


def test_out_of_memory_is_reported_not_raised(tmp_path):
    recs = _run(tmp_path, "--caches", "kvrt", "--kvrt", "host_memory_limit=100000")
    assert list(recs) == ["kvrt"]
    assert recs["kvrt"]["status"] == "out of memory"
    assert "OutOfMemoryError" in recs["kvrt"]["error"]


def test_kvrt_b_and_rounds(tmp_path):
    """--caches kvrt,kvrt-b with --kvrt-b options: two kvrt configurations in one process,
    --rounds 2 measuring each twice (rounds outermost), each record naming its round."""
    out = tmp_path / "e2e.jsonl"
    rc = _bench().main(["--device", "cpu", "--tiny", "--contexts", "300", "--new-tokens", "2",
                        "--warmup-tokens", "0", "--json", str(out), "--caches", "kvrt,kvrt-b",
                        "--kvrt-b", "cluster_group_select=0", "--rounds", "2"])
    assert rc == 0
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["round"], r["cache"]) for r in recs] == [
        (1, "kvrt"), (1, "kvrt-b"), (2, "kvrt"), (2, "kvrt-b")]
    for r in recs:
        assert r["status"] == "ok", r
        want = 0 if r["cache"] == "kvrt-b" else 1
        assert r["kvrt_config"]["cluster_group_select"] == want
        assert r["host_mb_per_layer_step"] >= 0


def test_cpu_smoke_every_prompt_query_option(tmp_path):
    """--kvrt-b-prompt-queries all: kvrt-b gets every prompt query (0.3.28's data flow), kvrt only
    the rows kvrt_prefill_query_rows names (the plumbing: at 300 tokens kvrt reads every row, so
    both hand kvrt the same queries and attend the same tokens; the index's equality for a real
    sample is test_attention.py's and the C API tests')."""
    recs = _run(tmp_path, "--family", "deepseek-v2-lite", "--caches", "kvrt,kvrt-b",
                "--kvrt-b-prompt-queries", "all")
    for kind in ("kvrt", "kvrt-b"):
        assert recs[kind]["status"] == "ok", recs[kind]
    assert recs["kvrt"]["kvrt_stats"]["cold_tokens_attended"] == \
        recs["kvrt-b"]["kvrt_stats"]["cold_tokens_attended"] > 0
