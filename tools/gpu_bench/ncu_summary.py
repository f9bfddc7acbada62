#!/usr/bin/env python3
"""Sums an `ncu --print-summary per-kernel --metrics gpu__time_duration.sum` log per kernel.

Usage: ncu_summary.py NCU_LOG [--steps N]

Prints per kernel name (template arguments and launch shapes folded together): launches, the
device time per step (launches x mean duration / N) and per launch, and their sum. ncu times each
kernel alone, so the sum is the device work with no overlap between kernels.
"""
import argparse
import re
import sys


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("log")
    ap.add_argument("--steps", type=int, default=1, help="steps the profiled run made")
    args = ap.parse_args()
    try:
        lines = open(args.log).read().splitlines()
    except OSError as e:
        sys.exit(f"ncu_summary: cannot read {args.log}: {e}")
    totals = {}
    for i, line in enumerate(lines):
        m = re.search(r"Invocations (\d+)", line)
        if not m:
            continue
        for nxt in lines[i + 1:i + 12]:
            if "gpu__time_duration" in nxt:
                name = re.sub(r"\(.*", "", line.strip()).replace("void ", "")
                name = re.sub(r"<.*", "", name.replace("(anonymous namespace)::", "")
                              .replace("unnamed>::", ""))
                launches, mean = int(m.group(1)), float(nxt.split()[-1])
                t = totals.setdefault(name, [0, 0.0])
                t[0] += launches
                t[1] += launches * mean
                break
    if not totals:
        sys.exit("ncu_summary: no kernel with gpu__time_duration in the log")
    steps = max(1, args.steps)
    total = 0.0
    print(f"{'kernel':26s}{'launches':>9s}{'us per step':>13s}{'us per launch':>15s}")
    for name, (n, t) in sorted(totals.items(), key=lambda kv: -kv[1][1]):
        total += t
        print(f"{name:26s}{n:9d}{t / steps:13.1f}{t / n:15.1f}")
    print(f"{'sum':26s}{'':9s}{total / steps:13.1f}")


if __name__ == "__main__":
    main()
