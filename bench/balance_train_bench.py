"""Balancing measured from training runs: DP4 (torchrun, gloo, CPU), tiny model, 2 packs per rank
(trainer.global_batch_size=8, micro_batch_size=1), on length tables (`data=lengths`).

    .venv/bin/python bench/balance_train_bench.py --out bench/results/balancing_train.md [--steps 12]

For every table, four training runs in the same session: ours (the defaults) and the baselines
  greedy_knapsack  Megatron-style: greedy-knapsack packs, each rank the next packs in order
  lpt              our packer, each step's packs split over ranks by LPT (no cross-step grouping)
  karmarkar_karp   the same with Karmarkar-Karp
The predicted straggler (mean over steps of max / mean `predicted_rank_cost`) is read back from each
run's metrics.jsonl, next to `mmtrain simulate --dp 4` with the same overrides (it must print the
same number) and the measured straggler (per-rank forward/backward time; noisy on a shared CPU).
Every row comes with the command that reproduces it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
PY = sys.executable
STRATEGIES = {
    "ours": [],
    "greedy_knapsack": ["packing.algorithm=greedy_knapsack", "balancing.strategy=none"],
    "lpt": ["balancing.strategy=lpt"],
    "karmarkar_karp": ["balancing.strategy=karmarkar_karp"],
}


def tables(workdir: Path) -> list[tuple[str, Path, list[str]]]:
    """(name, csv, extra overrides): the shipped real tables and generated stress distributions."""
    from mmtrain.data.synthetic import stress_shapes, write_length_table

    out = []
    for name in ("ai2d_train_12k", "chartqa_train_18k", "docvqa_train_10k"):
        out.append((name, REPO / "tests" / "assets" / f"{name}.csv", ["packing.seq_length=2048"]))
    gen = REPO / "outputs" / "bench_tables"  # regenerated identically by every run of this script
    gen.mkdir(parents=True, exist_ok=True)
    for kind in ("skewed", "bimodal", "near_seq", "text_only", "all_long"):
        path = gen / f"{kind}.csv"
        tiles, text = stress_shapes(kind, 3000, 0, 16, 512)
        write_length_table(path, tiles, text)
        out.append((f"{kind} (generated, 3000)", path, []))
    return out


def run(cmd: list[str], env: dict) -> str:
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{proc.stderr[-3000:]}")
    return proc.stdout


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--only", default=None, help="comma list of table names (prefixes)")
    args = ap.parse_args()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    work = Path(tempfile.mkdtemp(prefix="balance_bench_"))
    lines = [f"machine: {platform.node()} {platform.machine()}, {os.cpu_count()} cores, CPU only (gloo); "
             f"load average at start {os.getloadavg()[0]:.1f}",
             f"DP4 via torchrun, model=tiny, trainer.global_batch_size=8 trainer.micro_batch_size=1 (2 packs per rank), "
             f"{args.steps} steps per run, predicted straggler = mean over steps of max / mean predicted_rank_cost "
             "(metrics.jsonl); simulate = `mmtrain simulate --dp 4` with the same overrides; measured = mean over steps "
             "of straggler_measured (per-rank forward/backward time, shared CPU: noisy)", "",
             "| table | strategy | predicted straggler | worst step | simulate | measured | samples / step | command |",
             "|---|---|---|---|---|---|---|---|"]
    for name, path, extra in tables(work):
        if args.only and not any(name.startswith(p) for p in args.only.split(",")):
            continue
        for strategy, ovr in STRATEGIES.items():
            out = work / f"{Path(path).stem}_{strategy}"
            overrides = ["model=tiny", "data=lengths", f"data.source={path}", "trainer.global_batch_size=8",
                         "trainer.micro_batch_size=1", f"trainer.max_steps={args.steps}", "trainer.progress_bar=off",
                         "trainer.save_final=false", "trainer.tensorboard=false", *extra, *ovr]
            cmd = [PY, "-m", "torch.distributed.run", "--nproc_per_node=4", "-m", "mmtrain.train", *overrides,
                   f"trainer.output_dir={out}"]
            t0 = time.perf_counter()
            run(cmd, env)
            m = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
            ratios = [max(r["predicted_rank_cost"]) / np.mean(r["predicted_rank_cost"]) for r in m]
            sim = json.loads(run([PY, "-m", "mmtrain", "simulate", "--dp", "4", *overrides], env).strip().splitlines()[-1])
            assert abs(sim["straggler"] - float(np.mean(ratios))) <= 1e-12 * sim["straggler"], (sim, ratios)
            assert all(min(r["predicted_rank_cost"]) > 0 for r in m), "a rank idled"
            measured = float(np.mean([r["straggler_measured"] for r in m]))
            shown = " ".join(shlex.quote(c) for c in [".venv/bin/torchrun", "--nproc_per_node=4", "-m", "mmtrain.train",
                                                       *[o.replace(str(REPO) + "/", "") for o in overrides]])
            lines.append(f"| {name} | {strategy} | {np.mean(ratios):.4f} | {max(ratios):.3f} | {sim['straggler']:.4f} | "
                         f"{measured:.3f} | {np.mean([r['samples'] for r in m]):.1f} | `{shown}` |")
            print(lines[-1], f"({time.perf_counter() - t0:.0f} s)", flush=True)
    text = "\n".join(lines)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
