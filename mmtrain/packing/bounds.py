"""Lower bounds on the number of packs (for benchmarks and for judging a plan's gap).

All bounds work on distinct lengths with counts, so their cost scales with the number of distinct
lengths, not with the number of samples:

* `volume_bound`: ceil(sum / L).
* `l2_bound`: Martello-Toth L2 (counts items > L/2 that cannot share a pack).
* `floor_bound`: dual-feasible functions f(x) = floor((x - s) / q) (0 below s): in one pack
  sum f <= floor((L - s) / q), so packs >= ceil(sum f / floor((L - s) / q)). With q = 256 and
  s = 16 this is the "at most 31 tiles of 256 tokens per pack" bound of VLM data; we scan q, s.
* `lp_bound`: the pattern (Gilmore-Gomory) LP relaxation solved by column generation: a dense
  revised simplex on the master and a bounded knapsack DP for pricing. Every iteration's duals y
  (clipped to >= 0) give the Farley bound y.d / max_pattern(y), valid even if stopped early; the
  reported bound is the best of them, rounded up. Lengths are grouped into at most `max_classes`
  classes, each rounded DOWN to its smallest member (a relaxation, so the bound stays valid).
"""

from __future__ import annotations

import math
import time

import numpy as np


def _counts(lengths) -> tuple[np.ndarray, np.ndarray]:
    u, c = np.unique(np.asarray(lengths, dtype=np.int64), return_counts=True)
    return u, c


def volume_bound(lengths, capacity: int) -> int:
    s = int(np.asarray(lengths, dtype=np.int64).sum())
    return -(-s // capacity)


def l2_bound(lengths, capacity: int) -> int:
    """Martello-Toth L2, max over thresholds K in {0} U distinct sizes <= L/2."""
    u, c = _counts(lengths)
    if len(u) == 0:
        return 0
    L = capacity
    tot = u * c
    best = volume_bound(lengths, L)
    cnt_suffix = np.cumsum(c[::-1])[::-1]  # items >= u[j]
    sum_suffix = np.cumsum(tot[::-1])[::-1]

    def suffix(thr):  # count, sum of items > thr
        j = np.searchsorted(u, thr, side="right")
        return (cnt_suffix[j], sum_suffix[j]) if j < len(u) else (0, 0)

    for K in [0] + [int(x) for x in u if x <= L // 2]:
        n1, _ = suffix(L - K)
        nbig, sbig = suffix(L // 2)
        n2, s2 = nbig - n1, sbig - suffix(L - K)[1]
        n3c, s3 = suffix(K - 1) if K > 0 else (cnt_suffix[0], sum_suffix[0])
        s3 = s3 - sbig
        lb = n1 + n2 + max(0, -(-(int(s3) - (int(n2) * L - int(s2))) // L))
        best = max(best, int(lb))
    return best


def floor_bound(lengths, capacity: int, qs=None, shifts=None) -> tuple[int, tuple[int, int]]:
    """max over (q, s) of ceil(sum max(0, floor((x - s) / q)) / floor((L - s) / q)); returns (bound, (q, s))."""
    u, c = _counts(lengths)
    if len(u) == 0:
        return 0, (1, 0)
    L = capacity
    best, arg = volume_bound(lengths, L), (1, 0)
    if qs is None:
        qs = sorted({q for q in [64, 128, 256, 512, 576, 768, 1024] if q < L} | {int(L // k) for k in range(2, 33)})
    if shifts is None:
        shifts = sorted({0, 8, 16, 24, 32, 48, 64} | {int(u[0])})
    for q in qs:
        for s in shifts:
            cap = (L - s) // q
            if cap <= 0:
                continue
            f = np.maximum(0, (u - s) // q)
            lb = -(-int((f * c).sum()) // cap)
            if lb > best:
                best, arg = lb, (int(q), int(s))
    return best, arg


def _classes(u: np.ndarray, c: np.ndarray, max_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Merge adjacent distinct sizes into <= max_classes classes; each class takes its smallest size."""
    if len(u) <= max_classes:
        return u, c
    # split into equal-count groups of distinct values (quantiles of the distinct sizes)
    edges = np.linspace(0, len(u), max_classes + 1).astype(np.int64)
    edges = np.unique(edges)
    sizes = u[edges[:-1]]
    counts = np.add.reduceat(c, edges[:-1])
    return sizes, counts


def _knapsack(sizes: np.ndarray, values: np.ndarray, bounds: np.ndarray, L: int) -> tuple[float, np.ndarray]:
    """max values.a s.t. sizes.a <= L, 0 <= a <= bounds (binary splitting, numpy over capacity)."""
    dp = np.zeros(L + 1)
    items: list[tuple[int, int, int]] = []  # (class, multiplicity, weight)
    takes: list[np.ndarray] = []
    for i in np.flatnonzero(values > 1e-12).tolist():
        s, v, b = int(sizes[i]), float(values[i]), int(bounds[i])
        k = 1
        while b > 0:
            m = min(k, b)
            w = s * m
            if w > L:
                break
            cand = dp[:-w] + v * m if w > 0 else dp + v * m
            take = np.zeros(L + 1, bool)
            take[w:] = cand > dp[w:] + 1e-12
            dp[w:] = np.maximum(dp[w:], cand)
            items.append((i, m, w))
            takes.append(take)
            b -= m
            k *= 2
    a = np.zeros(len(sizes), np.int64)
    cpos = L
    for (i, m, w), take in zip(reversed(items), reversed(takes)):
        if take[cpos]:
            a[i] += m
            cpos -= w
    return float(dp[L]), a


def lp_bound(lengths, capacity: int, max_classes: int = 400, max_iters: int = 5000, time_limit: float = 60.0) -> dict:
    """Pattern-LP (column generation) lower bound; returns {'bound', 'lp', 'iters', 'classes', 'optimal'}."""
    u, c = _counts(lengths)
    L = capacity
    if len(u) == 0:
        return {"bound": 0, "lp": 0.0, "iters": 0, "classes": 0, "optimal": True}
    s, d = _classes(u, c, max_classes)
    d = d.astype(float)
    m = len(s)
    ub = np.minimum(d.astype(np.int64), L // s)
    # basis: homogeneous patterns (column j holds floor(L/s_j) copies of size j)
    cols: list[np.ndarray] = []
    binv = np.diag(1.0 / (L // s).astype(float))
    xb = d * np.diag(binv)
    cb = np.ones(m)
    basis_kind = [("p", j) for j in range(m)]
    for j in range(m):
        a = np.zeros(m)
        a[j] = L // s[j]
        cols.append(a)
    best = float(d @ s) / L
    t0 = time.perf_counter()
    optimal = False
    it = 0
    for it in range(max_iters):
        y = cb @ binv
        neg = np.flatnonzero(y < -1e-9)
        if len(neg):
            j = int(neg[np.argmin(y[neg])])
            a = np.zeros(m)
            a[j] = -1.0
            kind, cost = ("s", j), 0.0
        else:
            val, pat = _knapsack(s, y, ub, L)
            best = max(best, float(d @ y) / max(val, 1.0))
            if val <= 1.0 + 1e-9:
                optimal = True
                break
            a = pat.astype(float)
            kind, cost = ("p", len(cols)), 1.0
            cols.append(a)
        if time.perf_counter() - t0 > time_limit:
            break
        u_dir = binv @ a
        pos = np.flatnonzero(u_dir > 1e-9)
        if not len(pos):
            break  # unbounded direction cannot happen for a covering LP; stop safely
        ratios = xb[pos] / u_dir[pos]
        r = int(pos[np.argmin(ratios)])
        theta = float(xb[r] / u_dir[r])
        xb = xb - theta * u_dir
        xb[r] = theta
        xb = np.maximum(xb, 0.0)
        piv = binv[r] / u_dir[r]
        binv = binv - np.outer(u_dir, piv)
        binv[r] = piv
        cb[r] = cost
        basis_kind[r] = kind
    lp = float(cb @ xb)
    if optimal:
        best = max(best, float(d @ np.maximum(cb @ binv, 0)))
    bound = math.ceil(best - 1e-6)
    return {"bound": int(bound), "lp": lp, "farley": best, "iters": it + 1, "classes": m, "optimal": optimal,
            "seconds": time.perf_counter() - t0}


def best_lower_bound(lengths, capacity: int, tiles=None, lp: bool = True, **lp_kw) -> dict:
    """All bounds and their max. `tiles` is unused by the length bounds (floor_bound captures the
    tile structure of VLM lengths); it is accepted for callers that have it."""
    out = {"volume": volume_bound(lengths, capacity), "l2": l2_bound(lengths, capacity)}
    out["floor"], out["floor_qs"] = floor_bound(lengths, capacity)
    if lp:
        r = lp_bound(lengths, capacity, **lp_kw)
        out["lp"] = r["bound"]
        out["lp_info"] = r
    out["best"] = max(v for k, v in out.items() if k in ("volume", "l2", "floor", "lp"))
    return out
