"""Which work beside a torch CUDA graph capture invalidates it: a probe for the GPU machine.

A thread captures torch.cuda.graph (a multiply and a 2 ms sleep) in a loop, replaying and
checking each graph, while the main thread runs one of the cases below for about a second. Prints
one line per case: the captures replayed, the loop's first failure (its stage: enter, body, exit,
replay) and the main thread's first exception.

  python3 tools/gpu_bench/capture_beside_kvrt.py [--mode global|thread_local|relaxed]
      [--cases alone,torch,dlpack,kvrt-side,kvrt-current,kvrt-side-decode]

Needs torch with CUDA and the kvrt package (built against a GPU build of libkvrt)."""

from __future__ import annotations

import argparse
import threading
import time

import torch


class CaptureLoop:
    """The capturing thread, as a context manager: started on entry, stopped and joined on exit.
    failure: "" or the first error with its stage (enter: capture_begin, body, exit:
    capture_end, replay); replays: the graphs replayed and checked."""

    def __init__(self, mode: str = "global"):
        self.mode = mode
        self.stop = threading.Event()
        self.failure = ""
        self.replays = 0
        self.thread = threading.Thread(target=self.run)

    def __enter__(self) -> "CaptureLoop":
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()

    def run(self) -> None:
        stage = "setup"
        try:
            x = torch.ones(256, device="cuda")
            while not self.stop.is_set():
                graph = torch.cuda.CUDAGraph()
                factor = self.replays + 2
                stage = "enter"
                ctx = torch.cuda.graph(graph, capture_error_mode=self.mode)
                ctx.__enter__()
                try:
                    stage = "body"
                    y = x * factor
                    time.sleep(0.002)
                finally:
                    stage = "exit"
                    ctx.__exit__(None, None, None)
                stage = "replay"
                graph.replay()
                torch.cuda.synchronize()
                if not bool((y == factor).all()):
                    raise RuntimeError(f"replay computed {y[0].item()}")
                self.replays += 1
        except Exception as e:  # noqa: BLE001 - reported
            self.failure = f"{stage}: {str(e).splitlines()[0][:160]}"


def kvrt_work(stream_kind: str, decode_only: bool = False):
    """kvrt's work as a callable: a runtime, a 2-layer prefill (its clusters built on the GPU)
    and 20 decode steps per layer; decode_only: the runtime and the prefill made now, outside the
    captures, and only the decode steps in the callable."""
    import kvrt
    cfg = dict(num_layers=2, num_q_heads=8, num_kv_heads=2, head_dim=64, dtype="bf16",
               window_tokens=64, index_kind="cluster", worker_threads=4, use_gpu=1)
    g = torch.Generator(device="cuda").manual_seed(1)

    def randn(*shape):
        return torch.randn(*shape, generator=g, device="cuda").to(torch.bfloat16)

    prompt = 8192 + 600
    prompts = [(randn(prompt, 8, 64), randn(prompt, 2, 64), randn(prompt, 2, 64))
               for _ in range(2)]
    tokens = [(randn(8, 64), randn(1, 2, 64), randn(1, 2, 64)) for _ in range(40)]
    outs = [torch.empty(8, 64, device="cuda") for _ in tokens]
    side = torch.cuda.Stream() if stream_kind == "side" else None
    stream = side.cuda_stream if side is not None else None
    torch.cuda.synchronize()

    def prefilled():
        rt = kvrt.Runtime(**cfg)
        seq = rt.sequence()
        for layer, (q, k, v) in enumerate(prompts):
            seq.prefill(layer, q, k, v, stream=stream)
        return rt, seq

    def decode(rt, seq):
        for i, (q, k, v) in enumerate(tokens):
            seq.append_attend(i % 2, q, k, v, outs[i], stream=stream)
        seq.wait()
        return rt

    if decode_only:
        made = []

        def warm_then_decode():
            if not made:  # the warm-up call: a whole run, then the next call's runtime, prefilled
                decode(*prefilled())
                rt, seq = prefilled()
                seq.wait()
                made.append((rt, seq))
                return None
            return decode(*made.pop())

        return warm_then_decode
    return lambda: decode(*prefilled())


def dlpack_work():
    """Only what the kvrt package does to a torch tensor before each call: its DLPack capsule."""
    import torch.utils.dlpack
    t = torch.ones(8, 64, device="cuda")
    torch.cuda.synchronize()

    def run():
        end = time.time() + 0.5
        while time.time() < end:
            torch.utils.dlpack.to_dlpack(t)
        return None

    return run


def torch_work():
    a = torch.randn(512, 512, device="cuda")
    side = torch.cuda.Stream()
    torch.cuda.synchronize()

    def run():
        with torch.cuda.stream(side):
            for _ in range(200):
                torch.mm(a, a)
            time.sleep(0.5)
        return None

    return run


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mode", default="global", choices=["global", "thread_local", "relaxed"])
    p.add_argument("--cases", default="alone,torch,kvrt-side,kvrt-current",
                   help="of alone, torch, dlpack, kvrt-side, kvrt-current, kvrt-side-decode "
                        "(the runtime and prefill made before the captures)")
    args = p.parse_args()
    for case in args.cases.split(","):
        work = {"alone": lambda: (lambda: time.sleep(0.5)), "torch": torch_work,
                "dlpack": dlpack_work,
                "kvrt-side": lambda: kvrt_work("side"),
                "kvrt-current": lambda: kvrt_work("current"),
                "kvrt-side-decode": lambda: kvrt_work("side", decode_only=True)}[case]()
        if case.startswith("kvrt"):
            work()  # once without captures: the kernels loaded, the process warm
        error = ""
        with CaptureLoop(args.mode) as loop:
            try:
                work()
            except Exception as e:  # noqa: BLE001 - reported
                error = str(e).splitlines()[0][:200]
        torch.cuda.synchronize()
        print(f"{case:17s} mode {args.mode:12s} replays {loop.replays:4d}  "
              f"capture failure: {loop.failure or '-'}  main thread: {error or '-'}", flush=True)


if __name__ == "__main__":
    main()
