"""Data module: a Source -> the step stream -> this rank's packed micro-batches (`mmtrain.steps.from_config`
makes the source and the stream, as `mmtrain simulate` and `mmtrain pack` do)."""

from __future__ import annotations

from typing import Iterator, Optional

from mmtrain.config import MMTrainConfig
from mmtrain.steps.batch import PackedMicroBatch, build_micro_batch, native_layout
from mmtrain.steps.from_config import build_source, build_stream, source_fingerprint
from mmtrain.steps.stream import Step


class DataModule:
    def __init__(self, cfg: MMTrainConfig, *, dp: int, dp_rank: int, pp: int, first_stage: bool, tokens_per_tile: int) -> None:
        from mmtrain.balancing.cost import CostModel

        self.cfg = cfg
        self.dp = dp
        self.dp_rank = dp_rank
        self.first_stage = first_stage
        self.tokens_per_tile = tokens_per_tile
        self.source = build_source(cfg, tokens_per_tile)
        self.stream = build_stream(cfg, self.source, tokens_per_tile, dp, pp)
        self.flop_model = CostModel.from_config(cfg.model)  # useful FLOPs for MFU: the balancer's formula
        self._ids = list(self.source.ids)
        v = cfg.model.vision
        self.image_shape = getattr(self.source, "image_shape", (v.in_channels, v.image_size, v.image_size))
        self.native = native_layout(cfg.model)

    def source_fingerprint(self) -> str:
        return source_fingerprint(self.source, self.tokens_per_tile)

    def sample_lengths(self, step: Step) -> list[int]:
        """Decoder tokens of each sample of the step, after any truncation."""
        return [step.kept_length.get(i, int(self.stream.lengths[i])) for i in step.sample_ids]

    def sample_tiles(self, step: Step) -> list[int]:
        return [int(self.stream.tiles[i]) for i in step.sample_ids]

    def useful_flops(self, step: Step) -> float:
        """FLOPs of the step's real tokens (no padding), the cost model's FLOP formula."""
        vsq = self.stream.sample_vision_sq(step.sample_ids)
        return float(self.flop_model.tiled_costs(self.sample_lengths(step), self.sample_tiles(step), vsq).sum())

    def rank_record_ids(self, step: Step) -> list[list[str]]:
        """Record ids each DP rank runs in this step, in run order (as planned)."""
        return [[self._ids[i] for i in step.rank_samples(r)] for r in range(len(step.rank_micro_batches))]

    def record_id(self, index: int) -> str:
        return self._ids[index]

    def row_length(self) -> Optional[int]:
        p = self.cfg.packing
        if not p.enabled and p.pad_unpacked_to == "seq_length":
            return p.seq_length
        if p.enabled and p.pad_to is not None:
            if p.pad_to != "seq_length":
                raise ValueError(f"packing.pad_to={p.pad_to!r}: choose seq_length or null")
            return p.seq_length
        return None

    def padded_tokens(self, step: Step) -> int:
        """Tokens the whole step computes on (all ranks), alignment and row padding included."""
        fixed = self.row_length()
        if fixed is not None:
            return fixed * len(step.rows)
        a, seg = max(self.cfg.packing.align, 1), max(self.cfg.packing.segment_align, 1)
        lengths = self.stream.lengths
        total = 0
        for row in step.rows:
            used = sum(-(-int(step.kept_length.get(i, lengths[i])) // seg) * seg for i in row)
            total += -(-max(used, 1) // a) * a
        return total

    def next_step(self) -> Step:
        return self.stream.next_step()

    def observe(self, step: Step, rank_seconds) -> Optional[dict]:
        """Per-DP-rank measured seconds of `step` (identical on every rank) for online calibration."""
        return self.stream.observe(step, rank_seconds)

    def micro_batches(self, step: Step, dp_rank: Optional[int] = None) -> Iterator[PackedMicroBatch]:
        """This rank's micro-batches for a step, in run order, built lazily (pixels only on the first PP stage)."""
        rank = self.dp_rank if dp_rank is None else dp_rank
        for mb_rows in step.rank_micro_batches[rank]:
            rows = [
                [self.source.sample(i, self.first_stage, step.kept_length.get(i)) for i in step.rows[r]] for r in mb_rows
            ] or [[]]
            yield build_micro_batch(
                rows,
                row_length=self.row_length(),
                tokens_per_tile=self.tokens_per_tile,
                image_shape=self.image_shape,
                capacity=self.cfg.packing.seq_length,
                pack_align=max(self.cfg.packing.align, 1),
                segment_align=max(self.cfg.packing.segment_align, 1),
                native=self.native,
            )

    def state_dict(self) -> dict:
        return {"steps": self.stream.state_dict()}

    def load_state_dict(self, d: dict) -> None:
        self.stream.load_state_dict(d["steps"])
