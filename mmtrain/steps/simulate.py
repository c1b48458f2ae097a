"""Straggler / bubble / fill of the steps a training config runs, without running the model.

The simulator builds the training source and the step stream exactly as the training data module
does (`mmtrain.steps.from_config`) at the given DP / PP size and asks it for the steps training
would run (trainer.max_steps, or one epoch); every figure comes from those steps' predicted
per-rank costs. Because it is the same stream -- the same packer, the same step assembler, the
same cost model -- the straggler it prints is the one training logs (`predicted_rank_cost` in
metrics.jsonl), as long as the cost model is not calibrated online.

Strategy rows compare baselines on the same data in the same process: each row is the config
with another packer / balancer (`ROWS`).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Optional, Sequence

import numpy as np

from mmtrain.balancing.pipeline import simulate_1f1b
from mmtrain.config import MMTrainConfig

__all__ = ["ROWS", "figures", "row_config", "run_steps", "simulate"]

# row name -> (packing algorithm or None = the config's, balancing strategy); "no_packing" turns packing off
ROWS = {
    "ours": (None, "default"),
    "karmarkar_karp": (None, "karmarkar_karp"),
    "lpt": (None, "lpt"),
    "greedy_knapsack": ("greedy_knapsack", "none"),  # Megatron-style: greedy knapsack, packs in order per rank
    "no_packing": (None, "none"),
}


def row_config(cfg: MMTrainConfig, row: str) -> MMTrainConfig:
    """The config of one strategy row."""
    if row not in ROWS:
        raise ValueError(f"unknown strategy row {row!r}; choose from {list(ROWS)}")
    algorithm, strategy = ROWS[row]
    packing = replace(cfg.packing, enabled=row != "no_packing", algorithm=algorithm or cfg.packing.algorithm)
    balancing = replace(cfg.balancing, enabled=True, strategy=strategy)
    return replace(cfg, packing=packing, balancing=balancing)


def run_steps(cfg: MMTrainConfig, dp: int, pp: int = 1, steps: Optional[int] = None, epoch: bool = False):
    """The steps training runs for `cfg` at DP `dp`, PP `pp`: trainer.max_steps of them (or `steps`),
    or with `epoch` every step of the first epoch."""
    from mmtrain.models.config import tokens_per_tile
    from mmtrain.steps.from_config import build_source, build_stream

    tpt = tokens_per_tile(cfg.model)
    source = build_source(cfg, tpt)
    stream = build_stream(cfg, source, tpt, dp, pp)
    out = []
    n = cfg.trainer.max_steps if steps is None else steps
    while True:
        if not epoch and len(out) >= n:
            break
        st = stream.next_step()
        if epoch and st.epoch > 0:
            break
        out.append(st)
    return out, stream


def figures(steps: Sequence, seq_length: int, pp: int = 1, tiles: Optional[np.ndarray] = None) -> dict:
    """Figures of a run of steps (`mmtrain.steps.stream.Step`):

    straggler: mean over steps of max / mean predicted rank cost (what metrics.jsonl gives per step);
    efficiency: real tokens / (packs x seq_length); bubble: mean predicted 1F1B idle share;
    time_rel: sum over steps of the slowest rank's 1F1B makespan / (total cost / (dp x pp))."""
    ratios, tile_ratios, bubbles = [], [], []
    span, total = 0.0, 0.0
    packs = samples = tokens = 0
    dp = len(steps[0].rank_micro_batches) if steps else 1
    for st in steps:
        loads = np.asarray(st.predicted_rank_cost, dtype=np.float64)
        m = loads.mean()
        ratios.append(float(loads.max() / m) if m > 0 else 1.0)
        if tiles is not None:
            tl = np.array([sum(int(tiles[s]) for s in st.rank_samples(r)) for r in range(len(st.rank_micro_batches))], float)
            tile_ratios.append(float(tl.max() / tl.mean()) if tl.mean() > 0 else 1.0)
        if st.predicted_bubble is not None:
            bubbles.append(st.predicted_bubble)
        c = np.asarray(st.row_costs)
        span += max(simulate_1f1b([float(c[mb].sum()) for mb in r], pp) for r in st.rank_micro_batches)
        total += float(c.sum())
        packs += len(st.rows)
        samples += st.num_samples
        tokens += sum(st.row_tokens)
    ideal = total / (dp * pp)
    return {
        "steps": len(steps),
        "straggler": float(np.mean(ratios)) if ratios else 1.0,
        "straggler_max": float(np.max(ratios)) if ratios else 1.0,
        "tile_straggler": float(np.mean(tile_ratios)) if tile_ratios else None,
        "bubble": float(np.mean(bubbles)) if bubbles else 0.0,
        "time_rel": float(span / ideal) if ideal > 0 else 1.0,
        "packs": packs,
        "samples": samples,
        "tokens": tokens,
        "efficiency": tokens / (packs * seq_length) if packs else 0.0,
    }


def simulate(cfg: MMTrainConfig, dp: int, pp: int = 1, rows: Optional[Sequence[str]] = None,
             steps: Optional[int] = None, epoch: bool = False) -> list[dict]:
    """One dict of figures per strategy row (None: the config as given, one row named "config")."""
    out = []
    for name in rows or [None]:
        c = cfg if name is None else row_config(cfg, name)
        run, stream = run_steps(c, dp, pp, steps=steps, epoch=epoch)
        row = {"strategy": name or "config", "packing": c.packing.algorithm if c.packing.enabled else "none",
               "balancing": c.balancing.strategy if c.balancing.enabled else "none"}
        row.update(figures(run, c.packing.seq_length, pp, stream.tiles))
        out.append(row)
    return out
