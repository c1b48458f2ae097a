"""The default packer (`fill`, "best fit with completion") and its offline search.

Each pack is the largest remaining item plus a fill chosen over the remaining (length, tiles)
keys by the builders of `mmtrain.packing.fill_builders`; the packing with fewest packs is kept.
Offline inputs then get a search: buffered-with-carry packings are tried (the buffers mix sizes and
the carried under-filled packs are re-packed with fresh samples; on e.g. docvqa that beats the
global largest-first packing), a large-neighbourhood step (`_lns`) and the local-search repair
(`repair.repair_packs`, strict pack-count reductions only). Every switch is a field of
`FillOptions`, passed in (tests and benchmarks vary them; nothing reads a module global).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from mmtrain.packing.buffering import CarryOptions, pack_in_buffers
from mmtrain.packing.common import NO_TILE_LIMIT, KeyPool, Packs
from mmtrain.packing.fill_builders import (
    FULL_BUILDERS,
    SMALL_BUILDERS,
    SMALL_PACKING_BUILDERS,
    _build_dp_pattern_small_first,
    _build_largest_fits,
    best_packing,
    exact_small,
    materialize,
    pack_small,
)
from mmtrain.packing.repair import repair_packs, top_up


@dataclass(frozen=True)
class FillOptions:
    """Switches of `fill` (defaults measured in bench/results/packing.md)."""

    exact_max_items: int = 10  # inputs this small are solved exactly (subset DP)
    search_min_items: int = 5000  # below this (online buffers) only the cheap builders run
    # The full builders (None: FULL_BUILDERS), e.g. one DP builder with another key budget.
    builders: tuple | None = None
    # The small-first DP only pays off when few distinct (length, tiles) keys make the tie-breaking
    # between equal-slack fills matter (real VLM tables: 300-1300 keys; it moved chartqa 2958 -> 2927
    # packs). With many distinct lengths exact fills abound (synthetic, 2260 keys: 34000 vs 34001
    # packs) and it would cost ~0.65 s per 1M samples, so it is skipped there.
    small_first_max_keys: int = 1500
    # Offline inputs up to this size also try buffered-with-carry packings of these buffer sizes
    # (about n / 50k seconds per buffer size, hence the cap).
    offline_buffered_max_items: int = 250_000
    offline_buffers: tuple[int, ...] = (1000, 2000)
    # Offline inputs up to repair_max_items get the LNS step and the local-search repair: the
    # k <= repair_max_k least-full packs are re-packed into k-1 after exchanges with the other packs;
    # repair_work / lns_work bound the operations (deterministic, not a clock).
    repair: bool = True
    repair_max_items: int = 300_000
    repair_max_k: int = 6
    repair_work: int = 1_000_000
    lns_sizes: tuple[int, ...] = (250, 300, 350, 400, 500)  # pool sizes (packs) of the LNS step
    lns_work: int = 2_000_000  # top_up operations per LNS step
    use_extension: bool = True  # the C twin of the buffer-size path, when built
    carry: CarryOptions = field(default_factory=CarryOptions)  # for the offline buffered tries


def fill(lengths, capacity, tiles=None, max_tiles_per_pack=None, seed=0, options: FillOptions | None = None) -> Packs:
    """Default packer ("best fit with completion"): each pack is the largest remaining item plus
    a fill chosen over the remaining (length, tiles) keys. Pattern builders: minimum-slack
    subset-sum DP, largest-first greedy with a bounded triple search, and a bounded DFS; inputs of
    at least `search_min_items` samples run all of them (DP over up to 256 keys), smaller inputs
    (online buffers) the greedy and a 16-key small-first DP. As a safety net the count-based
    largest-fits greedy (exactly the greedy_knapsack packing) also runs; the packing with fewest
    packs is kept (ties: earlier builder). Packings are built on counts and only the winner is
    turned into index lists. Inputs of at most `exact_max_items` samples are solved optimally.
    The buffer-size path runs in the optional C extension `_fastpack` when it is built: same
    steps, byte-identical packs, ~7x faster online. Offline inputs up to `repair_max_items` finish
    with the LNS step and the local-search repair (pure Python after either path)."""
    o = options or FillOptions()
    n = len(lengths)
    if n == 0:
        return []
    if n <= o.exact_max_items:
        return exact_small(lengths, capacity, tiles, max_tiles_per_pack, seed)
    tb_max = NO_TILE_LIMIT if max_tiles_per_pack is None else max_tiles_per_pack
    base = KeyPool(lengths, tiles)
    full = o.builders if o.builders is not None else FULL_BUILDERS
    builders = (full if n >= o.search_min_items else SMALL_BUILDERS) + (_build_largest_fits,)
    if len(base.keys) > o.small_first_max_keys:
        builders = tuple(b for b in builders if b is not _build_dp_pattern_small_first)
    if builders == SMALL_PACKING_BUILDERS:
        best = pack_small(base, capacity, tb_max, o.use_extension)
    else:
        best = best_packing(builders, base, capacity, tb_max)
    packs = materialize(base.order, best[1])
    if o.search_min_items <= n <= o.offline_buffered_max_items:

        def small(ls, cap, tl, mt, sd):
            return fill(ls, cap, tl, mt, sd, o)

        ids = np.arange(n, dtype=np.int64)
        for b in o.offline_buffers:
            if b >= n or b >= o.search_min_items:
                continue
            r = pack_in_buffers(np.asarray(lengths, np.int64), ids, capacity, small, b, carry_over=True, top_up_held=True,
                                tiles=tiles, max_tiles_per_pack=max_tiles_per_pack, seed=seed, options=o.carry)
            if len(r) < len(packs):
                packs = r
    if o.repair and o.search_min_items <= n <= o.repair_max_items:
        ll = lengths.tolist()
        tl = None if tiles is None else tiles.tolist()
        packs = _lns(packs, lengths, ll, capacity, tiles, tl, max_tiles_per_pack, tb_max,
                     len(base.keys) <= o.small_first_max_keys, o)
        packs = repair_packs(packs, ll, capacity, tl, max_tiles_per_pack, max_k=o.repair_max_k, work=o.repair_work)
    return packs


def _lns(packs: Packs, lengths: np.ndarray, ll: list, capacity: int, tiles, tl, max_tiles_per_pack, tb_max: int,
         full: bool, o: FillOptions) -> Packs:
    """Offline large-neighbourhood step: for R in lns_sizes, the R packs with the most items (small
    items, the flexible part of the packing; ties: earlier pack) become a pool; the other packs take
    pool items by exchanges that raise their tokens (`repair.top_up`), then the pool is re-packed
    with the full builders (`full`: inputs with few distinct keys; else the buffer path). Kept only
    when the packing gets fewer packs; stops at the first size that does not help. E.g. chartqa:
    the six-5-tile packs take the long-text 5-tile samples of the mixed packs, and the mixed packs
    are re-packed around the short-text ones."""
    builders = (o.builders if o.builders is not None else FULL_BUILDERS) + (_build_largest_fits,)
    for size in o.lns_sizes:
        if size >= len(packs):
            break
        order = sorted(range(len(packs)), key=lambda j: (-len(packs[j]), j))
        pool_ids = set(order[:size])
        held = [i for j in sorted(pool_ids) for i in packs[j]]
        others = [packs[j] for j in range(len(packs)) if j not in pool_ids]
        others, held = top_up(others, held, ll, capacity, tl, max_tiles_per_pack, work=o.lns_work, pair_max=0)
        idx = np.asarray(sorted(held), dtype=np.int64)
        sub = KeyPool(lengths[idx], None if tiles is None else tiles[idx])
        if full:  # few distinct keys in the input (real VLM tables): the full builders
            best = best_packing(builders, sub, capacity, tb_max)
        else:  # many keys (exact fills abound; the 256-key DP would be slow): the buffer path
            best = pack_small(sub, capacity, tb_max, o.use_extension)
        refill = materialize(sub.order, best[1])
        if len(others) + len(refill) >= len(packs):
            break
        packs = others + [idx[p].tolist() for p in refill]
    return packs
