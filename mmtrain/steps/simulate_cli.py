"""`mmtrain simulate SOURCE --seq-length L --dp R [--pp P] [--micro-batches M] [--buffer-size N]`."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Sequence

from mmtrain.balancing.cost import CostModel
from mmtrain.steps.simulate import ROWS, load_source, simulate


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mmtrain simulate", description=__doc__)
    p.add_argument("source", help="length table (CSV/Parquet/NPY) or synthetic[:N] (1-20 tiles)")
    p.add_argument("--seq-length", type=int, required=True)
    p.add_argument("--dp", type=int, required=True)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--micro-batches", type=int, default=1, help="micro-batches per rank per step")
    p.add_argument("--buffer-size", type=int, default=None, help="packer buffer in samples (default: offline)")
    p.add_argument("--window", type=int, default=None, help="packs ours may reorder across steps (default: all)")
    p.add_argument("--cost-model", default=None, help="YAML/JSON from `mmtrain calibrate` (default: anchors')")
    p.add_argument("--strategies", default=",".join(ROWS), help=f"comma list of {','.join(ROWS)}")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    return p


def format_table(rows: list[dict]) -> str:
    head = f"{'strategy':<16} {'packs':>6} {'steps':>6} {'straggler':>10} {'max':>8} {'tiles':>7} {'bubble':>7} {'time/ideal':>10}"
    lines = [head, "-" * len(head)]
    for r in rows:
        tiles = "-" if r["tile_straggler"] is None else f"{r['tile_straggler']:.3f}"
        lines.append(
            f"{r['strategy']:<16} {r['packs']:>6} {r['steps']:>6} {r['straggler']:>10.4f} "
            f"{r['straggler_max']:>8.3f} {tiles:>7} {r['bubble']:>7.3f} {r['time_rel']:>10.4f}"
        )
    return "\n".join(lines)


def simulate_main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    names = [s.strip() for s in args.strategies.split(",") if s.strip()]
    bad = [n for n in names if n not in ROWS]
    if bad:
        print(f"mmtrain simulate: unknown strategies {bad}; choose from {list(ROWS)}", file=sys.stderr)
        return 2
    if args.dp < 1 or args.pp < 1 or args.micro_batches < 1 or args.seq_length < 1:
        print("mmtrain simulate: --seq-length, --dp, --pp, --micro-batches must be >= 1", file=sys.stderr)
        return 2
    cm = CostModel.load(args.cost_model) if args.cost_model else CostModel.default()
    table = load_source(args.source, seed=args.seed)
    rows = simulate(table, args.seq_length, args.dp, args.pp, args.micro_batches, args.buffer_size, cm,
                    rows=names, window=args.window, seed=args.seed)
    if args.json:
        print(json.dumps({"source": args.source, "seq_length": args.seq_length, "dp": args.dp, "pp": args.pp,
                          "micro_batches": args.micro_batches, "buffer_size": args.buffer_size,
                          "cost_model": cm.to_dict(), "rows": rows}, indent=2))
    else:
        print(f"{args.source}: L={args.seq_length} dp={args.dp} pp={args.pp} M={args.micro_batches} "
              f"buffer={args.buffer_size} cost={cm.unit}")
        print(format_table(rows))
    return 0
