#!/usr/bin/env python3
"""Sums a KVRT_TIMELINE file (Chrome trace-event JSON written by libkvrt) per span name.

Usage: timeline_summary.py TIMELINE.json [--skip-ms N]

Prints, per span name: count, total, mean, p50, p99 and max (us), and the threads that ran it;
then the share of the layer-steps' wall time that some thread spent in each span (how much of a
step a span covers, overlaps counted once). --skip-ms drops the first N ms (prefill, warm-up).
"""
import argparse
import collections
import json
import statistics
import sys


def percentile(values, p):
    values = sorted(values)
    return values[min(len(values) - 1, int(p / 100.0 * len(values)))]


def covered(intervals):
    """Total length of the union of [begin, end) intervals."""
    total, end = 0.0, float("-inf")
    for b, e in sorted(intervals):
        if e <= end:
            continue
        total += e - max(b, end)
        end = e
    return total


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("timeline")
    ap.add_argument("--skip-ms", type=float, default=0.0,
                    help="ignore spans that begin in the first N ms")
    args = ap.parse_args()
    try:
        with open(args.timeline) as f:
            events = json.load(f)["traceEvents"]
    except (OSError, ValueError, KeyError) as e:
        sys.exit(f"timeline_summary: cannot read {args.timeline}: {e}")
    events = [e for e in events if e.get("ph") == "X" and e["ts"] >= args.skip_ms * 1e3]
    if not events:
        sys.exit("timeline_summary: no spans (was KVRT_TIMELINE set, and did a step run?)")
    by_name = collections.defaultdict(list)
    threads = collections.defaultdict(set)
    for e in events:
        by_name[e["name"]].append(e["dur"])
        threads[e["name"]].add(e["tid"])
    print(f"{'span':<24}{'count':>8}{'total ms':>11}{'mean us':>10}{'p50 us':>9}"
          f"{'p99 us':>9}{'max us':>9}{'threads':>9}")
    for name, d in sorted(by_name.items(), key=lambda kv: -sum(kv[1])):
        print(f"{name:<24}{len(d):>8}{sum(d) / 1e3:>11.2f}{statistics.mean(d):>10.1f}"
              f"{percentile(d, 50):>9.1f}{percentile(d, 99):>9.1f}{max(d):>9.1f}"
              f"{len(threads[name]):>9}")
    steps = [(e["ts"], e["ts"] + e["dur"]) for e in events if e["name"] == "layer_step"]
    if not steps:
        return
    wall = covered(steps)
    print(f"\nlayer-steps: {len(steps)}, {wall / 1e3:.2f} ms of wall time; "
          "share of it some thread spent in each span:")
    for name in sorted(by_name):
        if name == "layer_step":
            continue
        inside = []
        for e in events:
            if e["name"] != name:
                continue
            b, t = e["ts"], e["ts"] + e["dur"]
            for sb, se in steps:  # steps are few per run: a scan is fast enough
                lo, hi = max(b, sb), min(t, se)
                if lo < hi:
                    inside.append((lo, hi))
        print(f"  {name:<24}{100.0 * covered(inside) / wall:6.1f}%")


if __name__ == "__main__":
    main()
