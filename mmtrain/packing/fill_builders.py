"""The fill builders behind the default packer: each builds one pack pattern (a multiset of
(length, tiles) keys) for the largest remaining sample, repeated while the counts allow.

`best_packing` runs builders and keeps the packing with fewest packs; `pack_small` is the
buffer-size path (the cheap builders), run by the optional C extension `_fastpack` when it is
built (byte-identical, tests/unit/packing/test_fastpack.py) and by pure Python otherwise;
`exact_small` solves tiny inputs optimally.
"""

from __future__ import annotations

import bisect

import numpy as np

from mmtrain.packing.common import NO_TILE_LIMIT, KeyPool, Packs

try:  # optional compiled twin of `pack_small` (mmtrain/packing/_fastpack.c)
    from mmtrain.packing import _fastpack
except ImportError:  # not built (e.g. no compiler): the identical pure-Python path is used
    _fastpack = None


def _best_pair(pool: KeyPool, r: int, tb: int, used: dict, vmin: int, tries: int = 48):
    """Best 1- or 2-item completion of residual r: returns (residual, keys). Early exit on 0."""
    tm = pool.tmul
    best_res, best = r, ()
    a = pool.largest_upto(r, tb, used=used)
    if a >= 0:
        best_res, best = r - a // tm, (a,)
        if best_res == 0:
            return 0, best
    # pairs a >= b: a from the largest <= r - vmin downwards, stop when 2a cannot beat best
    a = pool.largest_upto(r - vmin, tb, used=used)
    while a >= 0 and tries > 0 and 2 * (a // tm) > r - best_res:
        tries -= 1
        la = a // tm
        used[a] = used.get(a, 0) + 1
        b = pool.largest_upto(min(r - la, la), tb - a % tm, below=a + 1, used=used)
        used[a] -= 1
        if b >= 0:
            res = r - la - b // tm
            if res < best_res:
                best_res, best = res, (a, b)
                if res == 0:
                    break
        a = pool.largest_upto(la, tb, below=a, used=used)
    return best_res, best


def _vmin(pool: KeyPool, used: dict) -> int:
    for k in pool.keys:
        if pool.cnt[k] > used.get(k, 0):
            return k // pool.tmul
    return 1 << 62


def _nearest(pool: KeyPool, target: float, hi: int, tb: int, used: dict, limit: int = 64):
    """Alive keys by distance of their length to `target` (length <= hi, tiles <= tb), nearest first."""
    tm = pool.tmul
    keys = pool.keys
    j = bisect.bisect_left(keys, int(target) * tm)
    lo_i, hi_i = j - 1, j
    top = bisect.bisect_right(keys, hi * tm + tm - 1)
    hi_i = min(hi_i, top)
    while (lo_i >= 0 or hi_i < top) and limit > 0:
        if hi_i < top and (lo_i < 0 or keys[hi_i] // tm - target <= target - keys[lo_i] // tm):
            k = keys[hi_i]
            hi_i += 1
        else:
            k = keys[lo_i]
            lo_i -= 1
        if k % tm <= tb and pool.cnt[k] > used.get(k, 0):
            limit -= 1
            yield k


def _add(used: dict, keys) -> None:
    for k in keys:
        used[k] = used.get(k, 0) + 1


class _Search:
    """Bounded depth-first subset-sum search for one pack: items largest-first (non-increasing
    keys, so each multiset is visited once), an exact 1-2 item completion tried at every node,
    `branch` alternatives per level and `budget` nodes in all; stops at the first exact fill."""

    def __init__(self, pool: KeyPool, used: dict, branch: int, budget: int):
        self.pool, self.used, self.branch, self.budget = pool, used, branch, budget
        self.best_res = 1 << 62
        self.best: list[int] = []

    def run(self, r: int, tb: int, maxkey: int, path: list[int]) -> None:
        pool, used = self.pool, self.used
        self.budget -= 1
        vmin = _vmin(pool, used)
        res, keys = (r, ()) if r < vmin else _best_pair(pool, r, tb, used, vmin, tries=24)
        if res < self.best_res:
            self.best_res, self.best = res, path + list(keys)
        if res == 0 or r < 3 * vmin:
            return
        tm = pool.tmul
        x = pool.largest_upto(r - vmin, tb, below=maxkey + 1, used=used)
        for _ in range(self.branch):
            if x < 0 or self.budget <= 0 or self.best_res == 0:
                return
            used[x] = used.get(x, 0) + 1
            path.append(x)
            self.run(r - x // tm, tb - x % tm, x, path)
            path.pop()
            used[x] -= 1
            x = pool.largest_upto(x // tm, tb, below=x, used=used)


def _build_greedy_pattern(pool: KeyPool, capacity: int, tb_max: int, lookahead: int = 8) -> dict[int, int]:
    """One pack: the largest key, then largest-first fill that never leaves an unfillable gap,
    finishing with the best 1-2 item completion (`lookahead` candidates for the last greedy
    item, i.e. a bounded triple search)."""
    top = pool.keys[-1]
    used = {top: 1}
    r, tb = capacity - pool.length(top), tb_max - pool.tiles(top)
    tm = pool.tmul
    while True:
        vmin = _vmin(pool, used)
        if r < vmin:
            return used
        if r < 3 * vmin:
            _add(used, _best_pair(pool, r, tb, used, vmin)[1])
            return used
        res2, keys2 = _best_pair(pool, r, tb, used, vmin, tries=8)
        if res2 == 0:
            _add(used, keys2)
            return used
        x = pool.largest_upto(r - vmin, tb, used=used)
        if x < 0:
            _add(used, _best_pair(pool, r, tb, used, vmin)[1])
            return used
        if r - x // tm >= 3 * vmin:
            used[x] = used.get(x, 0) + 1
            r -= x // tm
            tb -= x % tm
            continue
        best = (res2, keys2)
        cand = x
        for _ in range(lookahead):
            if cand < 0:
                break
            lc = cand // tm
            used[cand] = used.get(cand, 0) + 1
            res, keys = _best_pair(pool, r - lc, tb - cand % tm, used, vmin)
            used[cand] -= 1
            if res < best[0]:
                best = (res, (cand,) + tuple(keys))
                if res == 0:
                    break
            cand = pool.largest_upto(lc, tb, below=cand, used=used)
        _add(used, best[1])
        return used


def _build_search_pattern(pool: KeyPool, capacity: int, tb_max: int, branch: int = 3, budget: int = 48) -> dict[int, int]:
    """One pack as a multiset of keys: the largest remaining key plus the best fill found by a
    bounded subset-sum search over the remaining keys (largest items preferred)."""
    top = pool.keys[-1]
    used = {top: 1}
    search = _Search(pool, used, branch, budget)
    search.run(capacity - pool.length(top), tb_max - pool.tiles(top), top, [])
    for k in search.best:
        used[k] = used.get(k, 0) + 1
    return used


def packs_with(builder, pool: KeyPool, capacity: int, tb_max: int) -> tuple[int, list]:
    """Build a pattern (multiset of keys) for the largest remaining item and repeat it as many
    times as the counts allow: O(patterns) builder calls, not O(items). Counts only: returns
    (number of packs, [(reps, [(key, start, m), ...])]); `materialize` turns it into packs."""
    npacks = 0
    packing: list = []
    while pool.keys:
        pat = builder(pool, capacity, tb_max)
        cnt = pool.cnt
        reps = min(cnt[k] // m for k, m in pat.items() if m > 0)
        packing.append((reps, [(k, pool.consume(k, reps * m), m) for k, m in sorted(pat.items(), reverse=True) if m > 0]))
        npacks += reps
    return npacks, packing


def materialize(order: np.ndarray, packing: list) -> Packs:
    packs: Packs = []
    # Buffer-size inputs (most patterns used once): list slices, much cheaper than one numpy slice
    # per column. Large inputs (few patterns, large reps): numpy blocks, no full tolist().
    ol = order.tolist() if len(order) <= 50_000 else None
    for reps, cols in packing:
        if reps == 1 and ol is None:
            packs.append([i for k, p, m in cols for i in order[p : p + m].tolist()])
            continue
        if reps == 1:
            if len(cols) == 1:
                k, p, m = cols[0]
                packs.append(ol[p : p + m])
            else:
                pk: list[int] = []
                for k, p, m in cols:
                    pk += ol[p : p + m]
                packs.append(pk)
            continue
        blocks = [order[p : p + reps * m].reshape(reps, m) for k, p, m in cols]
        packs.extend((blocks[0] if len(blocks) == 1 else np.concatenate(blocks, axis=1)).tolist())
    return packs


def fill_with(builder, lengths: np.ndarray, capacity: int, tiles, tb_max: int) -> Packs:
    pool = KeyPool(lengths, tiles)
    return materialize(pool.order, packs_with(builder, pool, capacity, tb_max)[1])


def _build_largest_fits(pool: KeyPool, capacity: int, tb_max: int) -> dict[int, int]:
    """greedy_knapsack's pack as a pattern: repeating it while counts allow gives exactly the
    packs greedy_knapsack would build one by one (its choices only depend on which keys fit)."""
    tm = pool.tmul
    top = pool.keys[-1]
    used = {top: 1}
    r, tb = capacity - top // tm, tb_max - top % tm
    while True:
        k = pool.largest_upto(r, tb, used=used)
        if k < 0:
            return used
        used[k] = used.get(k, 0) + 1
        r -= k // tm
        tb -= k % tm


def _build_dp_pattern(pool: KeyPool, capacity: int, tb_max: int, maxk: int = 256, prefer_small: bool = False) -> dict[int, int]:
    """MBS'-style pack: the largest remaining key plus the subset of the remaining keys with the
    least slack, found exactly by a subset-sum DP over counts (bounded, binary-split multiplicities)
    on a Python-int bitset of reachable sums. Backtracking takes the largest keys first, so small
    items are kept for later completions. At most `maxk` distinct keys take part (the smallest
    quarter and the largest rest). If the result breaks the tile limit the greedy builder is used."""
    tm = pool.tmul
    keys = pool.keys
    top = keys[-1]
    used = {top: 1}
    r = capacity - top // tm
    # Memo per residual: counts only decrease, so a cached optimum that is still available is
    # still optimal (up to the maxk window); the same residual recurs constantly.
    memo = pool.memo.setdefault(("dp", maxk, prefer_small), {})
    hit = memo.get(r)
    if hit is not None:
        cnt = pool.cnt
        if all(cnt.get(k, 0) - (k == top) >= m for k, m in hit):
            for k, m in hit:
                used[k] = used.get(k, 0) + m
            if tb_max < NO_TILE_LIMIT and sum((k % tm) * m for k, m in used.items()) > tb_max:
                return _build_greedy_pattern(pool, capacity, tb_max)
            return used
    hi = bisect.bisect_right(keys, r * tm + tm - 1)
    cand = keys[:hi]
    if len(cand) > maxk:
        cand = cand[: maxk // 4] + cand[len(cand) - (maxk - maxk // 4):]
    full = (1 << (r + 1)) - 1
    reach = 1
    items: list[tuple[int, int, int]] = []
    masks: list[int] = []
    for k in cand:
        ln = k // tm
        avail = pool.cnt[k] - used.get(k, 0)
        nmax = min(avail, r // ln) if ln else avail
        m = 1
        while nmax > 0:
            t = min(m, nmax)
            w = ln * t
            reach = (reach | (reach << w)) & full
            items.append((k, t, w))
            masks.append(reach)
            nmax -= t
            m *= 2
    tgt = reach.bit_length() - 1
    sub: dict[int, int] = {}
    for idx in range(len(items) - 1, -1, -1):
        k, t, w = items[idx]
        prev = masks[idx - 1] if idx else 1
        if prefer_small:  # use an item only when the smaller ones cannot reach tgt without it
            take = not (prev >> tgt) & 1
        else:
            take = tgt >= w and (prev >> (tgt - w)) & 1
        if take:
            sub[k] = sub.get(k, 0) + t
            tgt -= w
    memo[r] = tuple(sub.items())
    for k, m in sub.items():
        used[k] = used.get(k, 0) + m
    if tb_max < NO_TILE_LIMIT and sum((k % tm) * m for k, m in used.items()) > tb_max:
        return _build_greedy_pattern(pool, capacity, tb_max)
    return used


def _build_dp_pattern_small_first(pool: KeyPool, capacity: int, tb_max: int) -> dict[int, int]:
    """The min-slack DP, but the backtracking takes the smallest keys that reach the best sum:
    the largest item is completed with small ones, so large and small items mix (e.g. chartqa,
    where six 5-tile samples fit only if their texts average <= 85 tokens)."""
    return _build_dp_pattern(pool, capacity, tb_max, prefer_small=True)


FULL_BUILDERS = (_build_dp_pattern, _build_greedy_pattern, _build_search_pattern, _build_dp_pattern_small_first)
def _build_dp_small(pool: KeyPool, capacity: int, tb_max: int) -> dict[int, int]:
    return _build_dp_pattern(pool, capacity, tb_max, maxk=16, prefer_small=True)


SMALL_BUILDERS = (_build_greedy_pattern, _build_dp_small)  # buffers: cheap builders only
SMALL_PACKING_BUILDERS = SMALL_BUILDERS + (_build_largest_fits,)
FAST_MAX_CAPACITY = 1 << 20  # the C DP keeps a memo slot per residual (capacity + 1 of them)


def fast_ok(capacity: int, pool: KeyPool) -> bool:
    return _fastpack is not None and capacity <= FAST_MAX_CAPACITY and pool.tmul <= (1 << 20)


def pack_small(base: KeyPool, capacity: int, tb_max: int, use_extension: bool = True) -> tuple[int, list]:
    """The buffer-size packing (SMALL_PACKING_BUILDERS): C extension when built, else pure Python."""
    if use_extension and fast_ok(capacity, base):
        return _fastpack.pack_small(base.keys, [base.cnt[k] for k in base.keys],
                                    [base.ptr[k] for k in base.keys], capacity, tb_max, base.tmul)
    return best_packing(SMALL_PACKING_BUILDERS, base, capacity, tb_max)


def best_packing(builders, base: KeyPool, capacity: int, tb_max: int) -> tuple[int, list]:
    """Pure-Python: the packing with fewest packs over `builders` (ties: earlier builder)."""
    best = None
    for builder in builders:
        cnt, packing = packs_with(builder, base.clone(), capacity, tb_max)
        if best is None or cnt < best[0]:
            best = (cnt, packing)
    return best


def exact_small(lengths, capacity, tiles=None, max_tiles_per_pack=None, seed=0) -> Packs:
    """Optimal packing of tiny inputs (n <= ~12) by DP over subsets: f(S) = 1 + min f(S \\ T) over
    feasible packs T holding the lowest item of S. Used by `fill` up to FillOptions.exact_max_items."""
    n = len(lengths)
    if n == 0:
        return []
    lens = [int(x) for x in lengths]
    tl = [int(x) for x in tiles] if tiles is not None else [0] * n
    tmax = NO_TILE_LIMIT if max_tiles_per_pack is None else max_tiles_per_pack
    full = (1 << n) - 1
    tok = [0] * (1 << n)
    til = [0] * (1 << n)
    for m in range(1, 1 << n):
        low = (m & -m).bit_length() - 1
        tok[m] = tok[m & (m - 1)] + lens[low]
        til[m] = til[m & (m - 1)] + tl[low]
    feasible = [tok[m] <= capacity and til[m] <= tmax for m in range(1 << n)]
    best = [0] * (1 << n)
    choice = [0] * (1 << n)
    for s in range(1, 1 << n):
        low = s & -s
        rest = s ^ low
        bv, bc = n + 1, 0
        sub = rest
        while True:  # subsets T = low | sub of s
            t = low | sub
            if feasible[t] and best[s ^ t] + 1 < bv:
                bv, bc = best[s ^ t] + 1, t
            if sub == 0:
                break
            sub = (sub - 1) & rest
        best[s], choice[s] = bv, bc
    packs: Packs = []
    s = full
    while s:
        t = choice[s]
        packs.append([i for i in range(n) if t >> i & 1])
        s ^= t
    return packs
