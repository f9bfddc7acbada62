"""kvrt beside a decoder's CUDA graphs: torch captures its own work in the global mode while kvrt
works on another thread, and neither breaks the other (kvrt.h, "CUDA graphs")."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

import kvrt

torch = pytest.importorskip("torch")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_torch_graphs_captured_beside_kvrt_work():
    """torch.cuda.graph (its default capture_error_mode is "global") in a loop on one thread while
    another prefills a cluster-kind sequence (its clusters built on the GPU in a background job)
    and decodes: every capture replays what it captured, and kvrt's outputs equal those of a run
    with no capture beside it. The budget selects every cold token, so both runs attend exactly
    whatever clusters their builds made."""
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
    # Outputs allocated up front: while the captures run this thread calls kvrt only (a torch
    # allocation could reach cudaMalloc, which the global mode forbids).
    outs = [[torch.empty(8, 64, device="cuda") for _ in range(steps * layers)] for _ in range(2)]
    torch.cuda.synchronize()

    def decode(run: int) -> kvrt.Runtime:
        rt = kvrt.Runtime(**cfg)
        seq = rt.sequence()
        for layer, (q, k, v) in enumerate(prompts):
            seq.prefill(layer, q, k, v)
        for i, (q, k, v) in enumerate(tokens):
            seq.append_attend(i % layers, q, k, v, outs[run][i])
        seq.wait()
        return rt

    rt_alone = decode(0)

    stop = threading.Event()
    failures: list[str] = []
    replays = [0]

    def capture_loop():
        try:
            x = torch.ones(256, device="cuda")
            while not stop.is_set():
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    y = x * (replays[0] + 2)
                    time.sleep(0.002)  # kvrt works meanwhile
                graph.replay()
                torch.cuda.synchronize()
                if not bool((y == replays[0] + 2).all()):
                    failures.append(f"replay {replays[0]} computed {y[0].item()}")
                replays[0] += 1
        except Exception as e:  # noqa: BLE001 - reported by the test below
            failures.append(repr(e))

    capturer = threading.Thread(target=capture_loop)
    capturer.start()
    try:
        rt_beside = decode(1)
    finally:
        stop.set()
        capturer.join()
    # Device-wide waits only now: the global mode forbids them beside a capture, to anyone.
    torch.cuda.synchronize()
    alone, beside = rt_alone.stats(), rt_beside.stats()
    assert not failures, failures[:3]
    assert replays[0] > 0
    assert alone.segments_built_gpu > 0 and beside.segments_built_gpu > 0
    assert beside.attends_direct == alone.attends_direct > 0, "no step fell back"
    for a, b in zip(outs[0], outs[1]):
        np.testing.assert_allclose(b.cpu().numpy(), a.cpu().numpy(), rtol=1e-3, atol=2e-4)
