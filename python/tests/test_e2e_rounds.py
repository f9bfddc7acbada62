"""tools/gpu_bench/e2e_rounds.py: kvrt against a peer round by round over e2e_bench.py's JSON
lines, on synthetic records."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

TOOLS = Path(__file__).resolve().parents[2] / "tools" / "gpu_bench"


def _tool():
    spec = importlib.util.spec_from_file_location("e2e_rounds", TOOLS / "e2e_rounds.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _rec(cache, rnd, tok_s, context=131072, status="ok"):
    return {"cache": cache, "round": rnd, "context": context, "status": status,
            "decode_tokens_per_s": tok_s, "decode_ms_p50": 1000.0 / tok_s}


def _write(path, recs):
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return str(path)


def test_pairs_each_round_with_its_own_peer(tmp_path, capsys):
    a = _write(tmp_path / "a.jsonl", [_rec("dynamic", 1, 200.0), _rec("kvrt", 1, 150.0),
                                      _rec("dynamic", 2, 300.0), _rec("kvrt", 2, 180.0)])
    # A failed peer and another context are left out, not paired with another round's figure.
    b = _write(tmp_path / "b.jsonl", [_rec("dynamic", 1, 100.0, status="oom"), _rec("kvrt", 1, 90.0),
                                      _rec("dynamic", 2, 100.0), _rec("kvrt", 2, 90.0),
                                      _rec("dynamic", 1, 50.0, context=32768),
                                      _rec("kvrt", 1, 60.0, context=32768)])
    assert _tool().main([a, b, "--context", "131072", "--target", "0.7"]) == 0
    out = capsys.readouterr().out
    # Ratios 0.75, 0.60, 0.90: median 0.75, two of three at or above 0.7.
    assert "3 rounds: median 0.75, min 0.60, max 0.90; 2 of 3 at or above 0.7" in out


def test_no_pair_is_an_error(tmp_path, capsys):
    a = _write(tmp_path / "a.jsonl", [_rec("kvrt", 1, 150.0)])
    assert _tool().main([a]) == 1
    assert "no round holds both kvrt and dynamic" in capsys.readouterr().err
