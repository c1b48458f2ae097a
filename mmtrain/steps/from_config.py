"""The steps of a config, without torch: its training source, the step stream at a layout, the cost
model, plan files. Training's data module, `mmtrain simulate` and `mmtrain pack` all build them
here, so the three see the same samples, packs and steps for one config.
"""

from __future__ import annotations

import numpy as np

from mmtrain.config import MMTrainConfig
from mmtrain.steps.stream import PlanSteps, StepStream, StreamSettings

TRAINING_SOURCES = ("synthetic_tiles", "lengths", "llava_json")
DEFAULT_BUFFER = 1000  # samples per packer buffer when packing.buffer_size is unset (at least)


def build_source(cfg: MMTrainConfig, tokens_per_tile: int):
    """The training source of `data=`: an object with the Source protocol's training members."""
    from mmtrain.data.sources.base import check_trainable

    d, m = cfg.data, cfg.model
    name = d.name
    if name == "llava_json":
        from mmtrain.data.sources.llava_train import LlavaJsonTrainSource

        src = LlavaJsonTrainSource(cfg, tokens_per_tile)
    elif name == "lengths":
        from mmtrain.data.sources.lengths import LengthTableSource

        if not d.source:
            raise ValueError("data=lengths needs data.source=<length table: CSV / Parquet / NPY with id, tiles, text_tokens>")
        from mmtrain.models.config import is_native, native_patch_dim

        native = (m.vision.spatial_merge_size, native_patch_dim(m)) if is_native(m) else None
        src = LengthTableSource(d.source, tokens_per_tile=tokens_per_tile, image_size=m.vision.image_size,
                                channels=m.vision.in_channels, vocab_size=m.decoder.vocab_size, seed=d.seed,
                                bad_sample_policy=d.bad_sample_policy, native=native)
    elif name == "synthetic_tiles":
        from mmtrain.data import synthetic
        from mmtrain.models.config import is_native

        if is_native(m):
            raise ValueError("data=synthetic_tiles makes fixed-size tiles; a native-resolution model trains on "
                             "data=llava_json (real images) or data=lengths (a length table with image_tokens)")
        from mmtrain.data.sources.synthetic import SyntheticSource

        spec = synthetic.SyntheticTilesSpec(
            num_samples=d.num_samples, min_tiles=d.min_tiles, max_tiles=d.max_tiles,
            min_text_tokens=d.min_text_tokens, max_text_tokens=d.max_text_tokens,
            tile_distribution=d.tile_distribution, seed=d.seed,
        )
        src = SyntheticSource(spec, image_size=m.vision.image_size, tokens_per_tile=tokens_per_tile,
                              vocab_size=m.decoder.vocab_size, channels=m.vision.in_channels)
    else:
        raise ValueError(f"data={name!r} is not a training source; use data={' | data='.join(TRAINING_SOURCES)}")
    check_trainable(src, name)
    return src


def buffer_size(cfg: MMTrainConfig) -> int:
    """Samples per online packer buffer: packing.buffer_size, else at least DEFAULT_BUFFER and at
    least twice the packs of a balancing window (a window then takes whole buffers, which mix
    every kind of pack the packer makes); under strict equivalence the step's samples."""
    p, t = cfg.packing, cfg.trainer
    if p.strict_equivalence:
        return t.global_batch_size
    if p.buffer_size:
        return int(p.buffer_size)
    return max(DEFAULT_BUFFER, 2 * cfg.balancing.window_steps * t.global_batch_size)


def vision_unit_cap(cfg: MMTrainConfig):
    """The packers' per-pack cap in vision units (`tiles`: a tile, or one merged token of a native
    image = m^2 ViT patches): packing.max_tiles_per_pack and packing.max_vision_patches_per_pack
    (patches / the ViT length of a unit, exact for native images), whichever is tighter; None = none."""
    from mmtrain.models.config import is_native, vit_unit_length

    p = cfg.packing
    caps = []
    if p.max_tiles_per_pack is not None:
        if is_native(cfg.model):
            raise ValueError("packing.max_tiles_per_pack: native-resolution images have no tiles; cap the ViT with "
                             "packing.max_vision_patches_per_pack")
        caps.append(int(p.max_tiles_per_pack))
    if p.max_vision_patches_per_pack is not None:
        unit = vit_unit_length(cfg.model)
        if p.max_vision_patches_per_pack < unit:
            raise ValueError(f"packing.max_vision_patches_per_pack={p.max_vision_patches_per_pack} is less than one "
                             f"{'merged token' if is_native(cfg.model) else 'tile'} ({unit} ViT patches)")
        caps.append(int(p.max_vision_patches_per_pack) // unit)
    return min(caps) if caps else None


def vision_sq(source):
    """Per sample, the sum over its images of (ViT patches)^2, from a source's `vision_lengths`
    (native resolution); None when the source has fixed-size tiles."""
    lengths = getattr(source, "vision_lengths", None)
    if lengths is None:
        return None
    return np.array([float(sum(n * n for n in imgs)) for imgs in lengths], dtype=np.float64)


def stream_settings(cfg: MMTrainConfig, dp: int, pp: int) -> StreamSettings:
    p, t, b = cfg.packing, cfg.trainer, cfg.balancing
    return StreamSettings(
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
        strategy=b.strategy if b.enabled else "none",
        pipeline_order=b.pipeline_order and b.enabled,
        window_steps=b.window_steps,
        strict_equivalence=p.strict_equivalence,
        max_tiles_per_pack=vision_unit_cap(cfg),
        pack_align=max(p.align, 1),
        segment_align=max(p.segment_align, 1),
        oversize_policy=p.oversize_policy,
        carry_over=p.carry_over if p.carry_over is not None else not p.strict_equivalence,
        calibrate_steps=b.calibrate_steps,
    )


def cost_model(cfg: MMTrainConfig):
    """What the balancer weighs packs by: calibrated coefficients if given, else the model's FLOPs
    (vision + decoder, frozen parts without weight-gradient work; the formula MFU counts)."""
    from mmtrain.balancing.cost import CostModel

    if cfg.balancing.cost_model:
        return CostModel.load(cfg.balancing.cost_model)
    return CostModel.from_config(cfg.model)


def source_fingerprint(source, tokens_per_tile: int) -> str:
    """sha256 of a source's length table (image tokens after expansion, text, tiles): what plan
    files and checkpoints are tied to; `mmtrain lengths` writes the same table."""
    from mmtrain.packing.plan_file import fingerprint

    tiles = np.asarray(source.tiles, dtype=np.int64)
    return fingerprint(tiles * tokens_per_tile, np.asarray(source.text_tokens, dtype=np.int64), tiles)


def _plan(cfg: MMTrainConfig, source, tokens_per_tile: int):
    """(plan packs, plan steps, truncated lengths) from `packing.plan`; refused with what differs
    when it was made for other data or another layout."""
    if not (cfg.packing.enabled and cfg.packing.plan):
        return None, None, None
    from mmtrain.packing.plan_file import load_plan

    path = cfg.packing.plan
    plan = load_plan(path, expected_fingerprint=source_fingerprint(source, tokens_per_tile))
    params = plan.meta.get("params", {})
    made_for = params.get("seq_length")
    if made_for is not None and made_for > cfg.packing.seq_length:
        raise ValueError(
            f"packing.plan {path} was made for seq_length {made_for} > packing.seq_length="
            f"{cfg.packing.seq_length}; re-run `mmtrain pack --seq-length {cfg.packing.seq_length}`"
        )
    index = plan.index_of(list(source.ids))
    kept = {index[k]: int(v) for k, v in plan.meta.get("truncated", {}).items()}
    packs = [[index[i] for i in p] for p in plan.packs]
    if not plan.has_steps:
        return packs, None, kept
    dp, m, mbs = int(params["dp"]), int(params["micro_batches"]), int(params.get("micro_batch_size", 1))
    steps: dict[int, dict[int, dict[int, list[tuple[int, ...]]]]] = {}
    for line, p in zip(plan.lines, packs):
        steps.setdefault(int(line["step"]), {}).setdefault(int(line["rank"]), {}).setdefault(
            int(line["micro_batch"]), []).append(tuple(p))
    out = []
    last = len(steps) - 1
    for s in range(len(steps)):
        if s not in steps or (s < last and sorted(steps[s]) != list(range(dp))):
            raise ValueError(f"packing.plan {path}: step {s} does not give every one of the {dp} ranks packs")
        ranks = []
        for r in range(dp):
            mbs_ = steps[s].get(r, {})
            full = sorted(mbs_) == list(range(m)) and all(len(v) == mbs for v in mbs_.values())
            if not full and (s < last or sorted(mbs_) != list(range(len(mbs_)))):  # only the last step may be short
                raise ValueError(f"packing.plan {path}: step {s} rank {r} does not hold {m} micro-batches of {mbs} pack(s)")
            ranks.append([mbs_[j] for j in range(len(mbs_))] or [[]])
        out.append(ranks)
    return None, PlanSteps(out, dp, m, mbs, source=str(path)), kept


def build_stream(cfg: MMTrainConfig, source, tokens_per_tile: int, dp: int, pp: int) -> StepStream:
    """The step stream training runs for this config at this layout (and what simulate runs)."""
    plan_packs, plan_steps, kept = _plan(cfg, source, tokens_per_tile)
    return StepStream(
        source.tiles, source.text_tokens, tokens_per_tile, stream_settings(cfg, dp, pp), cost_model(cfg),
        ids=source.ids, plan_packs=plan_packs, plan_steps=plan_steps, plan_kept=kept, vision_sq=vision_sq(source),
    )


def export_lengths_main(argv: list[str]) -> int:
    """`mmtrain lengths --out TABLE.csv [hydra overrides]`: the training source's length table
    (id, tiles, image_tokens, text_tokens; ids are the record ids), e.g. as input to `mmtrain pack`."""
    import argparse
    import csv

    from mmtrain.config import compose
    from mmtrain.models.config import tokens_per_tile

    ap = argparse.ArgumentParser(prog="mmtrain lengths", description=export_lengths_main.__doc__)
    ap.add_argument("--out", required=True)
    ap.add_argument("overrides", nargs="*", help="Hydra overrides, as for python -m mmtrain.train")
    args = ap.parse_args(argv)
    cfg = compose(args.overrides)
    tpt = tokens_per_tile(cfg.model)
    src = build_source(cfg, tpt)
    tiles = np.asarray(src.tiles, dtype=np.int64)
    text = np.asarray(src.text_tokens, dtype=np.int64)
    with open(args.out, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "tiles", "image_tokens", "text_tokens"])
        for rid, t, x in zip(src.ids, tiles.tolist(), text.tolist()):
            w.writerow([rid, t, t * tpt, x])
    print(f"wrote {len(tiles)} rows to {args.out}")
    return 0


def tool_config(source: str | None, overrides: list[str], flags: list[str]) -> MMTrainConfig:
    """The training config a tool (`mmtrain simulate`, `mmtrain pack`) works on: SOURCE as the data
    (a length table -> data=lengths, `synthetic:...` -> data=synthetic_tiles), then the Hydra
    overrides, then the tool's flags (already spelled as overrides; they win)."""
    from dataclasses import fields

    from mmtrain.config import compose

    words: list[str] = []
    if source:
        if source.startswith("synthetic"):
            from mmtrain.data.sources.synthetic import parse_spec

            spec, extra = parse_spec(source)
            if extra:
                raise ValueError(f"{source}: {sorted(extra)} come from the model config here (model=...)")
            words += ["data=synthetic_tiles"] + [f"data.{f.name}={getattr(spec, f.name)}" for f in fields(spec)]
        else:
            words += ["data=lengths", f"data.source={source}"]
    return compose(words + list(overrides) + list(flags))


def split_source(words: list[str]) -> tuple[str | None, list[str]]:
    """(SOURCE, overrides): the first word without '=' is the source."""
    source = None
    rest = []
    for w in words:
        if source is None and "=" not in w:
            source = w
        else:
            rest.append(w)
    return source, rest
