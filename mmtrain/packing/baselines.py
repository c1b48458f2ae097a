"""Baseline packers: Megatron-LM's greedy knapsack, first-fit and best-fit decreasing.

Pure functions of integer arrays: fn(lengths, capacity, tiles, max_tiles_per_pack, seed) -> packs,
lengths already aligned and validated (`mmtrain.packing.common.prepare`).
"""

from __future__ import annotations

import bisect

import numpy as np

from mmtrain.packing.common import NO_TILE_LIMIT, KeyPool, Packs


def greedy_knapsack(lengths, capacity, tiles=None, max_tiles_per_pack=None, seed=0) -> Packs:
    """Megatron-LM's buffer packer: sort ascending, fill the current pack with the largest item
    that still fits, open a new pack when nothing fits. Kept as the baseline."""
    tb_max = NO_TILE_LIMIT if max_tiles_per_pack is None else max_tiles_per_pack
    pool = KeyPool(lengths, tiles)
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


def ffd(lengths, capacity, tiles=None, max_tiles_per_pack=None, seed=0) -> Packs:
    """First-fit decreasing over the whole input (segment tree over bins: O(n log n))."""
    n = len(lengths)
    tmax = NO_TILE_LIMIT if max_tiles_per_pack is None else max_tiles_per_pack
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


def bfd(lengths, capacity, tiles=None, max_tiles_per_pack=None, seed=0) -> Packs:
    """Best-fit decreasing: put each item (largest first) into the open pack with the least room
    that still fits. Open packs are bucketed by residual (integers <= capacity): O(n log C)."""
    tmax = NO_TILE_LIMIT if max_tiles_per_pack is None else max_tiles_per_pack
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
