"""Assign packs to (step, DP rank, micro-batch) so DP ranks finish each step together.

Pure functions of cost arrays: every rank calls them with the same inputs and gets the same
answer, so no communication is needed. Ties are always broken by pack index.

Why cross-step: with one pack per rank per step, balancing *inside* a global batch (verl-style
LPT / Karmarkar-Karp) has nothing to move; the freedom is which packs share a step. Within a
window of packs, "default" sorts packs by cost and cuts the sorted list into steps of similar
packs (an exact dynamic programme over consecutive cuts), or, with several micro-batches, first
builds dp*steps equal-cost bins of M packs (balanced largest differencing) and then groups bins
of similar cost into steps. A swap-repair pass then evens out the vision (tile) load per rank
without letting the cost ratio drift above a small tolerance.
"""

from __future__ import annotations

import heapq
from typing import Sequence

import numpy as np

__all__ = ["STRATEGIES", "assign_step", "assign_packs_to_steps", "step_ratio", "straggler_ratio"]

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


# ---- across steps -------------------------------------------------------------------------------
def _dp_cuts(x: np.ndarray, t: np.ndarray | None, g: int, r: int, w: float) -> list[tuple[int, int]]:
    """Cut a sorted-descending cost array into consecutive groups of size g plus one of size r
    (r = 0: none), minimising the summed step objective. Exact, O(n * g)."""
    n = x.size
    ps = np.concatenate([[0.0], np.cumsum(x)])

    def cost(i: int, j: int) -> float:
        s = ps[j] - ps[i]
        v = x[i] * (j - i) / s if s > 0 else 1.0  # sorted: the max is the first
        if t is not None and w > 0:
            seg = t[i:j]
            m = seg.mean()
            v += w * (seg.max() / m if m > 0 else 1.0)
        return v

    inf = float("inf")
    f = np.full((n + 1, 2), inf)
    back: dict[tuple[int, int], tuple[int, int]] = {}
    f[0, 0] = 0.0
    for i in range(n):
        for u in (0, 1):
            if f[i, u] == inf:
                continue
            if i + g <= n:
                v = f[i, u] + cost(i, i + g)
                if v < f[i + g, u] - 1e-15:
                    f[i + g, u] = v
                    back[(i + g, u)] = (i, u)
            if u == 0 and r > 0 and i + r <= n:
                v = f[i, 0] + cost(i, i + r)
                if v < f[i + r, 1] - 1e-15:
                    f[i + r, 1] = v
                    back[(i + r, 1)] = (i, 0)
    state = (n, 1 if r > 0 else 0)
    cuts = []
    while state[0] > 0:
        prev = back[state]
        cuts.append((prev[0], state[0]))
        state = prev
    return cuts[::-1]


def _step_terms(c: np.ndarray, t: np.ndarray) -> tuple[float, float]:
    return step_ratio(c), step_ratio(t)


def _swap_ratios(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """ratio of x after x[i] := y[j], for all (i, j) (max/mean, 1.0 when the mean is 0)."""
    top = np.argsort(-x, kind="stable")
    excl = np.full(x.size, x[top[0]])
    if x.size > 1:
        excl[top[0]] = x[top[1]]
    else:
        excl[top[0]] = -np.inf
    mx = np.maximum(excl[:, None], y[None, :])
    mean = (x.sum() - x[:, None] + y[None, :]) / x.size
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(mean > 0, mx / mean, 1.0)


def _vision_swaps(groups: list[list[int]], c: np.ndarray, t: np.ndarray, w: float, rounds: int = 3):
    """One pack per rank: swap packs between neighbouring steps (similar costs after the sort)
    when cost ratio + w * tile ratio drops and neither step's cost ratio exceeds its guard."""
    groups = [list(g) for g in groups]
    for _ in range(rounds):
        changed = False
        for s in range(len(groups) - 1):
            a, b = np.array(groups[s]), np.array(groups[s + 1])
            if a.size != b.size:
                continue
            ca, cb, ta, tb = c[a], c[b], t[a], t[b]
            cra, tra = _step_terms(ca, ta)
            crb, trb = _step_terms(cb, tb)
            lim_a, lim_b = max(cra, 1 + _COST_TOL), max(crb, 1 + _COST_TOL)
            before = cra + crb + w * (tra + trb)
            r1, r2 = _swap_ratios(ca, cb), _swap_ratios(cb, ca).T
            v = r1 + r2 + w * (_swap_ratios(ta, tb) + _swap_ratios(tb, ta).T)
            v[(r1 > lim_a) | (r2 > lim_b)] = np.inf
            k = int(np.argmin(v))  # first minimum in row-major order: deterministic
            best = (before, None) if not v.flat[k] < before - 1e-12 else (v.flat[k], divmod(k, b.size))
            if best[1] is not None:
                i, j = best[1]
                groups[s][i], groups[s + 1][j] = groups[s + 1][j], groups[s][i]
                changed = True
        if not changed:
            break
    return groups


def _window_default(c, t, dp, m, w):
    """Steps (list of per-rank pack lists, window-local indices) for one window."""
    n = c.size
    size = dp * m
    order = _order_desc(c)
    x = c[order]
    r = n % size
    if m == 1:
        groups = [[int(order[q]) for q in range(i, j)] for i, j in _dp_cuts(x, None, dp, r, 0.0)]
        if t is not None and w > 0:
            groups = _vision_swaps(groups, c, t, w)
        return [[[i] for i in g] for g in groups]
    # Partial step: the block of r consecutive sorted packs that balances best over dp ranks.
    partial: list[int] = []
    if r:
        starts = sorted(set(np.linspace(0, n - r, num=min(33, n - r + 1)).astype(int).tolist()))
        best = None
        for s0 in starts:
            blk = order[s0:s0 + r]
            gr = assign_step(c[blk], dp, "default")
            val = step_ratio([c[blk][g].sum() for g in gr if g])
            if best is None or val < best[0] - 1e-12:
                best = (val, s0)
        s0 = best[1]
        partial = [int(i) for i in order[s0:s0 + r]]
        order = np.concatenate([order[:s0], order[s0 + r:]])
    steps = []
    bins_n = (n - r) // m
    if bins_n:
        bins = _kk(c[order], bins_n, balanced=True)
        bins = [[int(order[i]) for i in b] for b in bins]
        bload = np.array([c[b].sum() for b in bins])
        border = np.lexsort((np.array([min(b) for b in bins]), -bload))
        for j in range(0, bins_n, dp):
            ranks = [bins[int(q)] for q in border[j:j + dp]]
            flat = [i for g in ranks for i in g]
            loc = {i: k for k, i in enumerate(flat)}
            fixed = _repair([[loc[i] for i in g] for g in ranks], c[flat], None if t is None else t[flat], w)
            ranks = [[flat[i] for i in g] for g in fixed]
            steps.append(ranks)
    if partial:
        gr = assign_step(c[partial], dp, "default", pack_tiles=None if t is None else t[partial], vision_weight=w)
        steps.append([[partial[i] for i in g] for g in gr])
    return steps


def assign_packs_to_steps(
    pack_costs: Sequence[float],
    dp: int,
    micro_batches: int,
    strategy: str = "default",
    *,
    pack_tiles: Sequence[float] | None = None,
    window: int | None = None,
    num_stages: int = 1,
    vision_weight: float = 0.25,
    seed: int = 0,
) -> list[tuple[int, int, int]]:
    """(step, rank, micro_batch) for every pack, in input order.

    A step holds dp*micro_batches packs (only the last step may hold fewer); each pack is used
    exactly once. Baselines ("none", "lpt", "karmarkar_karp") keep packs in their input steps and
    only split each step over ranks (counts capped at micro_batches). "default" may move packs
    between steps inside a window of `window` packs (rounded up to whole steps; None = all).
    With num_stages > 1 each rank's micro-batches are ordered to shrink 1F1B bubbles.
    `seed` shuffles the order of steps inside a window (pass the epoch for per-epoch variety).
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; choose from {STRATEGIES}")
    if dp < 1 or micro_batches < 1:
        raise ValueError("dp and micro_batches must be >= 1")
    c = np.asarray(pack_costs, dtype=np.float64)
    t = None if pack_tiles is None else np.asarray(pack_tiles, dtype=np.float64)
    n = c.size
    size = dp * micro_batches
    steps: list[list[list[int]]] = []  # global pack indices per rank per step
    if strategy == "default":
        win = n if window is None else max(size, -(-int(window) // size) * size)
        for w0 in range(0, n, max(win, 1)):
            idx = np.arange(w0, min(n, w0 + win))
            local = _window_default(c[idx], None if t is None else t[idx], dp, micro_batches,
                                    vision_weight)
            local = [[[int(idx[i]) for i in g] for g in st] for st in local]
            # Cost-sorted steps would make a length curriculum: shuffle them (seeded, so identical
            # on every rank); a partial step (fewer packs) goes last.
            perm = np.random.default_rng([seed, w0]).permutation(len(local))
            local = [local[i] for i in perm]
            local.sort(key=lambda st: sum(len(g) for g in st) < size)
            steps += local
    else:
        for s0 in range(0, n, size):
            idx = np.arange(s0, min(n, s0 + size))
            gr = assign_step(c[idx], dp, strategy, max_per_rank=micro_batches)
            steps.append([[int(idx[i]) for i in g] for g in gr])

    out: list[tuple[int, int, int] | None] = [None] * n
    for s, ranks in enumerate(steps):
        for r, packs in enumerate(ranks):
            seq = sorted(packs)
            if num_stages > 1 and len(seq) > 1:
                from .pipeline import order_microbatches

                seq = [seq[i] for i in order_microbatches(c[seq], num_stages)]
            for mb, p in enumerate(seq):
                out[p] = (s, r, mb)
    assert all(o is not None for o in out)
    return out  # type: ignore[return-value]


def split_remainder(
    packs: Sequence[Sequence[int]],
    sample_lengths: Sequence[int],
    sample_costs: Sequence[float],
    slots: int,
    capacity: int,
    *,
    sample_tiles: Sequence[int] | None = None,
    max_tiles_per_pack: int | None = None,
    target: float = 1.01,
) -> list[list[int]]:
    """Make the pack count a multiple of `slots` (dp x micro-batches) so no rank idles in the last step.

    A partial last step leaves ranks idle: their cost is 0 and that step's max/mean explodes at large
    DP. The samples of the r = len % slots cheapest packs -- plus k x slots more cheap packs, with the
    smallest k whose re-packed bins are within `target` max/mean cost (spreading the deficit over
    more packs keeps big samples from standing alone) -- are re-packed by LPT on sample cost into
    (k+1) x slots packs under the capacity and tile limits. The pack count grows by slots - r
    whatever k is. `sample_lengths` must include alignment padding and `capacity` pack alignment.
    Returns `packs` unchanged when it cannot help. Every sample stays exactly once.
    """
    packs = [list(p) for p in packs]
    r = len(packs) % slots
    if r == 0 or slots <= 1:
        return packs
    pack_cost = [float(sum(sample_costs[i] for i in p)) for p in packs]
    by_cost = sorted(range(len(packs)), key=lambda k: (pack_cost[k], k))
    best: tuple[float, list[int], list[list[int]]] | None = None
    k = 0
    while r + k * slots <= len(packs):
        chosen = by_cost[: r + k * slots]
        bins = _lpt_bins(
            [i for c in chosen for i in packs[c]], (k + 1) * slots, sample_lengths, sample_costs, capacity,
            sample_tiles, max_tiles_per_pack,
        )
        if bins is not None:
            costs = [sum(float(sample_costs[i]) for i in b) for b in bins]
            ratio = max(costs) / (sum(costs) / len(costs))
            if best is None or ratio < best[0]:
                best = (ratio, chosen, bins)
            if ratio <= target:
                break
        k = 2 * k + 1 if k else 1
    if best is None:
        return packs
    _, chosen, bins = best
    gone = set(chosen)
    return [p for c, p in enumerate(packs) if c not in gone] + bins


def _lpt_bins(pool, nbins, lengths, costs, capacity, tiles, max_tiles):
    """LPT of `pool` samples into `nbins` non-empty bins under capacity/tile limits, or None."""
    if len(pool) < nbins:
        return None
    order = sorted(pool, key=lambda i: (-float(costs[i]), i))
    heap = [(0.0, b) for b in range(nbins)]  # (cost, bin): least-loaded first
    bins: list[list[int]] = [[] for _ in range(nbins)]
    tok, til = [0] * nbins, [0] * nbins
    for i in order:
        n, t = int(lengths[i]), int(tiles[i]) if tiles is not None else 0
        skipped = []
        while heap:
            c, b = heapq.heappop(heap)
            if tok[b] + n <= capacity and (max_tiles is None or til[b] + t <= max_tiles):
                bins[b].append(i)
                tok[b] += n
                til[b] += t
                heapq.heappush(heap, (c + float(costs[i]), b))
                break
            skipped.append((c, b))
        else:
            return None
        for item in skipped:
            heapq.heappush(heap, item)
    return bins if all(bins) else None
