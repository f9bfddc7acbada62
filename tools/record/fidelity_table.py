#!/usr/bin/env python3
"""Per-head fidelity table from `kvrt replay --per-head --json` reports of one trace, one report
per index kind: for every (layer, head), recall@k / attention-mass recall / mean output error of
each kind, plus each kind's scanned fraction and attend latency. Standard library only.

Usage: fidelity_table.py REPORT.json [REPORT.json ...]   (all of the same trace)
"""
import argparse
import json


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("reports", nargs="+", help="kvrt replay --json outputs, one per index kind")
    args = ap.parse_args()
    reps = [json.load(open(p)) for p in args.reports]
    kinds = [r["index"] for r in reps]
    r0 = reps[0]
    print(f"trace {r0['trace']}: {r0['prompt_tokens']} prompt tokens, {r0['steps']} steps, "
          f"top-k {r0['top_k']}, sinks {r0['sinks']}, window {r0['window']}")
    print("| kind | recall@k | mass recall | err mean / p99 / max | scanned | attend p50 us |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in reps:
        print(f"| {r['index']} | {r['recall_at_k']:.3f} | {r['mass_recall']:.3f} | "
              f"{r['output_rel_error_mean']:.3f} / {r['output_rel_error_p99']:.3f} / {r['output_rel_error_max']:.3f} | "
              f"{100 * r['scanned_fraction']:.1f}% | {r['latency_us_p50']:.0f} |")
    print()
    print("per (layer, q head): recall@k / mass recall / mean output error")
    print("| layer | head | " + " | ".join(kinds) + " |")
    print("| --- | --- | " + " | ".join("---" for _ in kinds) + " |")
    for i, h in enumerate(r0["per_head"]):
        cells = []
        for r in reps:
            x = r["per_head"][i]
            cells.append(f"{x['recall_at_k']:.2f} / {x['mass_recall']:.2f} / {x['output_rel_error_mean']:.3f}")
        print(f"| {h['layer']} | {h['head']} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
