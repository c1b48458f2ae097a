"""Packing algorithms behind one interface: lengths (and optional tiles) in, packs out.

Every algorithm is a pure function of integer arrays, fn(lengths, capacity, tiles,
max_tiles_per_pack, seed) -> packs: the baselines (`mmtrain.packing.baselines`: Megatron-LM's
greedy knapsack, FFD, BFD) and the default `fill` (`mmtrain.packing.search`, built from
`mmtrain.packing.fill_builders`). `pack_lengths` applies alignment (segment padding, pack capacity
rounding) and validation, then dispatches. Oversize policies and buffered packing of a whole
table live in `mmtrain.packing.policy`.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from mmtrain.packing.baselines import bfd, ffd, greedy_knapsack
from mmtrain.packing.common import Packs, align_up, effective_capacity, prepare
from mmtrain.packing.search import FillOptions, fill

Algorithm = Callable[[np.ndarray, int, "np.ndarray | None", "int | None", int], Packs]

ALGORITHMS: dict[str, Algorithm] = {
    "greedy_knapsack": greedy_knapsack,
    "ffd": ffd,
    "bfd": bfd,
    "fill": fill,
}
DEFAULT_ALGORITHM = "fill"

__all__ = ["ALGORITHMS", "DEFAULT_ALGORITHM", "FillOptions", "align_up", "effective_capacity", "pack_function",
           "pack_lengths", "resolve_algorithm"]


def resolve_algorithm(name: str) -> str:
    name = DEFAULT_ALGORITHM if name in (None, "default") else name
    if name not in ALGORITHMS:
        raise ValueError(f"unknown packing algorithm {name!r}; choose from {sorted(ALGORITHMS)} or 'default'")
    return name


def pack_function(algorithm: str, fill_options: FillOptions | None = None) -> Algorithm:
    """The packer behind an algorithm name (`fill` with the given options)."""
    name = resolve_algorithm(algorithm)
    if name == "fill" and fill_options is not None:
        return lambda lengths, capacity, tiles, max_tiles_per_pack, seed: fill(
            lengths, capacity, tiles, max_tiles_per_pack, seed, fill_options)
    return ALGORITHMS[name]


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
    fill_options: FillOptions | None = None,
) -> Packs:
    """Pack samples into packs of at most `capacity` tokens (padding included).

    Each segment is padded to a multiple of `segment_align` and each pack to a multiple of
    `pack_align` (e.g. 2*cp*tp for context parallel, 16 for FP8); capacity checks include both.
    Returns lists of indices into `lengths`, each index exactly once. Raises ValueError naming
    the first sample that cannot fit alone.
    """
    eff, cap, tl = prepare(lengths, capacity, tiles=tiles, max_tiles_per_pack=max_tiles_per_pack,
                           segment_align=segment_align, pack_align=pack_align)
    return pack_function(algorithm, fill_options)(eff, cap, tl, max_tiles_per_pack, seed)
