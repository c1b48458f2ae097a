"""Split one step's packs over DP ranks so they finish together.

Pure functions of cost arrays: every rank calls them with the same inputs and gets the same
answer, so no communication is needed. Ties are always broken by pack index. Which packs share a
step is decided before (`mmtrain.balancing.assemble.form_steps`): with one pack per rank,
balancing *inside* a step has nothing to move, so the freedom that matters is there.

"default": balanced (equal-count) largest differencing, then a swap repair that lowers the max
rank cost and then evens out the vision (tile) load per rank without letting the cost ratio
drift above a small tolerance. Baselines: "lpt", "karmarkar_karp", "none" (round robin).
"""

from __future__ import annotations

import heapq
from typing import Sequence

import numpy as np

__all__ = ["STRATEGIES", "assign_step", "step_ratio", "straggler_ratio"]

STRATEGIES = ("none", "lpt", "karmarkar_karp", "default")
_COST_TOL = 2e-3  # vision repair may raise a step's cost ratio up to max(current, 1 + this)


# ---- metrics --------------------------------------------------------------------------------------
def step_ratio(loads: Sequence[float]) -> float:
    """max / mean over the ranks that hold work (1.0 for an empty or all-zero step)."""
    x = np.asarray([v for v in loads], dtype=np.float64)
    m = x.mean() if x.size else 0.0
    return float(x.max() / m) if m > 0 else 1.0


def straggler_ratio(assignment: Sequence[tuple[int, int, int]], pack_costs: Sequence[float]) -> float:
    """Mean over steps of max/mean rank cost, from (step, rank, micro_batch) per pack."""
    per: dict[int, dict[int, float]] = {}
    for (s, r, _), c in zip(assignment, pack_costs):
        per.setdefault(s, {}).setdefault(r, 0.0)
        per[s][r] += float(c)
    if not per:
        return 1.0
    return float(np.mean([step_ratio(list(v.values())) for v in per.values()]))


# ---- within one step ------------------------------------------------------------------------------
def _order_desc(costs: np.ndarray) -> np.ndarray:
    """Indices by decreasing cost, ties by increasing index."""
    return np.lexsort((np.arange(costs.size), -costs))


def _lpt(costs: np.ndarray, k: int, cap: int | None) -> list[list[int]]:
    """Longest processing time first: each pack to the least-loaded rank with room."""
    groups: list[list[int]] = [[] for _ in range(k)]
    heap = [(0.0, r) for r in range(k)]
    for i in _order_desc(costs):
        load, r = heapq.heappop(heap)
        groups[r].append(int(i))
        if cap is None or len(groups[r]) < cap:
            heapq.heappush(heap, (load + float(costs[i]), r))
    return groups


def _kk(costs: np.ndarray, k: int, balanced: bool) -> list[list[int]]:
    """Multiway largest differencing (Karmarkar-Karp).

    `balanced`: each initial k-tuple takes k consecutive sorted packs (zero-padded), one per
    subset, so subsets end with equal counts (+-1): the cardinality-constrained variant.
    """
    order = [int(i) for i in _order_desc(costs)]
    tuples: list[list[tuple[float, list[int]]]] = []
    if balanced:
        order += [-1] * ((-len(order)) % k)
        for j in range(0, len(order), k):
            tuples.append([(float(costs[i]) if i >= 0 else 0.0, [i] if i >= 0 else []) for i in order[j:j + k]])
    else:
        for i in order:
            tuples.append([(float(costs[i]), [i])] + [(0.0, []) for _ in range(k - 1)])
    heap = []
    for n, t in enumerate(tuples):
        t.sort(key=lambda s: (-s[0], s[1][:1]))
        heap.append((-(t[0][0] - t[-1][0]), n, t))
    heapq.heapify(heap)
    counter = len(tuples)
    while len(heap) > 1:
        _, _, a = heapq.heappop(heap)
        _, _, b = heapq.heappop(heap)
        merged = [(a[j][0] + b[k - 1 - j][0], a[j][1] + b[k - 1 - j][1]) for j in range(k)]
        merged.sort(key=lambda s: (-s[0], sorted(s[1])[:1]))
        heapq.heappush(heap, (-(merged[0][0] - merged[-1][0]), counter, merged))
        counter += 1
    final = heap[0][2] if heap else [(0.0, []) for _ in range(k)]
    return [sorted(s[1]) for s in final]


def _loads(groups: list[list[int]], x: np.ndarray) -> np.ndarray:
    return np.array([x[g].sum() if g else 0.0 for g in groups], dtype=np.float64)


def _objective(groups, costs, tiles, w) -> tuple[float, float]:
    """(cost ratio, cost ratio + w * tile ratio) over ranks holding packs."""
    nonempty = [g for g in groups if g]
    cr = step_ratio(_loads(nonempty, costs))
    if tiles is None or w <= 0:
        return cr, cr
    return cr, cr + w * step_ratio(_loads(nonempty, tiles))


def _repair(groups, costs, tiles, w, max_iter=200):
    """Pairwise swaps between ranks while the objective improves.

    Phase 1 lowers the max rank cost; phase 2 (vision) lowers cost ratio + w * tile ratio while
    the cost ratio stays <= max(start, 1 + _COST_TOL). Swaps keep per-rank counts.
    """
    groups = [list(g) for g in groups]
    k = len(groups)
    for _ in range(max_iter):  # phase 1: best swap for the most loaded rank
        loads = _loads(groups, costs)
        hi = int(np.argmax(loads))
        best = (0.0, None)
        for r in range(k):
            if r == hi or not groups[r]:
                continue
            gap = loads[hi] - loads[r]
            for a in groups[hi]:
                for b in groups[r]:
                    d = costs[a] - costs[b]
                    if 0 < d < gap:
                        gain = min(d, gap - d)  # new max of the pair drops by this much
                        if gain > best[0] + 1e-12 * loads[hi]:
                            best = (gain, (r, a, b))
        if best[1] is None:
            break
        r, a, b = best[1]
        groups[hi][groups[hi].index(a)] = b
        groups[r][groups[r].index(b)] = a
    if tiles is None or w <= 0:
        return groups
    cr0, f = _objective(groups, costs, tiles, w)
    limit = max(cr0, 1.0 + _COST_TOL)
    for _ in range(max_iter):  # phase 2: vision, first improving swap from the max-tile rank
        tl = _loads(groups, tiles)
        hi = int(np.argmax(tl))
        done = True
        for r in np.argsort(tl, kind="stable"):
            r = int(r)
            if r == hi:
                continue
            for a in list(groups[hi]):
                for b in list(groups[r]):
                    if tiles[a] <= tiles[b]:
                        continue
                    groups[hi][groups[hi].index(a)] = b
                    groups[r][groups[r].index(b)] = a
                    cr, nf = _objective(groups, costs, tiles, w)
                    if cr <= limit and nf < f - 1e-12:
                        f, done = nf, False
                        break
                    groups[hi][groups[hi].index(b)] = a
                    groups[r][groups[r].index(a)] = b
                if not done:
                    break
            if not done:
                break
        if done:
            break
    return groups


def assign_step(
    pack_costs: Sequence[float],
    num_ranks: int,
    strategy: str = "default",
    *,
    pack_tiles: Sequence[float] | None = None,
    max_per_rank: int | None = None,
    vision_weight: float = 0.25,
) -> list[list[int]]:
    """Split one step's packs over `num_ranks` ranks; returns pack indices per rank (sorted).

    "none": round-robin in the given order; "lpt": greedy to the least-loaded rank;
    "karmarkar_karp": multiway largest differencing; "default": balanced (equal-count) largest
    differencing + swap repair, vision-aware when `pack_tiles` is given. `max_per_rank` caps
    counts for "lpt" (cardinality-constrained LPT); "default" always balances counts to +-1.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; choose from {STRATEGIES}")
    if num_ranks < 1:
        raise ValueError("num_ranks must be >= 1")
    costs = np.asarray(pack_costs, dtype=np.float64)
    n = costs.size
    if strategy == "none":
        groups = [list(range(r, n, num_ranks)) for r in range(num_ranks)]
    elif strategy == "lpt":
        groups = _lpt(costs, num_ranks, max_per_rank)
    elif strategy == "karmarkar_karp":
        groups = _kk(costs, num_ranks, balanced=max_per_rank is not None)
    else:
        tiles = None if pack_tiles is None else np.asarray(pack_tiles, dtype=np.float64)
        groups = _repair(_kk(costs, num_ranks, balanced=True), costs, tiles, vision_weight)
    return [sorted(g) for g in groups]
