"""The step assembler: a window of packs -> steps of exactly `packs_per_step` packs -> (DP rank,
micro-batch) of every pack -> pipeline order of each rank's micro-batches.

One function chain used by training (online, window by window), by `mmtrain pack --dp` (plan files)
and by `mmtrain simulate`, so the straggler the simulator prints is the one training runs. Pure
functions of cost arrays: every rank calls them with the same inputs and gets the same answer, so
no communication is needed. Ties are broken by pack index.

Two stages, split on purpose:
* `form_steps` decides which packs share a step. It never looks at the DP size: the samples of a
  step depend only on the packs per step (`trainer.global_batch_size`) and the data / packing
  config, so a run resumed at another DP size sees the same samples per step. "default" sorts the
  window by cost and cuts it into consecutive steps: a step of near-equal packs splits evenly over
  any number of ranks. The step order is then shuffled (seeded) so that cost-sorted steps do not
  become a length curriculum. Baselines keep the packer's order.
* `layout_step` splits one step over the DP ranks, every rank exactly packs_per_step / dp packs:
  "default" = balanced largest differencing + swap repair (vision-aware), "lpt" / "karmarkar_karp"
  the classic within-batch balancers, "none" each rank a contiguous slice (Megatron's sampler).
  With PP > 1 each rank's micro-batches are ordered to shorten the simulated 1F1B schedule.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from mmtrain.balancing.assign import STRATEGIES, assign_step, step_ratio
from mmtrain.balancing.pipeline import order_microbatches, simulate_1f1b

__all__ = [
    "StepLayout", "assemble", "complete_steps", "form_steps", "layout_step", "step_figures", "validate_shape",
]


@dataclass
class StepLayout:
    """One step: its packs, and which rank runs which of them in which micro-batch (run order)."""

    packs: list[int]  # indices into the caller's pack list
    ranks: list[list[list[int]]]  # [dp rank][micro-batch] -> pack indices (same index space)


def validate_shape(packs_per_step: int, dp: int, micro_batch_size: int) -> int:
    """Micro-batches per rank M = packs_per_step / (dp x micro_batch_size); refuses what does not divide."""
    if packs_per_step < 1 or dp < 1 or micro_batch_size < 1:
        raise ValueError("packs per step, DP size and micro-batch size must be >= 1")
    if packs_per_step % (dp * micro_batch_size):
        raise ValueError(
            f"trainer.global_batch_size={packs_per_step} packs per step is not a multiple of DP size {dp} x "
            f"trainer.micro_batch_size={micro_batch_size}: every rank must get the same number of packs"
        )
    return packs_per_step // (dp * micro_batch_size)


DEFER_COST = 1e-4  # objective cost of leaving a pack to the next window (so nothing moves for nothing)


def form_steps(
    pack_costs: Sequence[float], packs_per_step: int, strategy: str = "default", seed=0, max_defer: int = 0,
) -> tuple[list[list[int]], list[int]]:
    """Group a window of packs into steps of `packs_per_step`, independent of the DP size.

    Returns (steps, deferred): pack indices per step, and the packs left for the next window
    (their count is len % packs_per_step, plus whole steps' worth when that helps; at most
    `max_defer`, which must be >= len % packs_per_step). "default": by decreasing cost, the
    remaining packs cut into consecutive steps, the deferred packs chosen by an exact dynamic
    programme minimising the summed max / mean of the steps at one pack per rank (the hardest
    layout; fewer ranks only average more packs). Why defer at all: two clusters of pack costs
    (e.g. single long samples vs packs of short ones) whose counts are not multiples of the step
    size would otherwise meet in a mixed step that no layout can balance. Baselines keep the
    packer's order and defer the last packs."""
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown balancing strategy {strategy!r}; choose from {STRATEGIES}")
    c = np.asarray(pack_costs, dtype=np.float64)
    n, p = c.size, packs_per_step
    r = n % p
    partial: list[int] = []
    if max_defer < r:  # an epoch that cannot fill its last step: a short step of the cheapest packs, last
        order = np.lexsort((np.arange(n), c))
        partial = sorted(int(i) for i in order[:r])
        rest = np.asarray(sorted(int(i) for i in order[r:]), dtype=np.int64)
        steps, _ = form_steps(c[rest], p, strategy, seed)
        return [[int(rest[i]) for i in st] for st in steps] + [partial], []
    if strategy != "default":
        return [list(range(i, i + p)) for i in range(0, n - r, p)], list(range(n - r, n))
    order = np.lexsort((np.arange(n), -c))  # by decreasing cost, ties by index
    x = c[order]
    keep = _cut_sorted(x, p, min(max_defer, n) if max_defer > r else r)
    steps, deferred, pos = [], [], 0
    for kind in keep:
        if kind == "d":
            deferred.append(int(order[pos]))
            pos += 1
        else:
            steps.append(sorted(int(i) for i in order[pos:pos + p]))
            pos += p
    perm = np.random.default_rng(seed).permutation(len(steps))
    return [steps[int(i)] for i in perm], sorted(deferred)


def _cut_sorted(x: np.ndarray, p: int, max_defer: int) -> list[str]:
    """Over costs sorted decreasingly: a sequence of "s" (the next p packs form a step) and "d"
    (defer the next pack), with d-count == len % p (mod p) and <= max_defer, minimising
    sum over steps of (first * p / sum - 1) + DEFER_COST per deferred pack."""
    n = x.size
    r = n % p
    if max_defer <= 0 or r == 0 and max_defer < p:
        if r:
            raise ValueError("cannot defer")
        return ["s"] * (n // p)
    ps = np.concatenate([[0.0], np.cumsum(x)])
    step_cost = np.full(n + 1, np.inf)
    if n >= p:
        s = ps[p:] - ps[:-p]
        with np.errstate(divide="ignore", invalid="ignore"):
            step_cost[: n - p + 1] = np.where(s > 0, x[: n - p + 1] * p / s - 1.0, 0.0)
    D = max_defer + 1
    f = np.full((n + 1, D), np.inf)
    f[0, 0] = 0.0
    take = np.zeros((n + 1, D), dtype=bool)  # reached by a step (else by a deferral)
    for i in range(n):
        row = f[i]
        if not np.isfinite(row).any():
            continue
        cand = row[:-1] + DEFER_COST
        better = cand < f[i + 1, 1:] - 1e-15
        f[i + 1, 1:][better] = cand[better]
        take[i + 1, 1:][better] = False
        if i + p <= n:
            cand = row + step_cost[i]
            better = cand < f[i + p] - 1e-15
            f[i + p][better] = cand[better]
            take[i + p][better] = True
    ds = [d for d in range(D) if d % p == r and np.isfinite(f[n, d])]
    d = min(ds, key=lambda k: (f[n, k], k))
    out, i = [], n
    while i > 0:
        if take[i, d]:
            out.append("s")
            i -= p
        else:
            out.append("d")
            i -= 1
            d -= 1
    return out[::-1]


def layout_step(
    pack_costs: Sequence[float],
    dp: int,
    micro_batch_size: int = 1,
    *,
    strategy: str = "default",
    pack_tiles: Sequence[float] | None = None,
    num_stages: int = 1,
    pipeline_order: bool = True,
    vision_weight: float = 0.25,
) -> list[list[list[int]]]:
    """[rank][micro-batch] -> positions into this step's packs, in run order. Every rank gets
    len / dp packs; only a step that could not be filled (an epoch whose samples cannot make a
    whole number of steps) spreads its packs as evenly as it can (counts differ by at most one)."""
    c = np.asarray(pack_costs, dtype=np.float64)
    n = c.size
    if n < 1 or dp < 1 or micro_batch_size < 1:
        raise ValueError("a step needs packs, and DP size and micro-batch size >= 1")
    per_rank = -(-n // dp)
    if strategy == "none" or dp == 1:
        bounds = np.linspace(0, n, dp + 1).round().astype(int) if n % dp else np.arange(0, n + 1, n // dp)
        groups = [list(range(int(bounds[r]), int(bounds[r + 1]))) for r in range(dp)]
    elif strategy == "default":
        groups = assign_step(c, dp, "default", pack_tiles=pack_tiles, vision_weight=vision_weight)
    else:
        groups = assign_step(c, dp, strategy, max_per_rank=per_rank)
    out = []
    for g in groups:
        g = sorted(g)
        mbs = [g[i:i + micro_batch_size] for i in range(0, len(g), micro_batch_size)]
        if num_stages > 1 and pipeline_order and len(mbs) > 1:
            order = order_microbatches([float(c[mb].sum()) for mb in mbs], num_stages)
            mbs = [mbs[i] for i in order]
        out.append(mbs or [[]])  # a rank with no pack (a short last step) runs one empty micro-batch
    sizes = [sum(len(mb) for mb in r) for r in out]
    if sum(sizes) != n or max(sizes) - min(sizes) > (0 if n % dp == 0 else 1):
        raise AssertionError(f"layout_step: uneven shares {sizes} of {n} packs over {dp} ranks")
    return out


def assemble(
    pack_costs: Sequence[float],
    packs_per_step: int,
    dp: int,
    micro_batch_size: int = 1,
    *,
    strategy: str = "default",
    pack_tiles: Sequence[float] | None = None,
    window: int | None = None,
    num_stages: int = 1,
    pipeline_order: bool = True,
    vision_weight: float = 0.25,
    seed: int = 0,
) -> list[StepLayout]:
    """The whole chain over a pack list, as training runs it window by window: windows of `window`
    packs (rounded up to whole steps; None = one window) plus what the previous window deferred,
    `form_steps` in each (the last defers nothing), `layout_step` of each step. Make the pack
    count a multiple of packs_per_step first (`complete_steps`); otherwise the last step is short."""
    c = np.asarray(pack_costs, dtype=np.float64)
    t = None if pack_tiles is None else np.asarray(pack_tiles, dtype=np.float64)
    validate_shape(packs_per_step, dp, micro_batch_size)
    n = c.size
    win = n if window is None else max(packs_per_step, -(-int(window) // packs_per_step) * packs_per_step)
    out: list[StepLayout] = []
    pending: list[int] = []  # deferred by the previous window
    for k, w0 in enumerate(range(0, n, max(win, 1))):
        idx = np.asarray(pending + list(range(w0, min(n, w0 + win))), dtype=np.int64)
        last = w0 + win >= n
        steps, deferred = form_steps(c[idx], packs_per_step, strategy, seed=[seed, k],
                                     max_defer=0 if last else idx.size % packs_per_step + 2 * packs_per_step)
        pending = [int(idx[i]) for i in deferred]
        for st in steps:
            packs = [int(idx[i]) for i in st]
            ranks = layout_step(c[packs], dp, micro_batch_size, strategy=strategy,
                                pack_tiles=None if t is None else t[packs], num_stages=num_stages,
                                pipeline_order=pipeline_order, vision_weight=vision_weight)
            out.append(StepLayout(packs, [[[packs[i] for i in mb] for mb in r] for r in ranks]))
    return out


def step_figures(rank_micro_batch_costs: Sequence[Sequence[float]], num_stages: int = 1) -> dict:
    """Predicted figures of one step from each rank's micro-batch costs in run order:
    straggler = max / mean rank cost; bubble = 1F1B idle share, 1 - sum(work / pp) / sum(makespan)."""
    loads = [float(np.sum(r)) for r in rank_micro_batch_costs]
    out = {"straggler": step_ratio(loads)}
    if num_stages > 1:
        spans = [simulate_1f1b(r, num_stages) for r in rank_micro_batch_costs]
        total = sum(spans)
        out["bubble"] = float(1.0 - sum(loads) / num_stages / total) if total > 0 else 0.0
    return out


# ---- the end of an epoch ----------------------------------------------------------------------
def complete_steps(
    packs: Sequence[Sequence[int]],
    sample_lengths: Sequence[int],
    sample_costs: Sequence[float],
    packs_per_step: int,
    capacity: int,
    *,
    sample_tiles: Sequence[int] | None = None,
    max_tiles_per_pack: int | None = None,
    target: float = 1.01,
) -> list[list[int]]:
    """The packs of an epoch's last window, made a multiple of `packs_per_step` (at least one step)
    so no rank idles, and evened out. (When even one sample per pack cannot make that many packs,
    every sample gets its own pack and the last step stays short.)

    Candidates: the samples of m packs -- the cheapest (under-filled ones), or those holding most
    samples (single long samples cannot make more packs) -- re-packed by LPT on sample cost, then
    moves and swaps, into (k+1) x packs_per_step packs under the capacity and tile limits, with m
    such that the count comes out right, for k = 0, 1, 3, 7, ... until the new packs are within
    `target` max / mean cost of each other. The new packs fill whole steps among themselves, so an
    under-filled tail pack need not share a step with full ones. Of the candidates (and, when the
    count is already right, the packs as they are) the one whose window cuts into the most even
    steps (`_cut_quality`) is kept; the packs as they are, split to the count (the one holding
    most samples first) and evened out by moves and swaps, are always a candidate. `sample_lengths` must include segment alignment
    and `capacity` pack alignment. Every sample stays exactly once."""
    p = packs_per_step
    packs = [list(q) for q in packs if len(q)]
    n_samples = sum(len(q) for q in packs)
    want = max(p, -(-len(packs) // p) * p)
    if n_samples < want:  # every pack a single sample would still not fill the last step
        want = n_samples
    extra = want - len(packs)
    cost = [float(sum(sample_costs[i] for i in q)) for q in packs]
    by_cost = sorted(range(len(packs)), key=lambda k: (cost[k], k))
    # Two pools to take the m packs from: the cheapest (under-filled packs), and the ones holding
    # most samples (the splittable ones: single long samples cannot make more packs). Among all
    # candidates the one whose whole window cuts into the most even steps wins.
    by_count = sorted(range(len(packs)), key=lambda k: (-len(packs[k]), cost[k], k))
    best: tuple[float, list[list[int]]] | None = None
    if not extra:
        best = (_cut_quality(cost, p), packs)
    for order in (by_cost, by_count):
        k = 0
        while want % p == 0:
            m = (k + 1) * p - extra
            if m > len(packs) or m < 1:
                break
            pool = order[:m]
            starts = [_lpt_bins([i for c in pool for i in packs[c]], (k + 1) * p, sample_lengths, sample_costs,
                                capacity, sample_tiles, max_tiles_per_pack)]
            split = _split_bins([packs[c] for c in pool], (k + 1) * p, sample_costs)
            if split is not None:  # the packs as they are (split to the count), evened out
                starts.append(_even_out(split, sample_lengths, sample_costs, capacity, sample_tiles, max_tiles_per_pack))
            good = False
            for bins in starts:
                if bins is None:
                    continue
                gone = set(pool)
                cand = [q for c, q in enumerate(packs) if c not in gone] + bins
                score = _cut_quality([float(sum(sample_costs[i] for i in q)) for q in cand], p)
                if best is None or score < best[0] - 1e-12:
                    best = (score, cand)
                good = good or _ratio([sum(float(sample_costs[i]) for i in b) for b in bins]) <= target
            if good:
                break
            k = 2 * k + 1 if k else 1
    if best is not None:
        return best[1]
    return packs if not extra else _split_bins(packs, want, sample_costs)  # a short last step


def _cut_quality(costs: Sequence[float], p: int) -> float:
    """Sum over the steps `form_steps` would cut (sorted, p at a time) of max / mean - 1 at one pack
    per rank: how evenly a window of packs can run."""
    x = np.sort(np.asarray(costs, dtype=np.float64))[::-1]
    n = x.size // p * p
    if n == 0:
        return 0.0
    g = x[:n].reshape(-1, p)
    s = g.sum(axis=1)
    return float(np.sum(np.where(s > 0, g[:, 0] * p / np.where(s > 0, s, 1.0) - 1.0, 0.0)))


def _ratio(costs: Sequence[float]) -> float:
    m = float(np.mean(costs)) if len(costs) else 0.0
    return float(max(costs) / m) if m > 0 else 1.0


def _lpt_bins(pool, nbins, lengths, costs, capacity, tiles, max_tiles):
    """LPT of `pool` samples into `nbins` non-empty bins under the capacity / tile limits, evened
    out (`_even_out`); None when LPT cannot place a sample."""
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
    if not all(bins):
        return None
    return _even_out(bins, lengths, costs, capacity, tiles, max_tiles)


def _split_bins(packs, nbins, costs):
    """`packs` split (the one holding most samples first) until there are `nbins`; None if too few samples."""
    bins = [list(p) for p in packs]
    if sum(len(b) for b in bins) < nbins:
        return None
    while len(bins) < nbins:
        k = max(range(len(bins)), key=lambda j: (len(bins[j]), -j))
        q = sorted(bins[k], key=lambda i: (-float(costs[i]), i))
        bins[k], extra = q[0::2], q[1::2]
        bins.append(extra)
    return bins


def _even_out(bins, lengths, costs, capacity, tiles, max_tiles, rounds: int = 300):
    """Moves and swaps of single samples between two bins that lower the costlier one without
    raising the other above it, always involving the costliest or the cheapest bin, while the
    capacity / tile limits hold and no bin empties. Deterministic (ties by bin index)."""
    bins = [sorted(b) for b in bins]
    nb = len(bins)
    tl = (lambda i: int(tiles[i])) if tiles is not None else (lambda i: 0)
    tok = [sum(int(lengths[i]) for i in b) for b in bins]
    til = [sum(tl(i) for i in b) for b in bins]
    load = [sum(float(costs[i]) for i in b) for b in bins]

    def fits(b, add, drop):
        return (tok[b] + sum(int(lengths[i]) for i in add) - sum(int(lengths[i]) for i in drop) <= capacity
                and (max_tiles is None or til[b] + sum(tl(i) for i in add) - sum(tl(i) for i in drop) <= max_tiles))

    def best_exchange(hi, lo):
        gap = load[hi] - load[lo]
        best = (0.0, None)
        for a in bins[hi]:
            d = float(costs[a])
            if 0 < d < gap and len(bins[hi]) > 1 and fits(lo, [a], []):
                gain = min(d, gap - d)
                if gain > best[0] + 1e-12 * gap:
                    best = (gain, (a, None))
            for b in bins[lo]:
                d = float(costs[a]) - float(costs[b])
                if 0 < d < gap and fits(lo, [a], [b]) and fits(hi, [b], [a]):
                    gain = min(d, gap - d)
                    if gain > best[0] + 1e-12 * gap:
                        best = (gain, (a, b))
        return best[1]

    for _ in range(rounds):
        by = sorted(range(nb), key=lambda b: (load[b], b))
        lo, hi = by[0], by[-1]
        if load[hi] - load[lo] <= 0:
            break
        pairs = [(hi, lo)] + [(hi, b) for b in by[1:-1]] + [(b, lo) for b in reversed(by[1:-1])]
        for h, l in pairs:
            move = best_exchange(h, l)
            if move is not None:
                break
        else:
            break
        a, b = move
        for src, dst, i in ((h, l, a), (l, h, b)):
            if i is None:
                continue
            bins[src].remove(i)
            bins[dst].append(i)
            tok[src] -= int(lengths[i]); tok[dst] += int(lengths[i])
            til[src] -= tl(i); til[dst] += tl(i)
            load[src] -= float(costs[i]); load[dst] += float(costs[i])
    return [sorted(b) for b in bins]
