"""`mmtrain simulate --dp R [--pp P] [overrides]`: the straggler, bubble and fill of the steps a
training config runs (the same overrides as `python -m mmtrain.train`), from the same step stream
training uses; one JSON line last (`straggler`, `steps`, `packs`, `efficiency`, ...).

`mmtrain simulate SOURCE ...` simulates one epoch of a length table (data=lengths, image tokens =
tiles x the model's tokens per tile) or of `synthetic:N`; `--strategies` adds baseline rows
(same data, same process): ours, karmarkar_karp, lpt, greedy_knapsack, no_packing.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Sequence

from mmtrain.steps.simulate import ROWS


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mmtrain simulate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                usage="mmtrain simulate [SOURCE] --dp R [options] [hydra overrides]")
    p.add_argument("words", nargs="*", metavar="[SOURCE] OVERRIDE",
                   help="optional length table / synthetic:N, then Hydra overrides of the training config")
    p.add_argument("--dp", type=int, required=True, help="data-parallel size")
    p.add_argument("--pp", type=int, default=None, help="pipeline stages (default: parallel.pipeline_model_parallel_size)")
    p.add_argument("--micro-batches", type=int, default=None,
                   help="micro-batches per rank: sets trainer.global_batch_size = dp x this x micro_batch_size")
    p.add_argument("--seq-length", type=int, default=None, help="packing.seq_length")
    p.add_argument("--buffer-size", type=int, default=None, help="packing.buffer_size (samples)")
    p.add_argument("--window-steps", type=int, default=None, help="balancing.window_steps")
    p.add_argument("--cost-model", default=None, help="balancing.cost_model (from `mmtrain calibrate`)")
    p.add_argument("--strategies", default=None, help=f"comma list of rows to compare: {','.join(ROWS)}")
    run = p.add_mutually_exclusive_group()
    run.add_argument("--steps", type=int, default=None, help="steps to simulate (default: trainer.max_steps)")
    run.add_argument("--epoch", action="store_true", help="every step of one epoch (default with a SOURCE)")
    return p


def format_table(rows: list[dict]) -> str:
    head = f"{'strategy':<16} {'packs':>6} {'steps':>6} {'straggler':>10} {'max':>8} {'tiles':>7} {'bubble':>7} {'fill':>7} {'time/ideal':>10}"
    lines = [head, "-" * len(head)]
    for r in rows:
        tiles = "-" if r["tile_straggler"] is None else f"{r['tile_straggler']:.3f}"
        lines.append(
            f"{r['strategy']:<16} {r['packs']:>6} {r['steps']:>6} {r['straggler']:>10.4f} {r['straggler_max']:>8.3f} "
            f"{tiles:>7} {r['bubble']:>7.3f} {r['efficiency']:>7.4f} {r['time_rel']:>10.4f}"
        )
    return "\n".join(lines)


def flag_overrides(args) -> list[str]:
    out = []
    for flag, key in (("seq_length", "packing.seq_length"), ("buffer_size", "packing.buffer_size"),
                      ("window_steps", "balancing.window_steps"), ("cost_model", "balancing.cost_model")):
        if getattr(args, flag) is not None:
            out.append(f"{key}={getattr(args, flag)}")
    return out


def simulate_main(argv: Sequence[str] | None = None) -> int:
    from mmtrain.steps.from_config import split_source, tool_config
    from mmtrain.steps.simulate import simulate

    args = build_parser().parse_intermixed_args(argv)
    names = None
    if args.strategies:
        names = [s.strip() for s in args.strategies.split(",") if s.strip()]
        bad = [n for n in names if n not in ROWS]
        if bad:
            print(f"mmtrain simulate: unknown strategies {bad}; choose from {list(ROWS)}", file=sys.stderr)
            return 2
    if args.dp < 1 or (args.pp is not None and args.pp < 1) or (args.micro_batches is not None and args.micro_batches < 1):
        print("mmtrain simulate: --dp, --pp and --micro-batches must be >= 1", file=sys.stderr)
        return 2
    source, overrides = split_source(args.words)
    flags = flag_overrides(args)
    try:
        cfg = tool_config(source, overrides, flags)
        if args.micro_batches is not None:
            g = args.dp * args.micro_batches * cfg.trainer.micro_batch_size
            cfg = tool_config(source, overrides, flags + [f"trainer.global_batch_size={g}"])
        pp = args.pp or cfg.parallel.pipeline_model_parallel_size
        epoch = args.epoch or (source is not None and args.steps is None)
        rows = simulate(cfg, args.dp, pp, rows=names, steps=args.steps, epoch=epoch)
    except (ValueError, FileNotFoundError) as e:
        print(f"mmtrain simulate: {e}", file=sys.stderr)
        return 1
    head = {"source": source or f"data={cfg.data.name}", "dp": args.dp, "pp": pp,
            "global_batch_size": cfg.trainer.global_batch_size, "micro_batch_size": cfg.trainer.micro_batch_size,
            "seq_length": cfg.packing.seq_length, "epoch": epoch}
    if names is None:
        print(json.dumps({**head, **rows[0]}))
        return 0
    print(f"{head['source']}: dp={args.dp} pp={pp} global batch {cfg.trainer.global_batch_size} "
          f"(micro-batch {cfg.trainer.micro_batch_size}) seq_length={cfg.packing.seq_length}")
    print(format_table(rows))
    print(json.dumps({**head, "rows": rows}))
    return 0
