"""Packing algorithms behind one interface: lengths (and optional tiles) in, packs out.

Every algorithm is a pure function of integer arrays. Lengths are integers in a small range
(<= capacity), so all of them group samples by (length, tiles) key and work on counts: a
query "largest available length <= r" is a bisect over the distinct keys, never a scan of items.

`pack_lengths` applies alignment (segment padding, pack capacity rounding) and validation, then
dispatches to the registry. Oversize policies live in `mmtrain.packing.policy`.
"""

from __future__ import annotations

import bisect
from typing import Callable

import numpy as np

try:  # optional compiled twin of the buffer-size path of `fill` (mmtrain/packing/_fastpack.c)
    from mmtrain.packing import _fastpack
except ImportError:  # not built (e.g. no compiler): the identical pure-Python path is used
    _fastpack = None

Packs = list[list[int]]
# fn(lengths, capacity, tiles, max_tiles, seed) -> packs; lengths already padded and validated.
Algorithm = Callable[[np.ndarray, int, np.ndarray | None, int | None, int], Packs]

_NO_TILE_LIMIT = 1 << 62
EXACT_MAX_ITEMS = 10  # "fill" solves inputs this small exactly (subset DP).


# ----------------------------------------------------------------------------------------------
# Shared: distinct keys with counts and per-key pools of sample indices (stable: original order).
# ----------------------------------------------------------------------------------------------
class _KeyPool:
    """Samples grouped by (length, tiles), keys sorted ascending by length then tiles."""

    def __init__(self, lengths: np.ndarray, tiles: np.ndarray | None):
        self.tmul = int(tiles.max()) + 1 if tiles is not None and len(tiles) else 1
        keys = lengths.astype(np.int64) * self.tmul
        if tiles is not None:
            keys = keys + tiles.astype(np.int64)
        self.order = np.argsort(keys, kind="stable")
        ukeys, starts, counts = np.unique(keys[self.order], return_index=True, return_counts=True)
        self.keys: list[int] = ukeys.tolist()  # alive keys only (mutated)
        self.cnt: dict[int, int] = dict(zip(self.keys, counts.tolist()))
        self.ptr: dict[int, int] = dict(zip(self.keys, starts.tolist()))
        self.memo: dict = {}  # builder caches (valid while counts only decrease)

    def clone(self) -> "_KeyPool":
        """Fresh mutable state over the same sorted samples (no re-sort)."""
        c = object.__new__(_KeyPool)
        c.tmul, c.order = self.tmul, self.order
        c.keys, c.cnt, c.ptr, c.memo = list(self.keys), dict(self.cnt), dict(self.ptr), {}
        return c

    def consume(self, key: int, k: int) -> int:
        """Like take() but returns the start offset into `order` (no array slicing)."""
        p = self.ptr[key]
        self.ptr[key] = p + k
        c = self.cnt[key] - k
        self.cnt[key] = c
        if c == 0:
            del self.keys[bisect.bisect_left(self.keys, key)]
        return p

    def length(self, key: int) -> int:
        return key // self.tmul

    def tiles(self, key: int) -> int:
        return key % self.tmul

    def take(self, key: int, k: int = 1) -> np.ndarray:
        """Pop k sample indices of `key` (front of its pool, so original order is kept)."""
        p = self.consume(key, k)
        return self.order[p : p + k]

    def largest_upto(self, r: int, tb: int, below: int | None = None, used: dict | None = None) -> int:
        """Largest alive key with length <= r and tiles <= tb (and key < below); -1 if none."""
        i = bisect.bisect_right(self.keys, r * self.tmul + self.tmul - 1) - 1
        if below is not None:
            i = min(i, bisect.bisect_left(self.keys, below) - 1)
        tm = self.tmul
        while i >= 0:
            k = self.keys[i]
            if k % tm <= tb and (used is None or self.cnt[k] > used.get(k, 0)):
                return k
            i -= 1
        return -1


# ----------------------------------------------------------------------------------------------
# Baselines
# ----------------------------------------------------------------------------------------------
def greedy_knapsack(lengths, capacity, tiles=None, max_tiles=None, seed=0) -> Packs:
    """Megatron-LM's buffer packer: sort ascending, fill the current pack with the largest item
    that still fits, open a new pack when nothing fits. Kept as the baseline."""
    tb_max = _NO_TILE_LIMIT if max_tiles is None else max_tiles
    pool = _KeyPool(lengths, tiles)
    packs: Packs = []
    while pool.keys:
        r, tb, cur = capacity, tb_max, []
        while True:
            k = pool.largest_upto(r, tb)
            if k < 0:
                break
            cur.append(int(pool.take(k)[0]))
            r -= pool.length(k)
            tb -= pool.tiles(k)
        packs.append(cur)
    return packs


class _MaxTree:
    """Segment tree over bins holding max residual length (and tiles); unused bins are full."""

    def __init__(self, nbins: int, capacity: int, max_tiles: int):
        size = 1
        while size < max(nbins, 1):
            size *= 2
        self.size = size
        self.r = [capacity] * (2 * size)
        self.t = [max_tiles] * (2 * size)

    def first_fit(self, need: int, tneed: int) -> int:
        r, t = self.r, self.t
        if r[1] < need or t[1] < tneed:
            return -1
        stack = [1]
        while stack:  # DFS leftmost; with tiles the two maxima may sit in different bins
            node = stack.pop()
            if r[node] < need or t[node] < tneed:
                continue
            if node >= self.size:
                return node - self.size
            stack.append(2 * node + 1)
            stack.append(2 * node)
        return -1

    def update(self, leaf: int, rv: int, tv: int) -> None:
        r, t = self.r, self.t
        node = leaf + self.size
        r[node], t[node] = rv, tv
        node //= 2
        while node:
            a, b = 2 * node, 2 * node + 1
            r[node] = r[a] if r[a] > r[b] else r[b]
            t[node] = t[a] if t[a] > t[b] else t[b]
            node //= 2


def _decreasing(lengths: np.ndarray, tiles: np.ndarray | None) -> np.ndarray:
    key = lengths.astype(np.int64) * (int(tiles.max()) + 1 if tiles is not None else 1)
    if tiles is not None:
        key = key + tiles
    return np.argsort(-key, kind="stable")


def ffd(lengths, capacity, tiles=None, max_tiles=None, seed=0) -> Packs:
    """First-fit decreasing over the whole input (segment tree over bins: O(n log n))."""
    n = len(lengths)
    tmax = _NO_TILE_LIMIT if max_tiles is None else max_tiles
    tree = _MaxTree(n, capacity, tmax)
    packs: Packs = []
    lens = lengths.tolist()
    tl = tiles.tolist() if tiles is not None else None
    res_r: list[int] = []
    res_t: list[int] = []
    for i in _decreasing(lengths, tiles).tolist():
        li, ti = lens[i], (tl[i] if tl is not None else 0)
        b = tree.first_fit(li, ti)
        if b == len(packs):
            packs.append([])
            res_r.append(capacity)
            res_t.append(tmax)
        packs[b].append(i)
        res_r[b] -= li
        res_t[b] -= ti
        tree.update(b, res_r[b], res_t[b])
    return packs


def bfd(lengths, capacity, tiles=None, max_tiles=None, seed=0) -> Packs:
    """Best-fit decreasing: put each item (largest first) into the open pack with the least room
    that still fits. Open packs are bucketed by residual (integers <= capacity): O(n log C)."""
    tmax = _NO_TILE_LIMIT if max_tiles is None else max_tiles
    residuals: list[int] = []  # sorted distinct residuals that have open packs
    buckets: dict[int, list[int]] = {}
    packs: Packs = []
    res_t: list[int] = []
    lens = lengths.tolist()
    tl = tiles.tolist() if tiles is not None else None
    for i in _decreasing(lengths, tiles).tolist():
        li, ti = lens[i], (tl[i] if tl is not None else 0)
        b = -1
        j = bisect.bisect_left(residuals, li)
        while j < len(residuals) and b < 0:
            bucket = buckets[residuals[j]]
            for pos in range(len(bucket) - 1, -1, -1):
                if res_t[bucket[pos]] >= ti:
                    b = bucket.pop(pos)
                    break
            if not bucket:
                del buckets[residuals[j]]
                del residuals[j]
            elif b < 0:
                j += 1
        if b < 0:
            b = len(packs)
            packs.append([])
            res_t.append(tmax)
            r = capacity
        else:
            r = _residual_of(packs[b], lens, capacity)
        packs[b].append(i)
        res_t[b] -= ti
        r -= li
        if r not in buckets:
            buckets[r] = []
            bisect.insort(residuals, r)
        buckets[r].append(b)
    return packs


def _residual_of(pack: list[int], lens: list[int], capacity: int) -> int:
    return capacity - sum(lens[i] for i in pack)


# ----------------------------------------------------------------------------------------------
# Default: pattern fill (largest-first fill + exact pair completion with lookahead, by counts)
# ----------------------------------------------------------------------------------------------
def _best_pair(pool: _KeyPool, r: int, tb: int, used: dict, vmin: int, tries: int = 48):
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


def _vmin(pool: _KeyPool, used: dict) -> int:
    for k in pool.keys:
        if pool.cnt[k] > used.get(k, 0):
            return k // pool.tmul
    return 1 << 62


def _nearest(pool: _KeyPool, target: float, hi: int, tb: int, used: dict, limit: int = 64):
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

    def __init__(self, pool: _KeyPool, used: dict, branch: int, budget: int):
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


def _build_greedy_pattern(pool: _KeyPool, capacity: int, tb_max: int, lookahead: int = 8) -> dict[int, int]:
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


def _add(used: dict, keys) -> None:
    for k in keys:
        used[k] = used.get(k, 0) + 1


def _build_search_pattern(pool: _KeyPool, capacity: int, tb_max: int, branch: int = 3, budget: int = 48) -> dict[int, int]:
    """One pack as a multiset of keys: the largest remaining key plus the best fill found by a
    bounded subset-sum search over the remaining keys (largest items preferred)."""
    top = pool.keys[-1]
    used = {top: 1}
    search = _Search(pool, used, branch, budget)
    search.run(capacity - pool.length(top), tb_max - pool.tiles(top), top, [])
    for k in search.best:
        used[k] = used.get(k, 0) + 1
    return used


def _plan_with(builder, pool: _KeyPool, capacity: int, tb_max: int) -> tuple[int, list]:
    """Build a pattern (multiset of keys) for the largest remaining item and repeat it as many
    times as the counts allow: O(patterns) builder calls, not O(items). Counts only: returns
    (number of packs, [(reps, [(key, start, m), ...])]); `_materialize` turns it into packs."""
    npacks = 0
    plan: list = []
    while pool.keys:
        pat = builder(pool, capacity, tb_max)
        cnt = pool.cnt
        reps = min(cnt[k] // m for k, m in pat.items() if m > 0)
        plan.append((reps, [(k, pool.consume(k, reps * m), m) for k, m in sorted(pat.items(), reverse=True) if m > 0]))
        npacks += reps
    return npacks, plan


def _materialize(order: np.ndarray, plan: list) -> Packs:
    packs: Packs = []
    # Buffer-size inputs (most patterns used once): list slices, much cheaper than one numpy slice
    # per column. Large inputs (few patterns, large reps): numpy blocks, no full tolist().
    ol = order.tolist() if len(order) <= 50_000 else None
    for reps, cols in plan:
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


def _fill_with(builder, lengths: np.ndarray, capacity: int, tiles, tb_max: int) -> Packs:
    pool = _KeyPool(lengths, tiles)
    return _materialize(pool.order, _plan_with(builder, pool, capacity, tb_max)[1])


def _build_largest_fits(pool: _KeyPool, capacity: int, tb_max: int) -> dict[int, int]:
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


def _build_dp_pattern(pool: _KeyPool, capacity: int, tb_max: int, maxk: int = 256, prefer_small: bool = False) -> dict[int, int]:
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
            if tb_max < _NO_TILE_LIMIT and sum((k % tm) * m for k, m in used.items()) > tb_max:
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
    if tb_max < _NO_TILE_LIMIT and sum((k % tm) * m for k, m in used.items()) > tb_max:
        return _build_greedy_pattern(pool, capacity, tb_max)
    return used


def _build_dp_pattern_small_first(pool: _KeyPool, capacity: int, tb_max: int) -> dict[int, int]:
    """The min-slack DP, but the backtracking takes the smallest keys that reach the best sum:
    the largest item is completed with small ones, so large and small items mix (e.g. chartqa,
    where six 5-tile samples fit only if their texts average <= 85 tokens)."""
    return _build_dp_pattern(pool, capacity, tb_max, prefer_small=True)


FILL_BUILDERS = (_build_dp_pattern, _build_greedy_pattern, _build_search_pattern, _build_dp_pattern_small_first)
def _build_dp_small(pool: _KeyPool, capacity: int, tb_max: int) -> dict[int, int]:
    return _build_dp_pattern(pool, capacity, tb_max, maxk=16, prefer_small=True)


SMALL_BUILDERS = (_build_greedy_pattern, _build_dp_small)  # buffers: cheap builders only
SEARCH_MIN_ITEMS = 5000  # below this (online buffers) only SMALL_BUILDERS run
# Offline inputs up to this size also try buffered-with-carry plans (the buffers mix sizes and the
# carried under-filled packs are re-packed with fresh samples; on e.g. docvqa that beats the
# global largest-first plan). Costs about n / 50k seconds per buffer size, hence the cap.
OFFLINE_BUFFERED_MAX_ITEMS = 250_000
# The small-first DP only pays off when few distinct (length, tiles) keys make the tie-breaking
# between equal-slack fills matter (real VLM tables: 300-1300 keys; it moved chartqa 2958 -> 2927
# packs). With many distinct lengths exact fills abound (synthetic, 2260 keys: 34000 vs 34001
# packs) and it would cost ~0.65 s per 1M samples, so it is skipped there.
SMALL_FIRST_MAX_KEYS = 1500
OFFLINE_BUFFERS = (1000, 2000)
# Offline inputs up to REPAIR_MAX_ITEMS get the local-search repair (mmtrain.packing.repair.
# repair_packs) on the final plan: the k <= REPAIR_MAX_K least-full packs are re-packed into k-1
# after exchanges with the other packs; only strict pack-count reductions are kept. REPAIR_WORK
# bounds the operations (deterministic, not a clock).
REPAIR = True
REPAIR_MAX_ITEMS = 300_000
REPAIR_MAX_K = 6
REPAIR_WORK = 1_000_000
LNS_SIZES = (250, 300, 350, 400, 500)  # pool sizes (packs) of the offline LNS step, see _lns
LNS_WORK = 2_000_000  # top_up operations per LNS step


def fill(lengths, capacity, tiles=None, max_tiles=None, seed=0) -> Packs:
    """Default packer ("best fit with completion"): each pack is the largest remaining item plus
    a fill chosen over the remaining (length, tiles) keys. Pattern builders: minimum-slack
    subset-sum DP (`_build_dp_pattern`), largest-first greedy with a bounded triple search, and a
    bounded DFS; inputs of at least SEARCH_MIN_ITEMS samples run all three (DP over up to 256
    keys), smaller inputs (online buffers) the greedy and a 16-key small-first DP. As a safety net
    the count-based largest-fits greedy (exactly the greedy_knapsack plan) also runs; the plan with fewest packs is kept (ties: earlier
    builder). Plans are built on counts and only the winner is turned into index lists. Inputs
    of at most EXACT_MAX_ITEMS samples are solved optimally. The buffer-size path (SMALL_BUILDERS
    + largest-fits) runs in the optional C extension `_fastpack` when it is built: same steps,
    byte-identical plans (tests/unit/packing/test_fastpack.py), ~7x faster online. Offline inputs of
    SEARCH_MIN_ITEMS..REPAIR_MAX_ITEMS samples finish with the local-search repair
    (`repair.repair_packs`, pure Python after either path, strict pack-count reductions only)."""
    n = len(lengths)
    if n == 0:
        return []
    if n <= EXACT_MAX_ITEMS:
        return exact_small(lengths, capacity, tiles, max_tiles, seed)
    tb_max = _NO_TILE_LIMIT if max_tiles is None else max_tiles
    base = _KeyPool(lengths, tiles)
    builders = (FILL_BUILDERS if n >= SEARCH_MIN_ITEMS else SMALL_BUILDERS) + (_build_largest_fits,)
    if len(base.keys) > SMALL_FIRST_MAX_KEYS:
        builders = tuple(b for b in builders if b is not _build_dp_pattern_small_first)
    if builders == _SMALL_PLAN_BUILDERS:
        best = _plan_small(base, capacity, tb_max)
    else:
        best = _best_plan(builders, base, capacity, tb_max)
    packs = _materialize(base.order, best[1])
    if SEARCH_MIN_ITEMS <= n <= OFFLINE_BUFFERED_MAX_ITEMS:
        from mmtrain.packing.policy import plan_packs  # policy imports this module

        for b in OFFLINE_BUFFERS:
            if b >= n or b >= SEARCH_MIN_ITEMS:
                continue
            r = plan_packs(lengths, capacity, algorithm="fill", buffer_size=b, tiles=tiles,
                           max_tiles_per_pack=max_tiles, seed=seed, carry_over=True)
            if len(r.packs) < len(packs):
                packs = r.packs
    if REPAIR and SEARCH_MIN_ITEMS <= n <= REPAIR_MAX_ITEMS:
        from mmtrain.packing.repair import repair_packs

        ll = lengths.tolist()
        tl = None if tiles is None else tiles.tolist()
        packs = _lns(packs, lengths, ll, capacity, tiles, tl, max_tiles, tb_max, len(base.keys) <= SMALL_FIRST_MAX_KEYS)
        packs = repair_packs(packs, ll, capacity, tl, max_tiles, max_k=REPAIR_MAX_K, work=REPAIR_WORK)
    return packs


def _lns(packs: Packs, lengths: np.ndarray, ll: list, capacity: int, tiles, tl, max_tiles, tb_max: int,
         full: bool) -> Packs:
    """Offline large-neighbourhood step: for R in LNS_SIZES, the R packs with the most items (small
    items, the flexible part of the plan; ties: earlier pack) become a pool; the other packs take
    pool items by exchanges that raise their tokens (`repair.top_up`), then the pool is re-packed
    with the full builders (`full`: inputs with few distinct keys; else the buffer path). Kept only when the plan gets fewer packs; stops at the first size that
    does not help. E.g. chartqa: the six-5-tile packs take the long-text 5-tile samples of the
    mixed packs, and the mixed packs are re-packed around the short-text ones."""
    from mmtrain.packing.repair import top_up

    builders = FILL_BUILDERS + (_build_largest_fits,)
    for size in LNS_SIZES:
        if size >= len(packs):
            break
        order = sorted(range(len(packs)), key=lambda j: (-len(packs[j]), j))
        pool_ids = set(order[:size])
        held = [i for j in sorted(pool_ids) for i in packs[j]]
        others = [packs[j] for j in range(len(packs)) if j not in pool_ids]
        others, held = top_up(others, held, ll, capacity, tl, max_tiles, work=LNS_WORK, pair_max=0)
        idx = np.asarray(sorted(held), dtype=np.int64)
        sub = _KeyPool(lengths[idx], None if tiles is None else tiles[idx])
        if full:  # few distinct keys in the input (real VLM tables): the full builders
            best = _best_plan(builders, sub, capacity, tb_max)
        else:  # many keys (exact fills abound; the 256-key DP would be slow): the buffer path
            best = _plan_small(sub, capacity, tb_max)
        refill = _materialize(sub.order, best[1])
        if len(others) + len(refill) >= len(packs):
            break
        packs = others + [idx[p].tolist() for p in refill]
    return packs


_SMALL_PLAN_BUILDERS = SMALL_BUILDERS + (_build_largest_fits,)
FAST_MAX_CAPACITY = 1 << 20  # the C DP keeps a memo slot per residual (capacity + 1 of them)


def _fast_ok(capacity: int, pool: _KeyPool) -> bool:
    return _fastpack is not None and capacity <= FAST_MAX_CAPACITY and pool.tmul <= (1 << 20)


def _plan_small(base: _KeyPool, capacity: int, tb_max: int) -> tuple[int, list]:
    """The buffer-size plan (_SMALL_PLAN_BUILDERS): C extension when built, else pure Python."""
    if _fast_ok(capacity, base):
        return _fastpack.plan_small(base.keys, [base.cnt[k] for k in base.keys],
                                    [base.ptr[k] for k in base.keys], capacity, tb_max, base.tmul)
    return _best_plan(_SMALL_PLAN_BUILDERS, base, capacity, tb_max)


def _best_plan(builders, base: _KeyPool, capacity: int, tb_max: int) -> tuple[int, list]:
    """Pure-Python: the plan with fewest packs over `builders` (ties: earlier builder)."""
    best = None
    for builder in builders:
        cnt, plan = _plan_with(builder, base.clone(), capacity, tb_max)
        if best is None or cnt < best[0]:
            best = (cnt, plan)
    return best


def exact_small(lengths, capacity, tiles=None, max_tiles=None, seed=0) -> Packs:
    """Optimal packing of tiny inputs (n <= ~12) by DP over subsets: f(S) = 1 + min f(S \\ T) over
    feasible packs T holding the lowest item of S. Used by `fill` below EXACT_MAX_ITEMS."""
    n = len(lengths)
    if n == 0:
        return []
    lens = [int(x) for x in lengths]
    tl = [int(x) for x in tiles] if tiles is not None else [0] * n
    tmax = _NO_TILE_LIMIT if max_tiles is None else max_tiles
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


ALGORITHMS: dict[str, Algorithm] = {
    "greedy_knapsack": greedy_knapsack,
    "ffd": ffd,
    "bfd": bfd,
    "fill": fill,
}
DEFAULT_ALGORITHM = "fill"


def resolve_algorithm(name: str) -> str:
    name = DEFAULT_ALGORITHM if name in (None, "default") else name
    if name not in ALGORITHMS:
        raise ValueError(f"unknown packing algorithm {name!r}; choose from {sorted(ALGORITHMS)} or 'default'")
    return name


def align_up(x, align: int):
    """Round up to a multiple of align (ints or numpy arrays)."""
    return -(-x // align) * align


def effective_capacity(capacity: int, pack_align: int = 1) -> int:
    """A pack padded to a multiple of pack_align fits iff its content <= floor(C / a) * a."""
    return capacity // pack_align * pack_align


def pack_lengths(
    lengths,
    capacity: int,
    algorithm: str = "default",
    *,
    tiles=None,
    max_tiles_per_pack: int | None = None,
    segment_align: int = 1,
    pack_align: int = 1,
    seed: int = 0,
) -> Packs:
    """Pack samples into packs of at most `capacity` tokens (padding included).

    Each segment is padded to a multiple of `segment_align` and each pack to a multiple of
    `pack_align` (e.g. 2*cp*tp for context parallel, 16 for FP8); capacity checks include both.
    Returns lists of indices into `lengths`, each index exactly once. Raises ValueError naming
    the first sample that cannot fit alone.
    """
    if capacity <= 0 or segment_align <= 0 or pack_align <= 0:
        raise ValueError("capacity, segment_align and pack_align must be positive")
    lens = np.asarray(lengths, dtype=np.int64).reshape(-1)
    tl = None if tiles is None else np.asarray(tiles, dtype=np.int64).reshape(-1)
    if tl is not None and len(tl) != len(lens):
        raise ValueError(f"tiles has {len(tl)} entries but lengths has {len(lens)}")
    if len(lens) and lens.min() < 0:
        raise ValueError(f"sample {int(np.argmin(lens))} has negative length {int(lens.min())}")
    if tl is not None and len(tl) and tl.min() < 0:
        raise ValueError(f"sample {int(np.argmin(tl))} has negative tiles")
    cap = effective_capacity(capacity, pack_align)
    eff = align_up(lens, segment_align) if segment_align > 1 else lens
    bad = np.flatnonzero(eff > cap)
    if len(bad):
        i = int(bad[0])
        raise ValueError(
            f"sample {i} has {int(lens[i])} tokens ({int(eff[i])} after segment_align={segment_align}); "
            f"a pack holds at most {cap} (capacity {capacity}, pack_align {pack_align}); "
            f"{len(bad)} sample(s) oversize"
        )
    if tl is not None and max_tiles_per_pack is not None:
        bad = np.flatnonzero(tl > max_tiles_per_pack)
        if len(bad):
            i = int(bad[0])
            raise ValueError(f"sample {i} has {int(tl[i])} tiles > max_tiles_per_pack={max_tiles_per_pack}")
    if tl is not None and max_tiles_per_pack is None:
        tl = None  # tiles only matter under a limit
    fn = ALGORITHMS[resolve_algorithm(algorithm)]
    return fn(eff, cap, tl, max_tiles_per_pack, seed)
