"""Caller-facing packing of a whole table: oversize policy, offline vs buffered mode
(`mmtrain.packing.buffering`), summary statistics."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from mmtrain.packing.algorithms import FillOptions, pack_function, pack_lengths, resolve_algorithm
from mmtrain.packing.buffering import CarryOptions, pack_in_buffers
from mmtrain.packing.common import align_up, effective_capacity

OVERSIZE_POLICIES = ("error", "truncate", "drop")


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
        """ceil(padded tokens / usable capacity): no packing can use fewer packs."""
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


def pack_samples(
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
    fill_options: FillOptions | None = None,
    carry_options: CarryOptions = CarryOptions(),
) -> PackResult:
    """Pack a whole length table. buffer_size=None packs everything at once (offline); otherwise
    chunks of buffer_size samples in the given order (`mmtrain.packing.buffering`, carry_over)."""
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
        for p in pack_lengths(lens[ids], capacity, name, tiles=None if tl is None else tl[ids], fill_options=fill_options, **kw):
            packs.append(ids[p].tolist())
    else:
        packs = pack_in_buffers(lens, ids, capacity, pack_function(name, fill_options), buffer_size, carry_over=carry_over,
                                top_up_held=name == "fill", tiles=tl, options=carry_options, **kw)
    seconds = time.perf_counter() - t0
    return PackResult(
        packs=packs, lengths=lens, capacity=capacity, algorithm=name, dropped=dropped,
        truncated=truncated, seconds=seconds, segment_align=segment_align, pack_align=pack_align,
    )
