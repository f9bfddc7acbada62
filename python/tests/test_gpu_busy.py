"""tools/gpu_bench/gpu_busy.py: a decode run's device timeline summed per layer-step, on a
synthetic timeline in kernel_trace_inject's CSV format."""

from __future__ import annotations

import gzip
import importlib.util
import sys
from pathlib import Path

import pytest

TOOLS = Path(__file__).resolve().parents[2] / "tools" / "gpu_bench"
STEP = "_ZN4kvrt3gpu12_GLOBAL__N_118DirectAttendKernelILi128EEEvv"


def _tool():
    spec = importlib.util.spec_from_file_location("gpu_busy", TOOLS / "gpu_busy.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _run(mod, monkeypatch, *args):
    monkeypatch.setattr(sys, "argv", ["gpu_busy.py", *args])
    mod.main()


def test_short_name_takes_the_function_from_a_mangled_name():
    mod = _tool()
    assert mod.short_name(STEP) == "DirectAttendKernel"
    assert mod.short_name("_Z7FillF32v") == "FillF32"
    assert mod.short_name("plain_name") == "plain_name"


def test_union_counts_overlapping_intervals_once():
    mod = _tool()
    assert mod.union_length([(0, 10), (5, 15), (20, 30)]) == 25
    assert mod.union_length([(0, 10), (2, 3)]) == 10
    assert mod.union_length([]) == 0


def test_the_window_is_the_step_kernels_and_counts_members(tmp_path, monkeypatch, capsys):
    # Two layer-steps of two members: the step kernels span [1000, 7000) ns; the kernel at
    # [0, 100) (the prompt's) lies outside the window; the two members of a step overlap.
    lines = [
        "K,0,100,7,_Z5Scorev",
        f"K,1000,2000,7,{STEP}",
        f"K,1500,2500,8,{STEP}",
        "M,1200,1300,7,4096",
        "K,3000,4000,7,_Z5Scorev",
        f"K,5000,6000,7,{STEP}",
        f"K,5500,7000,9,{STEP}",
    ]
    path = tmp_path / "t.csv.gz"
    with gzip.open(path, "wt") as f:
        f.write("\n".join(lines) + "\n")
    _run(_tool(), monkeypatch, str(path), "--members", "2")
    out = capsys.readouterr().out
    assert "2 layer-steps of 2 member(s)" in out
    # wall 6000 ns / 2 = 3.0 us; busy 1500 + 1000 + 2000 = 4500 ns / 2 = 2.2 us (75%); summed
    # 5500 ns / 2 = 2.8 us; copies 100 ns / 2
    assert "wall 3.0 us, a kernel running 2.2 us (75%), kernels summed 2.8 us" in out
    assert "copies 0.1 us" in out
    row = next(line for line in out.splitlines() if line.startswith("DirectAttendKernel"))
    assert row.split()[1:] == ["2.00", "2.2", "1.1"]  # per step, us per step, us each


def test_a_timeline_without_step_kernels_is_an_error(tmp_path, monkeypatch):
    path = tmp_path / "t.csv"
    path.write_text("K,0,100,7,_Z5Scorev\n")
    with pytest.raises(SystemExit, match="no kernel named like"):
        _run(_tool(), monkeypatch, str(path))
