"""What every packer shares: alignment, input validation, and samples grouped by (length, tiles).

Lengths are integers in a small range (<= capacity), so the packers group samples by (length,
tiles) key and work on counts: a query "largest available length <= r" is a bisect over the
distinct keys, never a scan of items.
"""

from __future__ import annotations

import bisect

import numpy as np

Packs = list[list[int]]
NO_TILE_LIMIT = 1 << 62


def align_up(x, align: int):
    """Round up to a multiple of align (ints or numpy arrays)."""
    return -(-x // align) * align


def effective_capacity(capacity: int, pack_align: int = 1) -> int:
    """A pack padded to a multiple of pack_align fits iff its content <= floor(C / a) * a."""
    return capacity // pack_align * pack_align


def prepare(lengths, capacity: int, *, tiles=None, max_tiles_per_pack: int | None = None, segment_align: int = 1,
            pack_align: int = 1) -> tuple[np.ndarray, int, np.ndarray | None]:
    """(lengths padded to segment_align, usable capacity, tiles or None when there is no tile limit),
    after checking the input: raises ValueError naming the first sample that cannot fit alone."""
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
    if max_tiles_per_pack is None:
        tl = None  # tiles only matter under a limit
    return eff, cap, tl


class KeyPool:
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

    def clone(self) -> "KeyPool":
        """Fresh mutable state over the same sorted samples (no re-sort)."""
        c = object.__new__(KeyPool)
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
