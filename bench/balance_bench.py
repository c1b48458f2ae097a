"""Straggler / bubble of the step assembler on whole tables at the seed's scale, simulated (no model):
`mmtrain simulate`'s strategy rows, one epoch per table, every baseline in the same process.

    .venv/bin/python bench/balance_bench.py [--out bench/results/balancing.md]

The seed's model (model=llava_mistral7b_clip224: 256 tokens per tile, its FLOPs as the cost),
L = 8192, packer buffer 1000, on the shipped length tables and the 1-20-tile distribution:
DP4 and DP64 with one pack per rank per step, DP4 with two, and PP=4 with 8 micro-batches (1F1B
order). Training-run measurements (tiny model, DP4 torchrun) are bench/balance_train_bench.py.
"""

from __future__ import annotations

import argparse
import glob
import platform
import time
from pathlib import Path

from mmtrain.steps.from_config import tool_config
from mmtrain.steps.simulate import ROWS, simulate

REPO = Path(__file__).resolve().parent.parent
SOURCES = sorted(glob.glob(str(REPO / "tests" / "assets" / "*.csv"))) + ["synthetic:10000"]
CASES = [dict(dp=4, pp=1, m=1), dict(dp=4, pp=1, m=2), dict(dp=64, pp=1, m=1), dict(dp=4, pp=4, m=8)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--seq-length", type=int, default=8192)
    ap.add_argument("--buffer-size", type=int, default=1000)
    args = ap.parse_args()
    lines = [f"machine: {platform.node()} {platform.machine()} (CPU only, no model: the step stream alone)",
             f"model=llava_mistral7b_clip224 (cost = its training FLOPs), L={args.seq_length}, buffer={args.buffer_size}, "
             "one epoch per table", ""]
    for case in CASES:
        lines += [f"### dp={case['dp']} pp={case['pp']} micro-batches per rank={case['m']}", "",
                  "| source | strategy | packs | steps | straggler | worst step | tile straggler | bubble | fill | time/ideal | s |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for src in SOURCES:
            cfg = tool_config(src, ["model=llava_mistral7b_clip224"], [
                f"packing.seq_length={args.seq_length}", f"packing.buffer_size={args.buffer_size}",
                f"trainer.global_batch_size={case['dp'] * case['m']}", "packing.oversize_policy=truncate"])
            t0 = time.perf_counter()
            rows = simulate(cfg, case["dp"], case["pp"], rows=list(ROWS), epoch=True)
            dt = time.perf_counter() - t0
            name = src.rsplit("/", 1)[-1]
            for r in rows:
                tiles = "-" if r["tile_straggler"] is None else f"{r['tile_straggler']:.3f}"
                lines.append(f"| {name} | {r['strategy']} | {r['packs']} | {r['steps']} | {r['straggler']:.4f} | "
                             f"{r['straggler_max']:.3f} | {tiles} | {r['bubble']:.3f} | {r['efficiency']:.4f} | "
                             f"{r['time_rel']:.4f} | {dt:.1f} |")
            print("\n".join(lines[-len(rows):]), flush=True)
        lines.append("")
    text = "\n".join(lines)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
