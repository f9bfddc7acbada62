#!/usr/bin/env python3
"""kvrt against its peers round by round, over e2e_bench.py's JSON lines (one file per call).

Each round of a call pairs kvrt with the peers measured in that round (same process, same
context), so the ratios are free of the machine's drift between calls; the summary gives their
median and how many rounds reach a target ratio.

Usage: python3 tools/gpu_bench/e2e_rounds.py E2E.jsonl [E2E.jsonl ...] [--kvrt kvrt]
           [--peer dynamic] [--target 0.7] [--context 131072]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys


def rounds(path: str, context: int | None):
    """{(context, round): {cache: record}} of one file."""
    out: dict = {}
    with open(path) as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            rec = json.loads(line)
            if rec.get("status") != "ok" or "decode_tokens_per_s" not in rec:
                continue
            if context is not None and rec.get("context") != context:
                continue
            out.setdefault((rec["context"], rec.get("round", 1)), {})[rec["cache"]] = rec
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("files", nargs="+", help="e2e_bench.py --json outputs, one per call")
    ap.add_argument("--kvrt", default="kvrt", help="the cache measured (default kvrt)")
    ap.add_argument("--peer", default="dynamic", help="the cache it is divided by (default dynamic)")
    ap.add_argument("--target", type=float, default=0.7, help="ratio to count rounds against")
    ap.add_argument("--context", type=int, default=None, help="only this context")
    args = ap.parse_args(argv)
    ratios = []
    print(f"| file | context | round | {args.peer} tok/s (p50 ms) | {args.kvrt} tok/s (p50 ms) | ratio |")
    print("| --- | --- | --- | --- | --- | --- |")
    for path in args.files:
        for (ctx, rnd), caches in sorted(rounds(path, args.context).items()):
            if args.kvrt not in caches or args.peer not in caches:
                continue
            k, p = caches[args.kvrt], caches[args.peer]
            r = k["decode_tokens_per_s"] / p["decode_tokens_per_s"]
            ratios.append(r)
            print(f"| {path} | {ctx} | {rnd} | {p['decode_tokens_per_s']:.1f} "
                  f"({p['decode_ms_p50']:.2f}) | {k['decode_tokens_per_s']:.1f} "
                  f"({k['decode_ms_p50']:.2f}) | {r:.2f} |")
    if not ratios:
        print(f"no round holds both {args.kvrt} and {args.peer}", file=sys.stderr)
        return 1
    met = sum(r >= args.target for r in ratios)
    print(f"\n{len(ratios)} rounds: median {statistics.median(ratios):.2f}, "
          f"min {min(ratios):.2f}, max {max(ratios):.2f}; {met} of {len(ratios)} at or above "
          f"{args.target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
