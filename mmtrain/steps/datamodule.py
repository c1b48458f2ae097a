"""Data module: sample source -> step plan -> this rank's packed micro-batches."""

from __future__ import annotations

from typing import Iterator, Optional

import numpy as np

from mmtrain.config import MMTrainConfig
from mmtrain.data import synthetic
from mmtrain.steps.batch import PackedMicroBatch, Sample, build_micro_batch
from mmtrain.steps.planner import PlannerSettings, StepPlan, StepPlanner


class SyntheticTilesSource:
    """Training view of the synthetic 1-20-tile data: shapes for planning, samples on demand."""

    def __init__(self, cfg: MMTrainConfig, tokens_per_tile: int) -> None:
        d = cfg.data
        self.spec = synthetic.SyntheticTilesSpec(
            num_samples=d.num_samples,
            min_tiles=d.min_tiles,
            max_tiles=d.max_tiles,
            min_text_tokens=d.min_text_tokens,
            max_text_tokens=d.max_text_tokens,
            tile_distribution=d.tile_distribution,
            seed=d.seed,
        )
        self.tokens_per_tile = tokens_per_tile
        self.vocab = cfg.model.decoder.vocab_size
        self.image_size = cfg.model.vision.image_size
        self.channels = cfg.model.vision.in_channels
        self.tiles, self.text_tokens = synthetic.sample_shapes(self.spec)

    def __len__(self) -> int:
        return self.spec.num_samples

    def sample(self, index: int, with_pixels: bool, keep_tokens: Optional[int] = None) -> Sample:
        text, _ = synthetic.sample_text(self.spec, index, self.vocab)
        tiles = int(self.tiles[index])
        image_tokens = tiles * self.tokens_per_tile
        if keep_tokens is not None:  # packing.oversize_policy=truncate cuts text, never the image
            text = text[: max(keep_tokens - image_tokens, 1)]
        pixels = synthetic.sample_pixels(self.spec, index, self.image_size, self.channels) if with_pixels else None
        return Sample(sample_id=index, text=text, pixels=pixels, tiles=tiles, image_tokens=image_tokens)


def buffer_size(cfg: MMTrainConfig) -> int:
    """packing.buffer_size, defaulting to the global batch size."""
    return cfg.packing.buffer_size or cfg.trainer.global_batch_size


def build_source(cfg: MMTrainConfig, tokens_per_tile: int):
    if cfg.data.name == "llava_json":
        from mmtrain.data.sources.llava_train import LlavaJsonTrainSource

        return LlavaJsonTrainSource(cfg, tokens_per_tile)
    if cfg.data.name != "synthetic_tiles":
        raise ValueError(f"data={cfg.data.name!r} is not a training source yet; use data=synthetic_tiles or data=llava_json")
    return SyntheticTilesSource(cfg, tokens_per_tile)


class DataModule:
    def __init__(self, cfg: MMTrainConfig, *, dp: int, dp_rank: int, pp: int, first_stage: bool, tokens_per_tile: int) -> None:
        self.cfg = cfg
        self.dp_rank = dp_rank
        self.first_stage = first_stage
        self.tokens_per_tile = tokens_per_tile
        self.source = build_source(cfg, tokens_per_tile)
        p, t = cfg.packing, cfg.trainer
        self.settings = PlannerSettings(
            packing=p.enabled,
            seq_length=p.seq_length,
            buffer_size=buffer_size(cfg),
            algorithm=p.algorithm,
            global_batch_size=t.global_batch_size,
            micro_batch_size=t.micro_batch_size,
            dp=dp,
            pp=pp,
            seed=t.seed,
            shuffle=cfg.data.shuffle,
            balance=cfg.balancing.enabled,
            balance_strategy=cfg.balancing.strategy,
            pipeline_order=cfg.balancing.pipeline_order,
            max_images_per_pack=p.max_images_per_pack,
            pack_align=p.align,
            segment_align=p.segment_align,
            oversize_policy=p.oversize_policy,
            carry_over=p.carry_over if p.carry_over is not None else buffer_size(cfg) != t.global_batch_size,
        )
        plan_packs, plan_kept = self._offline_plan(cfg, tokens_per_tile)
        self.planner = StepPlanner(
            self.source.tiles, self.source.text_tokens, tokens_per_tile, self.settings, plan_packs, plan_kept
        )
        self.planner.set_cost_model(self._cost_model(cfg))
        v = cfg.model.vision
        self.image_shape = (v.in_channels, v.image_size, v.image_size)

    def _offline_plan(self, cfg: MMTrainConfig, tokens_per_tile: int):
        """Packs from `packing.plan` (made by `mmtrain pack` on this source's length table, e.g. the
        one `mmtrain lengths` writes); refused with what differs if it was made for other data."""
        if not (cfg.packing.enabled and cfg.packing.plan):
            return None, None
        from mmtrain.packing.plan_file import load_plan

        plan = load_plan(cfg.packing.plan, expected_fingerprint=self.source_fingerprint())
        made_for = plan.meta.get("params", {}).get("seq_length")
        if made_for is not None and made_for > cfg.packing.seq_length:
            raise ValueError(
                f"packing.plan {cfg.packing.plan} was made for seq_length {made_for} > packing.seq_length="
                f"{cfg.packing.seq_length}; re-run `mmtrain pack --seq-length {cfg.packing.seq_length}`"
            )
        kept = {int(k): int(v) for k, v in plan.meta.get("truncated", {}).items()}
        return [list(map(int, p)) for p in plan.packs], kept

    def source_fingerprint(self) -> str:
        """sha256 of this source's length table (image tokens after expansion, text, tiles): what
        offline plans and checkpoints are tied to; `mmtrain lengths` writes the same table."""
        from mmtrain.packing.plan_file import fingerprint

        tiles = np.asarray(self.source.tiles, dtype=np.int64)
        return fingerprint(tiles * self.tokens_per_tile, np.asarray(self.source.text_tokens, dtype=np.int64), tiles)

    def sample_lengths(self, plan: StepPlan) -> list[int]:
        """Decoder tokens of each sample of the step, after any truncation."""
        return [plan.kept_length.get(i, int(self.planner.lengths[i])) for i in plan.sample_ids]

    def plan_tiles(self, plan: StepPlan) -> int:
        return int(sum(int(self.source.tiles[i]) for i in plan.sample_ids))

    @staticmethod
    def _cost_model(cfg: MMTrainConfig):
        """What the balancer weighs packs by: calibrated coefficients if given, else FLOP formulas of
        this model (vision + decoder, frozen parts without weight-gradient work)."""
        from mmtrain.balancing.cost import CostModel

        if cfg.balancing.cost_model:
            return CostModel.load(cfg.balancing.cost_model)
        return CostModel.from_config(cfg.model)

    def row_length(self) -> Optional[int]:
        p = self.cfg.packing
        if not p.enabled and p.pad_unpacked_to == "seq_length":
            return p.seq_length
        if p.enabled and p.pad_to is not None:
            if p.pad_to != "seq_length":
                raise ValueError(f"packing.pad_to={p.pad_to!r}: choose seq_length or null")
            return p.seq_length
        return None

    def padded_tokens(self, plan: StepPlan) -> int:
        """Tokens the whole step computes on (all ranks), alignment and row padding included."""
        fixed = self.row_length()
        if fixed is not None:
            return fixed * len(plan.rows)
        a, seg = max(self.cfg.packing.align, 1), max(self.cfg.packing.segment_align, 1)
        lengths = self.planner.lengths
        total = 0
        for row in plan.rows:
            used = sum(-(-int(plan.kept_length.get(i, lengths[i])) // seg) * seg for i in row)
            total += -(-max(used, 1) // a) * a
        return total

    def next_step(self) -> StepPlan:
        return self.planner.next_step()

    def micro_batches(self, plan: StepPlan, dp_rank: Optional[int] = None) -> Iterator[PackedMicroBatch]:
        """This rank's micro-batches for a step, built lazily (pixels only on the first PP stage)."""
        rank = self.dp_rank if dp_rank is None else dp_rank
        for mb_rows in plan.rank_micro_batches[rank]:
            rows = [
                [self.source.sample(i, self.first_stage, plan.kept_length.get(i)) for i in plan.rows[r]] for r in mb_rows
            ] or [[]]
            yield build_micro_batch(
                rows,
                row_length=self.row_length(),
                tokens_per_tile=self.tokens_per_tile,
                image_shape=self.image_shape,
                capacity=self.cfg.packing.seq_length,
                pack_align=max(self.cfg.packing.align, 1),
                segment_align=max(self.cfg.packing.segment_align, 1),
            )

    def state_dict(self) -> dict:
        return {"planner": self.planner.state_dict()}

    def load_state_dict(self, d: dict) -> None:
        self.planner.load_state_dict(d["planner"])


def export_lengths_main(argv: list[str]) -> int:
    """`mmtrain lengths --out TABLE.csv [hydra overrides]`: the training source's length table
    (id, tiles, image_tokens, text_tokens), e.g. as input to `mmtrain pack` for an offline plan."""
    import argparse

    from mmtrain.config import compose
    from mmtrain.models.vlm import tokens_per_tile

    ap = argparse.ArgumentParser(prog="mmtrain lengths", description=export_lengths_main.__doc__)
    ap.add_argument("--out", required=True)
    ap.add_argument("overrides", nargs="*", help="Hydra overrides, as for python -m mmtrain.train")
    args = ap.parse_args(argv)
    cfg = compose(args.overrides)
    tpt = tokens_per_tile(cfg.model)
    src = build_source(cfg, tpt)
    tiles = np.asarray(src.tiles, dtype=np.int64)
    table = np.stack([np.arange(len(tiles)), tiles, tiles * tpt, np.asarray(src.text_tokens, dtype=np.int64)], axis=1)
    np.savetxt(args.out, table, fmt="%d", delimiter=",", header="id,tiles,image_tokens,text_tokens", comments="")
    print(f"wrote {len(tiles)} rows to {args.out}")
    return 0
