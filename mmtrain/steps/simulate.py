"""Straggler / bubble simulation of packing + balancing strategies on a length table.

Every strategy ends as (step, rank, micro_batch) per pack; all figures are computed from that
assignment and per-pack costs alone (`metrics`), so they can be recomputed independently from a
PLAN.jsonl. Rows: no packing (one sample per micro-batch), Megatron-style greedy knapsack, FFD,
and the default packer's packs balanced within each step by LPT / Karmarkar-Karp vs ours
(cross-step, vision-aware). Baseline packs run in shuffled order, as a training loader would.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from mmtrain.balancing.assign import assign_packs_to_steps, split_remainder
from mmtrain.balancing.cost import CostModel
from mmtrain.balancing.pipeline import simulate_1f1b

__all__ = ["Table", "load_source", "metrics", "simulate", "ROWS"]

# row name -> (packing algorithm or None for no packing, balancing strategy)
ROWS = {
    "no_packing": (None, "none"),
    "greedy_knapsack": ("greedy_knapsack", "none"),
    "ffd": ("ffd", "none"),
    "lpt": ("default", "lpt"),
    "karmarkar_karp": ("default", "karmarkar_karp"),
    "ours": ("default", "default"),
    "ours_no_pp_order": ("default", "default"),  # same, micro-batches left in index order (PP ablation)
}


@dataclass
class Table:
    tiles: np.ndarray
    image_tokens: np.ndarray
    text_tokens: np.ndarray

    @property
    def lengths(self) -> np.ndarray:
        return self.image_tokens + self.text_tokens


def load_source(source: str, seed: int = 0) -> Table:
    """A length table file, or `synthetic[:N]`: the 1-20-tile distribution (tiles U[1,20] x 256
    image tokens + text U[16,128]), N samples (default 10000)."""
    if source.startswith("synthetic"):
        n = int(source.split(":")[1]) if ":" in source else 10000
        rng = np.random.default_rng(seed)
        tiles = rng.integers(1, 21, n)
        return Table(tiles, tiles * 256, rng.integers(16, 129, n))
    from mmtrain.data.lengths import load_length_table

    t = load_length_table(source)
    img = np.asarray(t.image_tokens, dtype=np.int64)
    tiles = np.asarray(t.tiles, dtype=np.int64) if t.tiles is not None else (img > 0).astype(np.int64)
    return Table(tiles, img, np.asarray(t.text_tokens, dtype=np.int64))


def metrics(
    assignment: Sequence[tuple[int, int, int]],
    pack_costs: Sequence[float],
    dp: int,
    pp: int = 1,
    pack_tiles: Sequence[float] | None = None,
) -> dict:
    """Figures from (step, rank, micro_batch) per pack.

    straggler: mean over steps of max/mean rank cost (ranks holding packs);
    bubble: pipeline idle share, 1 - sum(rank work / pp) / sum(rank 1F1B makespan);
    time_rel: sum over steps of the slowest rank's makespan / (total cost / (dp * pp)).
    """
    costs = np.asarray(pack_costs, dtype=np.float64)
    per: dict[int, dict[int, list[tuple[int, int]]]] = {}
    for p, (s, r, mb) in enumerate(assignment):
        per.setdefault(int(s), {}).setdefault(int(r), []).append((int(mb), p))
    ratios, tile_ratios, span_sum, work_sum, time = [], [], 0.0, 0.0, 0.0
    tl = None if pack_tiles is None else np.asarray(pack_tiles, dtype=np.float64)
    for s in sorted(per):
        loads, tloads, spans = [], [], []
        for r in sorted(per[s]):
            seq = [p for _, p in sorted(per[s][r])]
            loads.append(costs[seq].sum())
            if tl is not None:
                tloads.append(tl[seq].sum())
            spans.append(simulate_1f1b(costs[seq], pp))
        m = float(np.mean(loads))
        ratios.append(max(loads) / m if m > 0 else 1.0)
        if tl is not None:
            tm = float(np.mean(tloads))
            tile_ratios.append(max(tloads) / tm if tm > 0 else 1.0)
        span_sum += sum(spans)
        work_sum += sum(loads) / pp
        time += max(spans)
    ideal = costs.sum() / (dp * pp)
    return {
        "steps": len(per),
        "straggler": float(np.mean(ratios)) if ratios else 1.0,
        "straggler_max": float(np.max(ratios)) if ratios else 1.0,
        "tile_straggler": float(np.mean(tile_ratios)) if tile_ratios else None,
        "bubble": float(1.0 - work_sum / span_sum) if span_sum > 0 else 0.0,
        "time_rel": float(time / ideal) if ideal > 0 else 1.0,
    }


def _packs(table: Table, algorithm: str | None, seq_length: int, buffer_size: int | None, seed: int):
    """(packs, per-sample lengths after the packer's truncation, dropped oversize samples). Baselines pack each buffer
    independently (Megatron-style, no carry-over); "default" uses the packer's own defaults."""
    if algorithm is None:
        return [[i] for i in range(table.lengths.size)], table.lengths, []
    from mmtrain.packing.policy import plan_packs

    kw = {} if algorithm == "default" else {"carry_over": False}
    res = plan_packs(table.lengths, seq_length, algorithm=algorithm, buffer_size=buffer_size,
                     tiles=table.tiles, seed=seed, oversize_policy="truncate",
                     text_tokens=table.text_tokens, **kw)
    return res.packs, np.asarray(res.lengths), list(res.dropped)


def simulate(
    table: Table,
    seq_length: int,
    dp: int,
    pp: int = 1,
    micro_batches: int = 1,
    buffer_size: int | None = None,
    cost_model: CostModel | None = None,
    rows: Sequence[str] | None = None,
    window: int | None = None,
    seed: int = 0,
    vision_weight: float | None = None,
) -> list[dict]:
    """One dict of figures per row; samples are shuffled once (seed) before packing."""
    cm = cost_model or CostModel.default()
    rng = np.random.default_rng(seed)
    perm = rng.permutation(table.lengths.size)
    shuffled = Table(table.tiles[perm], table.image_tokens[perm], table.text_tokens[perm])
    if vision_weight is None:  # tiles' weight in balancing: the ViT share of cost, at least 0.1
        vision_weight = max(0.1, cm.vision_fraction(shuffled.lengths, shuffled.tiles))
    cache: dict = {}
    out = []
    for name in rows or ROWS:
        algorithm, strategy = ROWS[name]
        if algorithm not in cache:
            cache[algorithm] = _packs(shuffled, algorithm, seq_length, buffer_size, seed)
        packs, lengths, dropped = cache[algorithm]
        sample_cost = cm.sample_costs(lengths, shuffled.tiles)
        order = np.random.default_rng(seed + 1).permutation(len(packs))  # training order
        packs = [packs[i] for i in order]
        if strategy == "default":  # as `mmtrain pack --dp`: every step full, no idle rank at the end
            packs = split_remainder(packs, lengths, sample_cost, dp * micro_batches, seq_length,
                                    sample_tiles=shuffled.tiles)
        costs = np.array([sample_cost[p].sum() for p in packs])
        ptiles = np.array([shuffled.tiles[p].sum() for p in packs], dtype=np.float64)
        assign = assign_packs_to_steps(costs, dp, micro_batches, strategy, pack_tiles=ptiles,
                                       window=window, num_stages=1 if name == "ours_no_pp_order" else pp,
                                       vision_weight=vision_weight)
        used = sorted(i for p in packs for i in p)
        expected = sorted(set(range(table.lengths.size)) - set(dropped))
        assert used == expected, "a sample is missing or used twice"
        row = {"strategy": name, "packing": algorithm or "none", "balancing": strategy, "packs": len(packs),
               "dropped": len(dropped)}
        row.update(metrics(assign, costs, dp, pp, ptiles))
        out.append(row)
    return out
