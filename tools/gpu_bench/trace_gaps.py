#!/usr/bin/env python3
"""The device's idle gaps in a torch.profiler Chrome trace (e2e_bench.py --profile-dir).

A span whose wall time exceeds its device time has gaps where no kernel, copy or memset ran on
any stream. This lists the span's device busy time (the union over streams), its idle time, and
the longest gaps, each with the kernel before and after it and per host thread the innermost
call (CUDA runtime, operator or Python function) spanning its middle: what the host was doing while the device waited.

Usage: python3 tools/gpu_bench/trace_gaps.py TRACE.json [--min-ms 0.5] [--top 12]
       [--calls-in attend]   (the CUDA runtime calls inside each span of that name)
"""
from __future__ import annotations

import argparse
import json
import sys

DEVICE_CATS = {"kernel", "gpu_memcpy", "gpu_memset"}
HOST_CATS = {"cuda_runtime", "cuda_driver", "cpu_op", "python_function", "user_annotation"}


def load(path):
    with open(path) as f:
        data = json.load(f)
    events = data["traceEvents"] if isinstance(data, dict) else data
    dev, host = [], []
    for e in events:
        if e.get("ph") != "X" or "dur" not in e:
            continue
        cat = e.get("cat", "")
        item = (float(e["ts"]), float(e["ts"]) + float(e["dur"]), e.get("name", "?"), e.get("tid"))
        if cat in DEVICE_CATS:
            dev.append(item)
        elif cat in HOST_CATS:
            host.append(item)
    return sorted(dev), sorted(host)


def busy_union(dev):
    spans = []
    for b, e, _, _ in dev:
        if spans and b <= spans[-1][1]:
            spans[-1][1] = max(spans[-1][1], e)
        else:
            spans.append([b, e])
    return spans


def calls_in(host, span_name: str) -> str:
    """Per span named span_name: the CUDA runtime calls of its thread inside it, by name (count
    and mean time per span), and the span's time outside any of them (Python, the library's own
    host code, locks)."""
    spans = [h for h in host if h[2] == span_name]
    if not spans:
        return f"no span named {span_name!r}"
    cuda = sorted(h for h in host if h[2].startswith("cuda"))
    by_name: dict[str, list[float]] = {}
    inside_total = 0.0
    for b, e, _, tid in spans:
        for cb, ce, name, ctid in cuda:
            if ctid == tid and cb >= b and ce <= e:
                by_name.setdefault(name, [0, 0.0])
                by_name[name][0] += 1
                by_name[name][1] += ce - cb
                inside_total += ce - cb
    n = len(spans)
    wall = sum(e - b for b, e, _, _ in spans) / n
    lines = [f"spans {span_name!r}: {n}, mean {wall:.1f} us; CUDA runtime calls inside "
             f"{inside_total / n:.1f} us per span, outside them {wall - inside_total / n:.1f} us"]
    for name, (count, t) in sorted(by_name.items(), key=lambda x: -x[1][1]):
        lines.append(f"  {name:32s} {count / n:5.1f} per span, {t / n:7.1f} us per span "
                     f"({t / count:.1f} us each)")
    return "\n".join(lines)


def step_table(dev, host, prefix: str) -> str:
    """Per span named prefix*: wall, device busy (union) and idle inside it, and the device
    events inside it summed by name (per span)."""
    steps = [h for h in host if h[2].startswith(prefix) and h[2][len(prefix):].isdigit()]
    if not steps:
        return f"no span named {prefix}N"
    lines = []
    by_name: dict[str, list[float]] = {}
    busy_all = wall_all = 0.0
    for b, e, name, _ in steps:
        inside = [d for d in dev if d[0] >= b and d[1] <= e]
        busy = sum(se - sb for sb, se in busy_union(inside))
        first = min((d[0] for d in inside), default=b)
        last = max((d[1] for d in inside), default=b)
        busy_all += busy
        wall_all += e - b
        lines.append(f"  {name}: wall {(e - b):.1f} us, device busy {busy:.1f} us, idle between "
                     f"its first and last event {(last - first - busy):.1f} us, first event at "
                     f"+{first - b:.1f} us, last ends {e - last:.1f} us before the span, "
                     f"{len(inside)} events")
        for db, de, dname, _ in inside:
            by_name.setdefault(dname, [0, 0.0])
            by_name[dname][0] += 1
            by_name[dname][1] += de - db
    n = len(steps)
    lines.insert(0, f"spans {prefix}N: {n}, mean wall {wall_all / n:.1f} us, device busy "
                    f"{busy_all / n:.1f} us per span; device time by name per span:")
    for dname, (count, t) in sorted(by_name.items(), key=lambda x: -x[1][1]):
        lines.append(f"  {dname[:70]:70s} {count / n:6.1f} x {t / count:7.1f} us = "
                     f"{t / n:8.1f} us")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("trace", help="a Chrome trace written by torch.profiler")
    ap.add_argument("--min-ms", type=float, default=0.5, help="shortest gap listed (ms)")
    ap.add_argument("--top", type=int, default=12, help="gaps listed, longest first")
    ap.add_argument("--host-calls", type=float, default=0, metavar="MS",
                    help="also list every CUDA runtime call (and kvrt prefill call) of MS ms or longer, "
                         "per host thread in time order (where a thread blocked)")
    ap.add_argument("--calls-in", default=None, metavar="SPAN",
                    help="also break the host time of every span named SPAN (a record_function "
                         "name such as binding_overhead.py's 'attend', or a Python function) "
                         "down into the CUDA runtime calls its thread made inside it: count and "
                         "mean time per span by call, and the time in none of them")
    ap.add_argument("--steps", default=None, metavar="PREFIX",
                    help="also, per span whose name starts with PREFIX (binding_overhead.py "
                         "--profile-pipelined's 'step'): its wall time, the device's busy time "
                         "inside it (the union over streams) and its idle time, and each kernel "
                         "or copy by name: count and mean device time per span")
    args = ap.parse_args(argv)
    try:
        dev, host = load(args.trace)
    except (OSError, ValueError, KeyError) as e:
        print(f"trace_gaps: cannot read {args.trace}: {e}", file=sys.stderr)
        return 2
    if not dev:
        print(f"trace_gaps: {args.trace} holds no device events (profiled without CUDA?)",
              file=sys.stderr)
        return 2
    spans = busy_union(dev)
    t0, t1 = spans[0][0], spans[-1][1]
    busy = sum(e - b for b, e in spans)
    gaps = [(spans[i + 1][0] - spans[i][1], spans[i][1], spans[i + 1][0])
            for i in range(len(spans) - 1)]
    print(f"{args.trace}: device events {len(dev)}, first to last {(t1 - t0) / 1e3:.2f} ms, "
          f"busy {busy / 1e3:.2f} ms, idle {(t1 - t0 - busy) / 1e3:.2f} ms in {len(gaps)} gaps")
    listed = sorted((g for g in gaps if g[0] >= args.min_ms * 1e3), reverse=True)[:args.top]
    for dur, b, e in listed:
        before = max((d for d in dev if d[1] <= b + 1e-3), key=lambda d: d[1], default=None)
        after = min((d for d in dev if d[0] >= e - 1e-3), key=lambda d: d[0], default=None)
        print(f"- gap {dur / 1e3:.2f} ms at +{(b - t0) / 1e3:.2f} ms: after "
              f"'{before[2][:60] if before else '-'}', before '{after[2][:60] if after else '-'}'")
        # Per host thread, the innermost call that spans the gap's middle: where it waited.
        mid = (b + e) / 2
        inner = {}
        for hb, he, name, tid in host:
            if hb <= mid <= he and (tid not in inner or he - hb < inner[tid][0]):
                inner[tid] = (he - hb, name)
        for tid, (dur_h, name) in sorted(inner.items(), key=lambda x: -x[1][0])[:5]:
            print(f"    host thread {tid}: in {name[:70]} ({dur_h / 1e3:.2f} ms)")
    if args.calls_in:
        print(calls_in(host, args.calls_in))
    if args.steps:
        print(step_table(dev, host, args.steps))
    if args.host_calls > 0:
        print(f"CUDA runtime calls of {args.host_calls} ms or longer (start, duration):")
        for tid in sorted({h[3] for h in host}, key=str):
            calls = [h for h in host if h[3] == tid and h[1] - h[0] >= args.host_calls * 1e3
                     and (h[2].startswith("cuda") or "prefill" in h[2])]
            if calls:
                print(f"  thread {tid}: " + ", ".join(
                    f"+{(b - t0) / 1e3:.0f} {n} {(e - b) / 1e3:.1f}" for b, e, n, _ in calls))
    return 0


if __name__ == "__main__":
    sys.exit(main())
