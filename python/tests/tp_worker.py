"""One rank of test_tp.py: loads a checkpoint with transformers' tensor parallelism (the model's
own plan, tp_plan="auto"; gloo on the CPU), decodes with kvrt.hf in every mode of MODES,
and saves each mode's greedy tokens, logits, this rank's kvrt config and stats to OUT/rank<R>.pt.

test_tp.py starts the ranks itself (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE set as torchrun
sets them, the process group from a file); the same script runs under torchrun:
    torchrun --nproc-per-node 2 python/tests/tp_worker.py --model DIR --out DIR
The test imports MODES and decode() from here, so that one rank and two decode the same way.
"""

from __future__ import annotations

import argparse
import dataclasses
import os

import torch

PROMPT = 300  # > sinks + window: most of the prompt is cold
# Per mode: kvrt options and new tokens.
MODES = {
    "exact": (dict(index_kind="exact", sink_tokens=4, window_tokens=16), 8),
    "flat": (dict(index_kind="flat", top_k=8, sink_tokens=4, window_tokens=16), 4),
}


def prompt_ids() -> torch.Tensor:
    return torch.randint(2, 258, (1, PROMPT), generator=torch.Generator().manual_seed(0))


def decode(model, mode: str, **extra) -> dict:
    """Greedy decoding with kvrt in `mode`: the new tokens, logits [new, vocab], the runtime's
    config and stats (as dicts)."""
    import kvrt.hf as kh
    options, new_tokens = MODES[mode]
    cache = kh.enable(model, **options, **extra)
    with torch.inference_mode():
        out = model.generate(prompt_ids(), max_new_tokens=new_tokens, do_sample=False,
                             output_logits=True, return_dict_in_generate=True,
                             **{kh.cache_kwarg(model): cache})
    result = dict(tokens=out.sequences[0, PROMPT:], logits=torch.stack(out.logits)[:, 0],
                  config=cache.runtime.config.to_dict(),
                  stats=dataclasses.asdict(cache.stats()))
    cache.close()
    return result


def tp_auto() -> dict:
    """from_pretrained's arguments for the model's own tensor-parallel plan: transformers 5's
    distributed_config=DistributedConfig(tp_plan="auto"), or tp_plan="auto" (4.x; still accepted
    by 5.x with a deprecation warning)."""
    try:
        from transformers.distributed import DistributedConfig
    except ImportError:
        return {"tp_plan": "auto"}
    return {"distributed_config": DistributedConfig(tp_plan="auto")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="checkpoint directory (save_pretrained)")
    ap.add_argument("--out", required=True, help="directory for rank<R>.pt")
    ap.add_argument("--init-file", help="process group rendezvous file (default: env://)")
    args = ap.parse_args()
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    torch.set_num_threads(1)
    import torch.distributed as dist
    if args.init_file:  # else transformers initialises it from torchrun's environment
        dist.init_process_group("gloo", init_method=f"file://{args.init_file}", rank=rank,
                                world_size=world)
    from transformers import AutoModelForCausalLM

    import kvrt.hf as kh
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32,
                                                 **tp_auto()).eval()
    # Each rank's kvrt workers on its own CPUs of this host.
    share = kh.cpu_share() if (os.cpu_count() or 1) >= world else {}
    results = {mode: decode(model, mode, **share) for mode in MODES}
    results["local_heads"] = kh.local_heads(model)
    torch.save(results, os.path.join(args.out, f"rank{rank}.pt"))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
