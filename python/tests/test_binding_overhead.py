"""tools/gpu_bench/binding_overhead.py --calls on the CPU: the plumbing of the binding's own
benchmark (both tensor paths run and are reported; skipped without torch)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")

TOOLS = Path(__file__).resolve().parents[2] / "tools" / "gpu_bench"


def test_calls_mode_measures_both_paths_and_restores_the_fast_one(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(TOOLS))  # binding_overhead imports e2e_bench beside it
    spec = importlib.util.spec_from_file_location("binding_overhead", TOOLS / "binding_overhead.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "calls.json"
    assert mod.main(["--calls", "--device", "cpu", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    for path in ("capsule", "dlpack"):
        assert res[f"{path}_attend_us"] > 0 and res[f"{path}_library_us"] > 0
    from kvrt import _runtime
    import torch
    assert _runtime._Torch.tensor is torch.Tensor  # the generic path's switch was undone
    assert mod.main(["--device", "cpu"]) == 2  # neither --trace nor --calls
    sys.modules.pop("e2e_bench", None)
