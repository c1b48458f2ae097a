"""1F1B pipeline: a bubble simulator and a micro-batch order that shrinks bubbles.

With equal micro-batches 1F1B idles (P-1)/(M+P-1) of the time. Unequal ones add stalls: a big
first micro-batch delays every later stage's warm-up, a big last one delays the drain, and a big
one next to a small one makes its neighbour stage wait in the steady phase. The order is chosen
by simulating candidate orders (cheap: O(P*M) each), so it is deterministic and identical on all
ranks of a stage, which see the same costs.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

__all__ = ["simulate_1f1b", "bubble_fraction", "order_microbatches"]

FORWARD_SHARE = 1.0 / 3.0  # backward ~ 2x forward


def simulate_1f1b(costs: Sequence[float], num_stages: int, forward_share: float = FORWARD_SHARE) -> float:
    """Makespan of one 1F1B step; each stage does cost/num_stages of a micro-batch's work."""
    c = np.asarray(costs, dtype=np.float64) / max(num_stages, 1)
    m, p = c.size, max(num_stages, 1)
    if m == 0:
        return 0.0
    if p == 1:
        return float(c.sum())
    fwd, bwd = c * forward_share, c * (1.0 - forward_share)
    ops = []
    for s in range(p):
        warm = min(p - 1 - s, m)
        seq = [("F", j) for j in range(warm)]
        for j in range(m - warm):
            seq += [("F", warm + j), ("B", j)]
        seq += [("B", j) for j in range(m - warm, m)]
        ops.append(seq)
    done_f = np.full((p, m), np.nan)
    done_b = np.full((p, m), np.nan)
    ptr, free = [0] * p, [0.0] * p
    remaining = sum(len(o) for o in ops)
    while remaining:
        progressed = False
        for s in range(p):
            while ptr[s] < len(ops[s]):
                kind, j = ops[s][ptr[s]]
                if kind == "F":
                    dep = 0.0 if s == 0 else done_f[s - 1, j]
                    dur = fwd[j]
                else:
                    dep = done_f[s, j] if s == p - 1 else done_b[s + 1, j]
                    dur = bwd[j]
                if np.isnan(dep):
                    break
                end = max(free[s], dep) + dur
                (done_f if kind == "F" else done_b)[s, j] = end
                free[s] = end
                ptr[s] += 1
                remaining -= 1
                progressed = True
        if not progressed:  # cannot happen for a valid 1F1B schedule
            raise RuntimeError("1F1B simulation deadlocked")
    return float(max(free))


def bubble_fraction(costs: Sequence[float], num_stages: int) -> float:
    """Idle share of stage-time: 1 - work / (stages * makespan)."""
    span = simulate_1f1b(costs, num_stages)
    if span <= 0:
        return 0.0
    return max(0.0, 1.0 - float(np.sum(costs)) / max(num_stages, 1) / span)


def order_microbatches(costs: Sequence[float], num_stages: int) -> list[int]:
    """A permutation of micro-batch indices with a short simulated 1F1B makespan.

    Candidates: given order, ascending, descending, and "valley" (small at both ends, large in
    the middle); the best is then polished by adjacent swaps while it improves. Ties keep the
    earlier candidate, so the result is deterministic.
    """
    c = np.asarray(costs, dtype=np.float64)
    m = c.size
    if m <= 1 or num_stages <= 1:
        return list(range(m))
    asc = [int(i) for i in np.lexsort((np.arange(m), c))]
    valley = asc[0::2] + asc[1::2][::-1]
    cands = [list(range(m)), asc, asc[::-1], valley]
    best, best_t = cands[0], simulate_1f1b(c[cands[0]], num_stages)
    for o in cands[1:]:
        tt = simulate_1f1b(c[o], num_stages)
        if tt < best_t * (1 - 1e-12):
            best, best_t = o, tt
    improved, rounds = True, 0
    while improved and rounds < 4:
        improved, rounds = False, rounds + 1
        for i in range(m - 1):
            o = best[:i] + [best[i + 1], best[i]] + best[i + 2:]
            tt = simulate_1f1b(c[o], num_stages)
            if tt < best_t * (1 - 1e-12):
                best, best_t, improved = o, tt, True
    return best
