#!/usr/bin/env python3
"""Sums ncu's per-SASS-instruction counters by opcode: where a kernel's instructions and stalls go.

Usage: sass_summary.py NCU_SOURCE_CSV[.gz] [--top N]

The input is `ncu --section SourceCounters --section WarpStateStats --page source
--print-source sass --csv <program>` (one kernel launch: --kernel-name, --launch-count 1); any
lines before the CSV header are skipped. Prints per opcode (the mnemonic without its modifiers:
HMMA, LOP3, ...) the warp instructions executed and the stall samples, largest first, then the N
instructions with the most stall samples with their main stall reason.
"""
import argparse
import csv
import gzip
import io
import sys


def read_rows(path):
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rt", errors="replace") as f:
            text = f.read()
    except OSError as e:
        sys.exit(f"sass_summary: cannot read {path}: {e}")
    start = text.find('"Address","Source"')
    if start < 0:
        sys.exit(f"sass_summary: no ncu source table (\"Address\",\"Source\",...) in {path}")
    return list(csv.DictReader(io.StringIO(text[start:])))


def number(row, key):
    try:
        return float(row.get(key, 0) or 0)
    except ValueError:
        return 0.0


def opcode(source):
    # "@!P0 BRA 0x..." -> BRA; "HMMA.16816.F32 R4, ..." -> HMMA
    words = source.split()
    if words and words[0].startswith("@"):
        words = words[1:]
    return words[0].split(".")[0] if words else "?"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("csv")
    ap.add_argument("--top", type=int, default=15, help="instructions listed by stall samples")
    args = ap.parse_args(argv)
    rows = read_rows(args.csv)
    stall_keys = [k for k in (rows[0].keys() if rows else [])
                  if k.startswith("stall_") and "Not Issued" not in k]
    by_op = {}
    total_inst = total_stall = 0.0
    for r in rows:
        inst = number(r, "Instructions Executed")
        stall = number(r, "Warp Stall Sampling (All Samples)")
        op = opcode(r.get("Source", ""))
        e = by_op.setdefault(op, [0.0, 0.0])
        e[0] += inst
        e[1] += stall
        total_inst += inst
        total_stall += stall
    if total_inst == 0:
        sys.exit("sass_summary: the table counts no executed instruction")
    print(f"{len(rows)} SASS instructions, {total_inst:.0f} warp instructions executed, "
          f"{total_stall:.0f} stall samples")
    print(f"{'opcode':<10} {'warp inst':>12} {'share':>7} {'stalls':>9} {'share':>7}")
    for op, (inst, stall) in sorted(by_op.items(), key=lambda kv: -kv[1][0]):
        if inst / total_inst < 0.002 and stall / max(total_stall, 1) < 0.002:
            continue
        print(f"{op:<10} {inst:>12.0f} {100 * inst / total_inst:>6.1f}% {stall:>9.0f} "
              f"{100 * stall / max(total_stall, 1):>6.1f}%")
    print(f"\nthe {args.top} instructions with the most stall samples:")
    for r in sorted(rows, key=lambda r: -number(r, "Warp Stall Sampling (All Samples)"))[:args.top]:
        reasons = sorted(((number(r, k), k[len("stall_"):]) for k in stall_keys), reverse=True)
        main_reason = f"{reasons[0][1]} {reasons[0][0]:.0f}" if reasons and reasons[0][0] else "-"
        print(f"{r.get('Address', '?')[-5:]} {number(r, 'Warp Stall Sampling (All Samples)'):>7.0f} "
              f"{main_reason:<18} {r.get('Source', '').strip()[:70]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
