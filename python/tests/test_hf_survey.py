"""tools/hf_survey/survey.py: a family that matches, one kvrt.hf refuses, and a name that is not
a family (a usage error). Skipped without torch/transformers."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

SURVEY = pathlib.Path(__file__).resolve().parents[2] / "tools" / "hf_survey" / "survey.py"


def test_the_survey_classifies_a_match_and_a_refusal(tmp_path):
    out = tmp_path / "s.jsonl"
    p = subprocess.run([sys.executable, str(SURVEY), "--jsonl", str(out), "llama",
                        "falcon@alibi"], capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr
    rows = {r["family"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert rows["llama"]["class"] == "match"
    assert rows["falcon@alibi"]["class"] == "refused"
    assert "adds a bias to the scores" in rows["falcon@alibi"]["reason"]
    assert "match 1, refused 1" in p.stdout


def test_the_survey_refuses_a_name_that_is_not_a_family():
    p = subprocess.run([sys.executable, str(SURVEY), "no_such_family"], capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 2 and "not a causal-LM family" in p.stderr
