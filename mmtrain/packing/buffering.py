"""Buffered packing: consecutive chunks of `buffer_size` samples packed independently, as Megatron
packs online, optionally carrying under-filled packs into the next chunk.

With carry-over the under-filled tail packs of a chunk are not emitted: their samples move to the
front of the next chunk (the buffer still never holds more than `buffer_size` samples, and a sample
is carried at most `CarryOptions.max_carries` times), which removes the half-empty last pack per
buffer that otherwise caps buffered efficiency. The packer itself is passed in as a function, so
this module sits below every packer that uses it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from mmtrain.packing.common import Packs, align_up, effective_capacity, prepare
from mmtrain.packing.repair import top_up

# fn(aligned lengths, usable capacity, tiles or None, max_tiles_per_pack, seed) -> packs
PackFn = Callable[[np.ndarray, int, "np.ndarray | None", "int | None", int], Packs]


@dataclass(frozen=True)
class CarryOptions:
    """How buffered packing carries under-filled packs (defaults measured in bench/results/packing.md)."""

    max_carries: int = 6  # a sample waits at most this many buffers (6 never lost a pack in the bench)
    carry_fill: float = 0.995  # packs filled below this fraction of capacity may be carried
    carry_fraction: float = 0.25  # at most this share of a buffer is carried
    # `fill` only: after the carry choice, emitted packs take held samples by exchanges that raise
    # their tokens (`repair.top_up`), bounded by top_up_work operations per buffer; pairs of held
    # samples are tried while at most top_up_pair_max samples are held.
    top_up: bool = True
    top_up_work: int = 20_000
    top_up_pair_max: int = 100


def pack_buffer(
    lengths: np.ndarray,
    capacity: int,
    pack_fn: PackFn,
    *,
    tiles: np.ndarray | None = None,
    max_tiles_per_pack: int | None = None,
    segment_align: int = 1,
    pack_align: int = 1,
    seed: int = 0,
    carry: np.ndarray | None = None,
    buffer_size: int | None = None,
    top_up_held: bool = False,
    options: CarryOptions = CarryOptions(),
) -> tuple[Packs, list[int]]:
    """Pack one buffer. Returns (emitted packs, carried positions), positions into `lengths`.

    With `carry` (times each sample was already carried; None = final flush) the least-filled
    packs below carry_fill are held back, up to carry_fraction of buffer_size samples, skipping
    packs holding a sample carried max_carries times. With `top_up_held` (the default packer) the
    emitted packs then take held samples by exchanges that raise their tokens (`repair.top_up`;
    only samples carried fewer than max_carries times are moved into the held set, which stays
    within the budget)."""
    eff, cap, tl = prepare(lengths, capacity, tiles=tiles, max_tiles_per_pack=max_tiles_per_pack,
                           segment_align=segment_align, pack_align=pack_align)
    packs = pack_fn(eff, cap, tl, max_tiles_per_pack, seed)
    if carry is None or not packs:
        return packs, []
    o = options
    el = eff.tolist()
    fills = [sum([el[i] for i in p]) for p in packs]
    budget = budget0 = int((buffer_size or len(lengths)) * o.carry_fraction)
    held: set[int] = set()
    carried: list[int] = []
    for j in sorted(range(len(packs)), key=lambda j: (fills[j], j)):
        if fills[j] >= o.carry_fill * cap or len(packs[j]) > budget:
            break
        if max(int(carry[i]) for i in packs[j]) >= o.max_carries:
            continue
        held.add(j)
        carried.extend(packs[j])
        budget -= len(packs[j])
    emitted = [p for j, p in enumerate(packs) if j not in held]
    if carried and top_up_held and o.top_up:
        tls = None if tiles is None or max_tiles_per_pack is None else np.asarray(tiles, np.int64).tolist()
        emitted, carried = top_up(
            emitted, carried, el, cap, tls, max_tiles_per_pack,
            movable=[c < o.max_carries for c in carry.tolist()], max_held=budget0,
            work=o.top_up_work, pair_max=o.top_up_pair_max,
        )
    return emitted, sorted(carried)


def pack_in_buffers(
    lengths: np.ndarray,
    ids: np.ndarray,
    capacity: int,
    pack_fn: PackFn,
    buffer_size: int,
    *,
    carry_over: bool = True,
    top_up_held: bool = False,
    tiles: np.ndarray | None = None,
    max_tiles_per_pack: int | None = None,
    segment_align: int = 1,
    pack_align: int = 1,
    seed: int = 0,
    options: CarryOptions = CarryOptions(),
) -> Packs:
    """Pack the samples `ids` (positions into `lengths` / `tiles`) in consecutive buffers of
    `buffer_size`, in the given order; returns packs of ids."""
    if buffer_size <= 0:
        raise ValueError(f"buffer_size must be positive, got {buffer_size}")
    packs: Packs = []
    pending = np.empty(0, np.int64)  # carried sample ids
    pcount = np.empty(0, np.int64)
    pos = 0
    while pos < len(ids) or len(pending):
        take = buffer_size - len(pending)
        new = ids[pos : pos + take]
        pos += len(new)
        buf = np.concatenate([pending, new])
        counts = np.concatenate([pcount, np.zeros(len(new), np.int64)])
        final = len(buf) < buffer_size
        emitted, held = pack_buffer(
            lengths[buf], capacity, pack_fn, tiles=None if tiles is None else tiles[buf],
            max_tiles_per_pack=max_tiles_per_pack, segment_align=segment_align, pack_align=pack_align, seed=seed,
            carry=None if (final or not carry_over) else counts, buffer_size=buffer_size, top_up_held=top_up_held,
            options=options,
        )
        packs.extend(buf[p].tolist() for p in emitted)
        pending, pcount = buf[held], counts[held] + 1
    return packs


__all__ = ["CarryOptions", "PackFn", "align_up", "effective_capacity", "pack_buffer", "pack_in_buffers"]
