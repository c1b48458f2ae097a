"""Online buffered packing for the data pipeline: samples stream in, packs stream out.

Same algorithms and the same buffering/carry rules as `pack_samples(..., buffer_size=N)`, so an
online run reproduces the offline buffered packing exactly. State is plain JSON (the buffer's
sample ids, lengths, tiles, carry counts and the counters) for checkpoint/resume.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mmtrain.packing.algorithms import FillOptions, pack_function, resolve_algorithm
from mmtrain.packing.buffering import CarryOptions, pack_buffer
from mmtrain.packing.policy import apply_oversize


@dataclass(frozen=True)
class Pack:
    sample_ids: tuple[int, ...]
    lengths: tuple[int, ...]  # after truncation
    tokens: int
    tiles: int


class BufferedPacker:
    """Collects `buffer_size` samples, packs them with `algorithm`, emits packs in a deterministic
    order. Under-filled packs are carried into the next buffer when `carry_over` (see policy)."""

    def __init__(
        self,
        capacity: int,
        buffer_size: int,
        algorithm: str = "default",
        *,
        max_tiles_per_pack: int | None = None,
        segment_align: int = 1,
        pack_align: int = 1,
        oversize_policy: str = "error",
        carry_over: bool = True,
        seed: int = 0,
        fill_options: FillOptions | None = None,
        carry_options: CarryOptions = CarryOptions(),
    ):
        if buffer_size <= 0:
            raise ValueError(f"buffer_size must be positive, got {buffer_size}")
        self.capacity = capacity
        self.buffer_size = buffer_size
        self.algorithm = resolve_algorithm(algorithm)
        self.max_tiles_per_pack = max_tiles_per_pack
        self.segment_align = segment_align
        self.pack_align = pack_align
        self.oversize_policy = oversize_policy
        self.carry_over = carry_over
        self.seed = seed
        self._pack_fn = pack_function(self.algorithm, fill_options)
        self._carry_options = carry_options
        self._ids: list[int] = []
        self._lens: list[int] = []
        self._tiles: list[int] = []
        self._carry: list[int] = []
        self._new = 0  # samples added since the last pack (buffer fills at buffer_size total)
        self.dropped = 0
        self.truncated = 0
        self.samples_in = 0
        self.packs_out = 0

    def __len__(self) -> int:
        return len(self._ids)

    def add(self, sample_id: int, length: int, tiles: int = 0, text_tokens: int | None = None) -> list[Pack]:
        """Buffer one sample; returns the packs completed when the buffer fills (else [])."""
        self.samples_in += 1
        lens, dropped, truncated = apply_oversize(
            np.array([length], np.int64), self.capacity,
            tiles=np.array([tiles], np.int64), max_tiles_per_pack=self.max_tiles_per_pack,
            segment_align=self.segment_align, pack_align=self.pack_align,
            oversize_policy=self.oversize_policy,
            text_tokens=None if text_tokens is None else np.array([text_tokens], np.int64),
        ) if self._maybe_oversize(length, tiles) else (None, [], {})
        if dropped:
            self.dropped += 1
            return []
        if truncated:
            self.truncated += 1
            length = int(lens[0])
        self._ids.append(int(sample_id))
        self._lens.append(int(length))
        self._tiles.append(int(tiles))
        self._carry.append(0)
        if len(self._ids) >= self.buffer_size:
            return self._pack(final=False)
        return []

    def flush(self) -> list[Pack]:
        """Pack whatever is buffered (end of epoch / shard)."""
        return self._pack(final=True) if self._ids else []

    def _maybe_oversize(self, length: int, tiles: int) -> bool:
        cap = self.capacity // self.pack_align * self.pack_align
        if length > cap // self.segment_align * self.segment_align:
            return True
        return self.max_tiles_per_pack is not None and tiles > self.max_tiles_per_pack

    def _pack(self, final: bool) -> list[Pack]:
        lens = np.asarray(self._lens, np.int64)
        tiles = np.asarray(self._tiles, np.int64)
        carry = None if (final or not self.carry_over) else np.asarray(self._carry, np.int64)
        emitted, held = pack_buffer(
            lens, self.capacity, self._pack_fn,
            tiles=tiles if self.max_tiles_per_pack is not None else None,
            max_tiles_per_pack=self.max_tiles_per_pack, segment_align=self.segment_align,
            pack_align=self.pack_align, seed=self.seed, carry=carry, buffer_size=self.buffer_size,
            top_up_held=self.algorithm == "fill", options=self._carry_options,
        )
        out = []
        ids, lens_, tls = self._ids, self._lens, self._tiles
        for p in emitted:
            ls = tuple([lens_[i] for i in p])
            out.append(Pack(tuple([ids[i] for i in p]), ls, sum(ls), sum([tls[i] for i in p])))
        self._ids = [self._ids[i] for i in held]
        self._lens = [self._lens[i] for i in held]
        self._tiles = [self._tiles[i] for i in held]
        self._carry = [self._carry[i] + 1 for i in held]
        self.packs_out += len(out)
        return out

    def state_dict(self) -> dict:
        return {
            "version": 1,
            "config": self._config(),
            "ids": list(self._ids),
            "lengths": list(self._lens),
            "tiles": list(self._tiles),
            "carry": list(self._carry),
            "dropped": self.dropped,
            "truncated": self.truncated,
            "samples_in": self.samples_in,
            "packs_out": self.packs_out,
        }

    def load_state_dict(self, state: dict) -> None:
        if state.get("config") != self._config():
            raise ValueError(f"packer state was saved with {state.get('config')}, this packer is {self._config()}")
        self._ids = [int(x) for x in state["ids"]]
        self._lens = [int(x) for x in state["lengths"]]
        self._tiles = [int(x) for x in state["tiles"]]
        self._carry = [int(x) for x in state["carry"]]
        self.dropped = int(state["dropped"])
        self.truncated = int(state["truncated"])
        self.samples_in = int(state["samples_in"])
        self.packs_out = int(state["packs_out"])

    def _config(self) -> dict:
        return {
            "capacity": self.capacity, "buffer_size": self.buffer_size, "algorithm": self.algorithm,
            "max_tiles_per_pack": self.max_tiles_per_pack, "segment_align": self.segment_align,
            "pack_align": self.pack_align, "oversize_policy": self.oversize_policy,
            "carry_over": self.carry_over, "seed": self.seed,
        }
