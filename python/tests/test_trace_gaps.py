"""tools/gpu_bench/trace_gaps.py (the device's idle gaps in a profiled span) on synthetic Chrome
traces, and e2e_bench.py --profile-dir writing the traces it reads (CPU smoke mode)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

TOOLS = Path(__file__).resolve().parents[2] / "tools" / "gpu_bench"


def _load(name):
    spec = importlib.util.spec_from_file_location(name, TOOLS / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _event(cat, name, ts, dur, tid=7):
    return {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur, "tid": tid}


def test_gaps_and_what_the_host_was_in(tmp_path, capsys):
    # Two streams' kernels overlap (busy 0-300 us), then 2 ms idle while the main thread sits in
    # a prefill call and a worker in cudaHostAlloc, then a copy.
    trace = {"traceEvents": [
        _event("kernel", "attention", 0, 200, tid=1),
        _event("kernel", "build", 100, 200, tid=2),
        _event("gpu_memcpy", "Memcpy DtoH", 2300, 100, tid=1),
        _event("python_function", "kvrt/_runtime.py(195): prefill", 250, 2100, tid=10),
        _event("cuda_runtime", "cudaHostAlloc", 400, 1500, tid=11),
        _event("cuda_runtime", "cudaLaunchKernel", 10, 5, tid=10),
    ]}
    path = tmp_path / "t.json"
    path.write_text(json.dumps(trace))
    assert _load("trace_gaps").main([str(path), "--min-ms", "1", "--host-calls", "1"]) == 0
    out = capsys.readouterr().out
    assert "first to last 2.40 ms, busy 0.40 ms, idle 2.00 ms in 1 gaps" in out
    assert "gap 2.00 ms at +0.30 ms: after 'build', before 'Memcpy DtoH'" in out
    assert "host thread 10: in kvrt/_runtime.py(195): prefill (2.10 ms)" in out
    assert "host thread 11: in cudaHostAlloc (1.50 ms)" in out
    assert "thread 11: +0 cudaHostAlloc 1.5" in out  # the long calls, per thread
    assert "cudaLaunchKernel" not in out.split("longer")[1]  # 5 us: not listed


def test_calls_in_a_span_are_broken_down_per_span(tmp_path, capsys):
    # Two 'attend' spans on thread 10: launches and an event sync inside them; a worker's call
    # (thread 11) inside the same time is not theirs, nor is a launch after the second span.
    trace = {"traceEvents": [
        _event("kernel", "k", 0, 10, tid=1),
        _event("user_annotation", "attend", 100, 50, tid=10),
        _event("cuda_runtime", "cudaLaunchKernel", 105, 4, tid=10),
        _event("cuda_runtime", "cudaLaunchKernel", 112, 4, tid=10),
        _event("cuda_runtime", "cudaEventSynchronize", 120, 20, tid=10),
        _event("cuda_runtime", "cudaMallocAsync", 110, 30, tid=11),
        _event("user_annotation", "attend", 200, 30, tid=10),
        _event("cuda_runtime", "cudaLaunchKernel", 205, 6, tid=10),
        _event("cuda_runtime", "cudaLaunchKernel", 240, 6, tid=10),
    ]}
    path = tmp_path / "t.json"
    path.write_text(json.dumps(trace))
    assert _load("trace_gaps").main([str(path), "--top", "0", "--calls-in", "attend"]) == 0
    out = capsys.readouterr().out
    assert "spans 'attend': 2, mean 40.0 us; CUDA runtime calls inside 17.0 us per span, " \
           "outside them 23.0 us" in out
    assert "cudaEventSynchronize" in out and "cudaMallocAsync" not in out
    assert "cudaLaunchKernel                   1.5 per span,     7.0 us per span (4.7 us each)" \
        in out
    assert _load("trace_gaps").main([str(path), "--top", "0", "--calls-in", "nope"]) == 0
    assert "no span named 'nope'" in capsys.readouterr().out


def test_a_trace_without_device_events_is_an_error(tmp_path, capsys):
    path = tmp_path / "cpu.json"
    path.write_text(json.dumps({"traceEvents": [_event("cpu_op", "aten::mm", 0, 10)]}))
    assert _load("trace_gaps").main([str(path)]) == 2
    assert "no device events" in capsys.readouterr().err
    assert _load("trace_gaps").main([str(tmp_path / "missing.json")]) == 2


def test_e2e_bench_writes_the_profiled_spans(tmp_path):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    traces = tmp_path / "traces"
    rc = _load("e2e_bench").main([
        "--device", "cpu", "--tiny", "--contexts", "300", "--new-tokens", "5", "--caches", "kvrt",
        "--warmup-tokens", "0", "--profile", "--profile-dir", str(traces)])
    assert rc == 0
    names = sorted(p.name for p in traces.iterdir())
    assert names == ["kvrt-300-prompt.json", "kvrt-300-token0.json", "kvrt-300-token4.json"]
    events = json.loads((traces / "kvrt-300-prompt.json").read_text())["traceEvents"]
    assert any(e.get("cat") == "python_function" for e in events)  # with Python calls
