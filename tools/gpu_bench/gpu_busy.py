#!/usr/bin/env python3
"""How busy the GPU is during a decode run, from its device timeline: the CSV that
kernel_trace_inject.cc writes (`K,start,end,stream,name` per kernel, `M`/`S` per copy or memset).

The window is the decode steps': from the first to the last kernel whose name contains --step-kernel
(the direct step's attention, which only decode steps launch). Within it, per layer-step (the step
kernels counted, divided by --members): the window's wall time, the time some kernel ran (the union
of their intervals), the kernels' summed time (more than the union where kernels of several streams
overlap), the memory copies' union, and per kernel name its count and time. A step bound by the
GPU shows a union close to the wall time; a step bound by the host shows gaps.
"""
import argparse
import gzip
import sys
from collections import defaultdict


def union_length(intervals):
    total, end = 0, None
    for s, e in sorted(intervals):
        if end is None or s > end:
            total += e - s
            end = e
        elif e > end:
            total += e - end
            end = e
    return total


def short_name(name):
    """The function's own name from an Itanium-mangled one (_ZN4kvrt3gpu...18DirectAttendKernelI...)."""
    if not name.startswith("_Z"):
        return name
    i = 3 if name.startswith("_ZN") else 2
    last = name
    while i < len(name) and name[i].isdigit():
        j = i
        while j < len(name) and name[j].isdigit():
            j += 1
        n = int(name[i:j])
        last = name[j:j + n]
        i = j + n
    return last


def load(path):
    kernels, copies = [], []
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt") as f:
        for line in f:
            parts = line.rstrip("\n").split(",", 4)
            if len(parts) != 5:
                continue
            start, end = int(parts[1]), int(parts[2])
            if parts[0] == "K":
                kernels.append((start, end, short_name(parts[4])))
            elif parts[0] in ("M", "S"):
                copies.append((start, end))
    return kernels, copies


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("trace", help="kernel_trace_inject CSV (or .csv.gz)")
    ap.add_argument("--members", type=int, default=1, help="batch members per layer-step")
    ap.add_argument("--step-kernel", default="DirectAttendKernel",
                    help="a name part of the kernel each member launches once per layer-step")
    ap.add_argument("--top", type=int, default=12, help="kernel names listed")
    args = ap.parse_args()
    if args.members < 1:
        sys.exit("gpu_busy: --members must be >= 1")
    kernels, copies = load(args.trace)
    marks = [(s, e) for s, e, n in kernels if args.step_kernel in n]
    if not marks:
        sys.exit(f"gpu_busy: no kernel named like '{args.step_kernel}' in {args.trace}")
    lo, hi = min(s for s, _ in marks), max(e for _, e in marks)
    steps = len(marks) / args.members
    inside = [(s, e, n) for s, e, n in kernels if s >= lo and e <= hi]
    wall = hi - lo
    busy = union_length([(s, e) for s, e, _ in inside])
    summed = sum(e - s for s, e, _ in inside)
    copy_busy = union_length([(s, e) for s, e in copies if s >= lo and e <= hi])
    per = 1e3 * steps  # ns -> us per layer-step
    print(f"window: {wall / 1e6:.1f} ms, {steps:.0f} layer-steps of {args.members} member(s)")
    print(f"per layer-step: wall {wall / per:.1f} us, a kernel running {busy / per:.1f} us "
          f"({100.0 * busy / wall:.0f}%), kernels summed {summed / per:.1f} us "
          f"(overlap {summed / max(busy, 1):.2f}x), copies {copy_busy / per:.1f} us")
    by_name = defaultdict(lambda: [0, 0])
    for s, e, n in inside:
        by_name[n][0] += 1
        by_name[n][1] += e - s
    print(f"{'kernel':48s} {'per step':>9s} {'us/step':>9s} {'us each':>9s}")
    for n, (c, t) in sorted(by_name.items(), key=lambda kv: -kv[1][1])[:args.top]:
        print(f"{n[:48]:48s} {c / steps:9.2f} {t / per:9.1f} {t / c / 1e3:9.1f}")


if __name__ == "__main__":
    main()
