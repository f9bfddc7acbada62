#!/usr/bin/env python3
"""Markdown tables from kvrt_cache.py --json results (docs/fidelity.md, "kvrt-backed decoder").

  python tools/record/agree_table.py traces/agree_genesis.json traces/agree_standards.json ...

Column names are the JSON file stems without the 'agree_' prefix. Tables: the full cache per run;
greedy agreement (k of --gen); the first greedy step where kvrt's argmax leaves the full cache's
path (up to that step the teacher-forced kvrt run saw exactly the tokens a free-running kvrt
generation would have made, so a free-running run diverges there); perplexity of the text
stream, kvrt relative to the full cache; the text stream's argmax agreement; kvrt time per configuration (kvrt_prefill + append/attend, both
streams) and wall time of both teacher-forced streams. When the reference cache sits next to a
JSON file (agree_X.json -> agree_X.ref.pt, as scripts/record-traces.sh agree writes them) and torch
imports, also the full cache's argmax margin (top-1 minus top-2 log-prob) on the text stream: its
median over all steps and over the steps where a configuration disagrees.
"""

import argparse
import json
from pathlib import Path


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("json", nargs="+", help="kvrt_cache.py --json files")
    args = ap.parse_args()
    runs = [(Path(p).stem.removeprefix("agree_"), json.loads(Path(p).read_text()))
            for p in args.json]
    margins = {}  # run -> full-cache margins per step of the text stream
    try:
        import torch
        for p, (name, _) in zip(args.json, runs):
            ref = Path(p).with_suffix(".ref.pt")
            if ref.exists():
                margins[name] = torch.load(ref, weights_only=False)["text"][2]
    except ImportError:
        pass

    def median(xs):
        xs = sorted(xs)
        return (xs[(len(xs) - 1) // 2] + xs[len(xs) // 2]) / 2 if xs else float("nan")

    print("| run | prompt | steps | full ppl greedy / text | batched vs one-step greedy | "
          "prompt pass s | greedy (one-step) s | greedy continuation starts |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, r in runs:
        g = r["greedy_text"].replace("\n", "\\n").replace("|", "\\|")[:70]
        print(f"| {name} | {r['prompt_tokens']} | {r['gen']} | {r['full_ppl_greedy']:.4f} / "
              f"{r['full_ppl_text']:.4f} | {r['full_batched_vs_step_agree']}/{r['gen']} | "
              f"{r['prompt_pass_s']:.0f} | {r['reference_times_s'].get('greedy_seq', 0):.0f} | "
              f"`{g}` |")
    specs = []
    for _, r in runs:
        for c in r["configs"]:
            if c["spec"] not in specs:
                specs.append(c["spec"])

    def table(title, cell):
        print(f"\n{title}\n")
        print("| config | " + " | ".join(n for n, _ in runs) + " |")
        print("| --- |" + " --- |" * len(runs))
        for s in specs:
            row = []
            for _, r in runs:
                c = next((c for c in r["configs"] if c["spec"] == s), None)
                row.append(cell(c) if c else "-")
            print(f"| {s} | " + " | ".join(row) + " |")

    def agree(st):
        return lambda c: f"{c[st]['agree']}/{c[st]['steps']}" if st in c else "-"

    table("Greedy agreement (kvrt fed the full cache's greedy tokens; steps where kvrt's argmax "
          "is the full cache's token):", agree("greedy"))
    table("First greedy step (0-based) where kvrt's argmax leaves the full cache's greedy path, "
          "i.e. where a free-running kvrt generation would first diverge (none: never in the "
          "run):", lambda c: (str(min(c["greedy"]["disagree_steps"]))
                              if c["greedy"]["disagree_steps"] else "none")
          if "greedy" in c else "-")
    table("Perplexity over the text's next real tokens, kvrt relative to the full cache "
          "(kvrt perplexity):",
          lambda c: f"{c['text']['ppl_rel'] * 100:+.2f}% ({c['text']['ppl_kvrt']:.4f})"
          if "text" in c else "-")
    table("Perplexity of the greedy tokens, kvrt relative to the full cache:",
          lambda c: f"{c['greedy']['ppl_rel'] * 100:+.2f}%" if "greedy" in c else "-")
    table("Argmax agreement on the real text (both fed the text; steps where kvrt's argmax equals "
          "the full cache's):", agree("text"))

    def times(c):
        sts = [s for s in ("greedy", "text") if s in c]
        kp = sum(c[s]["kvrt_prefill_s"] for s in sts)
        ka = sum(c[s]["kvrt_attend_s"] for s in sts)
        n = sum(c[s]["attends"] for s in sts)
        w = sum(c[s]["wall_s"] for s in sts)
        return f"{kp:.1f} + {ka:.1f} ({ka / n * 1e3:.1f} ms) / {w:.0f}"

    if margins:
        print("\nFull-cache argmax margin on the text stream (top-1 minus top-2 log-prob, nats): "
              "median over all steps: " + ", ".join(f"{n} {median(m):.3f}"
                                                   for n, m in margins.items()) + ".")
        table("Median full-cache margin at the text-stream steps where kvrt's argmax differs "
              "(nats):", lambda c: f"{median(c['text']['full_margin_at_disagree']):.3f}"
              if "text" in c and c["text"]["disagree_steps"] else "-")

    table("kvrt time, both streams: kvrt_prefill s + append/attend s (per layer-step) / wall s of "
          "the two teacher-forced passes:", times)


if __name__ == "__main__":
    main()
