"""Straggler / bubble benchmark of packing + balancing strategies (anchors' cost model).

    .venv/bin/python bench/balance_bench.py [--out bench/results/balancing.md]

DP4 and DP64 with one pack per rank per step (M=1), L=8192, packer buffer 1000, on the shared
length tables and the 1-20-tile distribution; plus PP=4, M=8 for the 1F1B ordering. Every
baseline runs in the same process on the same machine.
"""

from __future__ import annotations

import argparse
import glob
import platform
import time

from mmtrain.balancing.cost import CostModel
from mmtrain.steps.simulate import load_source, simulate

SOURCES = sorted(glob.glob("/work/shared/data/*.csv")) + ["synthetic:10000"]
CASES = [dict(dp=4, pp=1, micro_batches=1), dict(dp=64, pp=1, micro_batches=1), dict(dp=4, pp=4, micro_batches=8)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--seq-length", type=int, default=8192)
    ap.add_argument("--buffer-size", type=int, default=1000)
    args = ap.parse_args()
    lines = [f"machine: {platform.node()} {platform.machine()} {platform.processor() or ''} (CPU only)",
             f"L={args.seq_length}, buffer={args.buffer_size}, cost = 29e9*L + 0.5e6*L^2 per sample", ""]
    for case in CASES:
        lines += [f"### dp={case['dp']} pp={case['pp']} micro_batches={case['micro_batches']}", "",
                  "| source | strategy | packs | steps | straggler | worst step | tile straggler | bubble | time/ideal | s |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for src in SOURCES:
            table = load_source(src)
            t0 = time.perf_counter()
            rows = simulate(table, args.seq_length, buffer_size=args.buffer_size, cost_model=CostModel.default(), **case)
            dt = time.perf_counter() - t0
            for r in rows:
                name = src.rsplit("/", 1)[-1]
                lines.append(f"| {name} | {r['strategy']} | {r['packs']} | {r['steps']} | {r['straggler']:.4f} | "
                             f"{r['straggler_max']:.3f} | {r['tile_straggler']:.3f} | {r['bubble']:.3f} | "
                             f"{r['time_rel']:.4f} | {dt:.1f} |")
        lines.append("")
    text = "\n".join(lines)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
