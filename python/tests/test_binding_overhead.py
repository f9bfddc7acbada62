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
    assert res["step_two_calls_us"] > 0 and res["step_one_call_us"] > 0
    assert res["batch16_step_calls_us"] > 0 and res["batch16_step_one_call_us"] > 0
    from kvrt import _runtime
    import torch
    assert _runtime._Torch.tensor is torch.Tensor  # the generic path's switch was undone
    assert mod.main(["--device", "cpu"]) == 2  # neither --trace nor --calls
    sys.modules.pop("e2e_bench", None)


def test_trace_mode_on_the_cpu_writes_its_profile(tmp_path, monkeypatch):
    """Trace mode (the layer-steps of bench decode through the package) on a small trace written
    here, with --profile-dir: the figures are reported and the profiled steps' timeline is a
    Chrome trace holding each step's append and attend spans."""
    import torch
    from safetensors.torch import save_file

    monkeypatch.syspath_prepend(str(TOOLS))
    spec = importlib.util.spec_from_file_location("binding_overhead", TOOLS / "binding_overhead.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    g = torch.Generator().manual_seed(1)
    prompt, steps, qh, kvh, d = 4 + 256 + 64, 6, 4, 2, 64
    tensors = {f"0.{part}.{x}": torch.randn(n, h, d, generator=g).to(torch.bfloat16)
               for part, n in (("prefill", prompt), ("decode", steps))
               for x, h in (("q", qh), ("k", kvh), ("v", kvh))}
    meta = {"prompt_tokens": str(prompt), "decode_steps": str(steps), "num_q_heads": str(qh),
            "num_kv_heads": str(kvh), "head_dim": str(d)}
    trace = tmp_path / "t.safetensors"
    save_file(tensors, str(trace), metadata=meta)
    out, prof = tmp_path / "r.json", tmp_path / "prof"
    assert mod.main(["--trace", str(trace), "--cold", "256", "--window", "64", "--steps", "3",
                     "--warmup", "1", "--device", "cpu", "--index", "flat", "--json", str(out),
                     "--profile-dir", str(prof), "--profile-steps", "2"]) == 0
    res = json.loads(out.read_text())
    assert res["layer_step_us_p50"] > 0 and res["append_us_mean"] > 0
    assert res["fused_layer_step_us_p50"] > 0  # steps 1 and 3 through Sequence.append_attend
    names = {e.get("name") for e in json.loads((prof / "binding-steps.json").read_text())
             ["traceEvents"]}
    assert {"append", "attend", "step1.layer1"} <= names
    # Asking for more steps than the trace holds is refused with the counts.
    with pytest.raises(SystemExit, match="6 decode steps"):
        mod.main(["--trace", str(trace), "--cold", "256", "--window", "64", "--steps", "9",
                  "--device", "cpu"])
    sys.modules.pop("e2e_bench", None)
