#!/usr/bin/env python3
"""CUDA runtime calls per unit of work from two nsys cuda_api_sum reports (CSV).

Two runs that differ only in their number of measured steps: the difference of their call counts
is the steps' own (the prompt, the build and the set-up cancel), divided by --per (e.g. layers x
steps x batch members). Prints one line per API, most calls first, and the total.
"""
import argparse
import csv
import sys


def read_counts(path):
    counts = {}
    with open(path, newline="") as f:
        lines = [line for line in f if line.strip()]
    # nsys may print progress lines first: the table starts at its header.
    start = next((i for i, line in enumerate(lines) if "Num Calls" in line), None)
    if start is None:
        return counts
    for row in csv.DictReader(lines[start:]):
        name = row.get("Name")
        calls = row.get("Num Calls")
        if name is None or calls is None:
            continue
        counts[name] = counts.get(name, 0) + int(float(calls))
    return counts


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("short", help="cuda_api_sum CSV of the run with fewer steps")
    ap.add_argument("long", help="cuda_api_sum CSV of the run with more steps")
    ap.add_argument("--per", type=float, required=True, help="units of work in the difference")
    ap.add_argument("--unit", default="step", help="the unit's name, for the output")
    args = ap.parse_args()
    if args.per <= 0:
        sys.exit("api_count: --per must be positive")
    short, long = read_counts(args.short), read_counts(args.long)
    if not long:
        sys.exit(f"api_count: no cuda_api_sum rows in {args.long}")
    diff = {k: (long.get(k, 0) - short.get(k, 0)) / args.per for k in set(short) | set(long)}
    total = 0.0
    for name, n in sorted(diff.items(), key=lambda kv: -kv[1]):
        if abs(n) < 0.005:
            continue
        total += n
        print(f"  {n:8.2f}  {name}")
    print(f"  {total:8.2f}  total CUDA runtime calls per {args.unit}")


if __name__ == "__main__":
    main()
