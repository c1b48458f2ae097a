"""Caller-facing packing: oversize policy, offline vs buffered mode, summary statistics.

Buffered mode packs consecutive chunks of `buffer_size` samples independently, as Megatron does
online. With `carry_over` (default) the under-filled tail packs of a chunk are not emitted: their
samples move to the front of the next chunk (the buffer still never holds more than
`buffer_size` samples, and a sample is carried at most MAX_CARRIES times), which removes the
half-empty last pack per buffer that otherwise caps buffered efficiency.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from mmtrain.packing.algorithms import (
    align_up,
    effective_capacity,
    pack_lengths,
    resolve_algorithm,
)
from mmtrain.packing.repair import top_up

OVERSIZE_POLICIES = ("error", "truncate", "drop")
MAX_CARRIES = 6  # was 4; 6 never lost a pack in the bench (buffers 100/1000, offline), see bench/results
CARRY_FILL = 0.995  # packs filled below this fraction of capacity are carried to the next buffer
CARRY_FRACTION = 0.25  # at most this share of a buffer is carried
# `fill` only: after the carry choice, emitted packs take held samples by exchanges that raise
# their tokens (mmtrain.packing.repair.top_up); bounded by TOP_UP_WORK operations per buffer,
# pairs of held samples are tried while at most TOP_UP_PAIR_MAX samples are held.
TOP_UP = True
TOP_UP_WORK = 20_000
TOP_UP_PAIR_MAX = 100


@dataclass
class PackResult:
    """Packs as lists of original sample indices, plus what the oversize policy did."""

    packs: list[list[int]]
    lengths: np.ndarray  # per-sample length after truncation (dropped samples keep theirs)
    capacity: int
    algorithm: str
    dropped: list[int] = field(default_factory=list)
    truncated: dict[int, int] = field(default_factory=dict)
    seconds: float = 0.0
    segment_align: int = 1
    pack_align: int = 1

    @property
    def tokens(self) -> int:
        return int(sum(int(self.lengths[p].sum()) for p in map(np.asarray, self.packs) if len(p)))

    def pack_tokens(self) -> list[int]:
        return [int(self.lengths[np.asarray(p, dtype=np.int64)].sum()) for p in self.packs]

    def lower_bound_packs(self) -> int:
        """ceil(padded tokens / usable capacity): no plan can use fewer packs."""
        kept = np.ones(len(self.lengths), bool)
        kept[self.dropped] = False
        eff = align_up(self.lengths[kept], self.segment_align)
        cap = effective_capacity(self.capacity, self.pack_align)
        return int(math.ceil(int(eff.sum()) / cap)) if len(eff) else 0

    def summary(self) -> dict:
        tokens = sum(self.pack_tokens())
        packs = len(self.packs)
        return {
            "samples": int(sum(len(p) for p in self.packs)),
            "packs": packs,
            "lower_bound_packs": self.lower_bound_packs(),
            "tokens": tokens,
            "efficiency": tokens / (packs * self.capacity) if packs else 0.0,
            "seconds": round(self.seconds, 6),
            "algorithm": self.algorithm,
            "dropped": len(self.dropped),
            "truncated": len(self.truncated),
        }


def apply_oversize(
    lengths: np.ndarray,
    capacity: int,
    *,
    tiles: np.ndarray | None,
    max_tiles_per_pack: int | None,
    segment_align: int,
    pack_align: int,
    oversize_policy: str,
    text_tokens: np.ndarray | None,
) -> tuple[np.ndarray, list[int], dict[int, int]]:
    """Returns (new lengths, dropped indices, truncated {index: new length}).

    `truncate` cuts text only: a sample whose image part (length - text_tokens) does not fit, or
    whose tiles exceed the per-pack limit, is dropped instead. With text_tokens=None all tokens
    of a sample without tiles count as text; an oversize sample with tiles cannot be truncated.
    """
    if oversize_policy not in OVERSIZE_POLICIES:
        raise ValueError(f"oversize_policy must be one of {OVERSIZE_POLICIES}, got {oversize_policy!r}")
    cap = effective_capacity(capacity, pack_align)
    max_len = cap // segment_align * segment_align  # longest segment whose padding still fits
    lengths = np.asarray(lengths, dtype=np.int64).copy()
    too_long = lengths > max_len
    too_many = np.zeros(len(lengths), bool)
    if tiles is not None and max_tiles_per_pack is not None:
        too_many = np.asarray(tiles) > max_tiles_per_pack
    bad = np.flatnonzero(too_long | too_many)
    dropped: list[int] = []
    truncated: dict[int, int] = {}
    if not len(bad):
        return lengths, dropped, truncated
    if oversize_policy == "error":
        i = int(bad[0])
        why = (
            f"{int(lengths[i])} tokens > {max_len} that fit a pack (capacity {capacity}, "
            f"segment_align {segment_align}, pack_align {pack_align})"
            if too_long[i]
            else f"{int(tiles[i])} tiles > max_tiles_per_pack={max_tiles_per_pack}"
        )
        raise ValueError(f"sample {i} is oversize: {why}; {len(bad)} oversize sample(s) in total "
                         f"(set oversize_policy to 'truncate' or 'drop')")
    for i in bad.tolist():
        if oversize_policy == "drop" or too_many[i]:
            dropped.append(i)
            continue
        if text_tokens is not None:
            text = int(text_tokens[i])
        elif tiles is None or int(tiles[i]) == 0:
            text = int(lengths[i])
        else:
            raise ValueError(f"sample {i} is oversize and has tiles; truncate needs text_tokens")
        image = int(lengths[i]) - text
        if image > max_len or image < 0:
            dropped.append(i)
            continue
        lengths[i] = max_len
        truncated[i] = max_len
    return lengths, dropped, truncated


def pack_buffer(
    lengths: np.ndarray,
    capacity: int,
    algorithm: str,
    *,
    tiles: np.ndarray | None = None,
    max_tiles_per_pack: int | None = None,
    segment_align: int = 1,
    pack_align: int = 1,
    seed: int = 0,
    carry: np.ndarray | None = None,
    buffer_size: int | None = None,
) -> tuple[list[list[int]], list[int]]:
    """Pack one buffer. Returns (emitted packs, carried positions), positions into `lengths`.

    With `carry` (times each sample was already carried; None = final flush) the least-filled
    packs below CARRY_FILL are held back, up to CARRY_FRACTION of buffer_size samples, skipping
    packs holding a sample carried MAX_CARRIES times. For `fill` (TOP_UP) the emitted packs then
    take held samples by exchanges that raise their tokens (`repair.top_up`; only samples carried
    fewer than MAX_CARRIES times are moved into the held set, which stays within the budget).
    """
    packs = pack_lengths(
        lengths, capacity, algorithm, tiles=tiles, max_tiles_per_pack=max_tiles_per_pack,
        segment_align=segment_align, pack_align=pack_align, seed=seed,
    )
    if carry is None or not packs:
        return packs, []
    eff = align_up(np.asarray(lengths, dtype=np.int64), segment_align)
    cap = effective_capacity(capacity, pack_align)
    el = eff.tolist()
    fills = [sum([el[i] for i in p]) for p in packs]
    budget = budget0 = int((buffer_size or len(lengths)) * CARRY_FRACTION)
    held: set[int] = set()
    carried: list[int] = []
    for j in sorted(range(len(packs)), key=lambda j: (fills[j], j)):
        if fills[j] >= CARRY_FILL * cap or len(packs[j]) > budget:
            break
        if max(int(carry[i]) for i in packs[j]) >= MAX_CARRIES:
            continue
        held.add(j)
        carried.extend(packs[j])
        budget -= len(packs[j])
    emitted = [p for j, p in enumerate(packs) if j not in held]
    if carried and TOP_UP and resolve_algorithm(algorithm) == "fill":
        tl = None if tiles is None or max_tiles_per_pack is None else np.asarray(tiles, np.int64).tolist()
        emitted, carried = top_up(
            emitted, carried, el, cap, tl, max_tiles_per_pack,
            movable=[c < MAX_CARRIES for c in carry.tolist()], max_held=budget0,
            work=TOP_UP_WORK, pair_max=TOP_UP_PAIR_MAX,
        )
    return emitted, sorted(carried)


def plan_packs(
    lengths,
    capacity: int,
    *,
    algorithm: str = "default",
    buffer_size: int | None = None,
    tiles=None,
    max_tiles_per_pack: int | None = None,
    segment_align: int = 1,
    pack_align: int = 1,
    oversize_policy: str = "error",
    text_tokens=None,
    seed: int = 0,
    carry_over: bool = True,
) -> PackResult:
    """Plan packs for a whole length table. buffer_size=None packs everything at once (offline);
    otherwise chunks of buffer_size samples in the given order (see module doc for carry_over)."""
    import time

    name = resolve_algorithm(algorithm)
    lens = np.asarray(lengths, dtype=np.int64).reshape(-1)
    tl = None if tiles is None else np.asarray(tiles, dtype=np.int64).reshape(-1)
    tt = None if text_tokens is None else np.asarray(text_tokens, dtype=np.int64).reshape(-1)
    t0 = time.perf_counter()
    lens, dropped, truncated = apply_oversize(
        lens, capacity, tiles=tl, max_tiles_per_pack=max_tiles_per_pack, segment_align=segment_align,
        pack_align=pack_align, oversize_policy=oversize_policy, text_tokens=tt,
    )
    keep = np.ones(len(lens), bool)
    keep[dropped] = False
    ids = np.flatnonzero(keep)
    kw = dict(max_tiles_per_pack=max_tiles_per_pack, segment_align=segment_align, pack_align=pack_align, seed=seed)
    packs: list[list[int]] = []
    if buffer_size is None or buffer_size >= len(ids):
        for p in pack_lengths(lens[ids], capacity, name, tiles=None if tl is None else tl[ids], **kw):
            packs.append(ids[p].tolist())
    else:
        if buffer_size <= 0:
            raise ValueError(f"buffer_size must be positive, got {buffer_size}")
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
                lens[buf], capacity, name, tiles=None if tl is None else tl[buf],
                carry=None if (final or not carry_over) else counts, buffer_size=buffer_size, **kw,
            )
            packs.extend(buf[p].tolist() for p in emitted)
            pending, pcount = buf[held], counts[held] + 1
    seconds = time.perf_counter() - t0
    return PackResult(
        packs=packs, lengths=lens, capacity=capacity, algorithm=name, dropped=dropped,
        truncated=truncated, seconds=seconds, segment_align=segment_align, pack_align=pack_align,
    )
