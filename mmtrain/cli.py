"""`mmtrain <command>`: thin dispatcher; each command lives with the component it drives.

Imports are lazy so `mmtrain pack` never pays for torch or megatron-core.
"""

from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "analyze": ("mmtrain.analysis.stats", "main", "token statistics and histograms: what training sees (overrides) or a file"),
    "pack": ("mmtrain.steps.pack_cli", "main", "write a plan file (PLAN.jsonl) for a length table, optionally per step and rank"),
    "simulate": ("mmtrain.steps.simulate_cli", "simulate_main", "straggler / bubble / fill of the steps a training config runs"),
    "calibrate": ("mmtrain.balancing.calibrate", "main", "time a few shapes and fit cost-model coefficients"),
    "lengths": ("mmtrain.steps.from_config", "export_lengths_main", "write the training source's length table (for `pack`)"),
    "plot": ("mmtrain.analysis.plot", "main", "PNGs of a run: loss, throughput, per-rank compute time, padding"),
    "compare": ("mmtrain.compare", "main", "train a recipe with packing off and on: the seed's table + a bar chart"),
    "export-hf": ("mmtrain.train.export_hf", "main", "write a transformers folder from a run's checkpoint"),
    "eval": ("mmtrain.train.evaluate", "main", "per-sample teacher-forced loss (SCORES.jsonl), every sample once, any TP/PP/DP"),
}


def _usage() -> str:
    lines = ["usage: mmtrain <command> [args]", "", "commands:"]
    lines += [f"  {name:<10} {help_}" for name, (_, _, help_) in COMMANDS.items()]
    lines += ["", "training: python -m mmtrain.train <hydra overrides>",
              "distributed: torchrun --nproc_per_node N -m mmtrain.train ... | torchrun ... -m mmtrain eval ..."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"mmtrain: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    from mmtrain import quiet

    quiet.install()  # before the command imports torch / megatron-core
    module, func, _ = COMMANDS[name]
    return int(getattr(importlib.import_module(module), func)(rest) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
