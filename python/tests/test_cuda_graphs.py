"""kvrt beside a decoder's CUDA graphs: torch captures its own work on one thread while kvrt works
on another, and neither breaks the other (kvrt.h, "CUDA graphs")."""

from __future__ import annotations

import time
from typing import Optional

import numpy as np
import pytest

import kvrt

torch = pytest.importorskip("torch")

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture
def capture_loop(gpu_bench_tool):
    """tools/gpu_bench/capture_beside_kvrt.py's CaptureLoop(mode="global"): torch.cuda.graph
    (capture_error_mode=mode) around a multiply and a 2 ms sleep on a thread of its own, each
    graph replayed and checked."""
    return gpu_bench_tool("capture_beside_kvrt").CaptureLoop


@needs_cuda
def test_the_capture_loop_alone_replays(capture_loop):
    """The harness by itself: every capture replays what it captured."""
    with capture_loop() as loop:
        time.sleep(0.3)
    assert not loop.failure, loop.failure
    assert loop.replays > 0


@needs_cuda
@pytest.mark.parametrize("mode", ["global", "thread_local"])
@pytest.mark.parametrize("kvrt_stream", ["current", "side"])
def test_torch_graphs_captured_beside_kvrt_work(kvrt_stream, mode, capture_loop):
    """The capture loop on one thread, in torch's default global mode or the thread-local one,
    while another makes a runtime, prefills a cluster-kind sequence (its clusters built on the
    GPU in a background job), decodes, and releases the sequence and the runtime, on torch's
    current stream or a side stream: every capture replays, and kvrt's outputs equal those of a
    run with no capture beside it. The budget selects every cold token, so both runs attend
    exactly whatever clusters their builds made. (In the global mode torch's own work on another
    thread can invalidate a capture: docs/gpu.md, "A capture beside kvrt's work".)"""
    cfg = dict(num_layers=2, num_q_heads=8, num_kv_heads=2, head_dim=64, dtype="bf16",
               window_tokens=64, index_kind="cluster", cluster_budget_fraction=1.0,
               worker_threads=4, use_gpu=1)
    layers, prompt, steps = 2, 8192 + 600, 12
    gen = torch.Generator(device="cuda").manual_seed(7)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, device="cuda").to(torch.bfloat16)

    prompts = [(randn(prompt, 8, 64), randn(prompt, 2, 64), randn(prompt, 2, 64))
               for _ in range(layers)]
    tokens = [(randn(8, 64), randn(1, 2, 64), randn(1, 2, 64)) for _ in range(steps * layers)]
    # Outputs allocated up front: while the captures run this thread calls kvrt only.
    outs = [[torch.empty(8, 64, device="cuda") for _ in range(steps * layers)] for _ in range(2)]
    side: Optional[torch.cuda.Stream] = torch.cuda.Stream() if kvrt_stream == "side" else None
    torch.cuda.synchronize()

    def decode(run: int):
        """A runtime's whole life: its statistics at the end."""
        stream: Optional[int] = side.cuda_stream if side is not None else None
        rt = kvrt.Runtime(**cfg)
        seq = rt.sequence()
        for layer, (q, k, v) in enumerate(prompts):
            seq.prefill(layer, q, k, v, stream=stream)
        for i, (q, k, v) in enumerate(tokens):
            seq.append_attend(i % layers, q, k, v, outs[run][i], stream=stream)
        seq.wait()
        stats = rt.stats()
        seq.release()
        rt.close()
        return stats

    alone = decode(0)
    with capture_loop(mode) as loop:
        beside = decode(1)
    # Device-wide waits only after the captures have ended.
    torch.cuda.synchronize()
    assert not loop.failure, loop.failure
    assert loop.replays > 0
    assert alone.segments_built_gpu > 0 and beside.segments_built_gpu > 0
    assert beside.attends_direct == alone.attends_direct > 0, "no step fell back"
    for a, b in zip(outs[0], outs[1]):
        np.testing.assert_allclose(b.cpu().numpy(), a.cpu().numpy(), rtol=1e-3, atol=2e-4)
