"""The lengths training will see, from the training config (`mmtrain analyze --out DIR model=...
data=...`): the same source, tiling and tokens per tile as `python -m mmtrain.train` with those
overrides, so the statistics size `packing.seq_length` for the run itself. Native-resolution models
(Qwen2-VL): merged image tokens per image from the processor's smart resize, and the ViT sequence
length of every image (what packing.max_vision_patches_per_pack and the ViT cost term count).

Why not the file mode's accounting: a file scan counts tokens by its own flags (native resolution by
default), while training tiles each image at model.vision.image_size; on the same LLaVA files that
is a mean of 5204 tokens against 499.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np

from mmtrain.data.sources.base import ErrorLog, ScanResult


@dataclass
class TrainingView:
    """The scan of the training source plus what only the training config knows."""

    result: ScanResult
    description: str
    accounting: dict[str, Any]
    seq_length: int
    oversize_policy: str
    aspect_ratios: Optional[np.ndarray] = None  # width / height of every image; None for synthetic tiles
    notes: list[str] = field(default_factory=list)
    # native resolution: the ViT sequence length (t*h*w patches) of every image, and of every sample
    vit_patches_per_image: Optional[np.ndarray] = None
    vit_patches_per_sample: Optional[np.ndarray] = None


def training_view(overrides: list[str]) -> TrainingView:
    """Open the training source as training does and return its per-sample token counts."""
    from mmtrain.config import compose
    from mmtrain.models.config import is_native, tokens_per_tile
    from mmtrain.steps.from_config import build_source

    cfg = compose(overrides)
    tpt = tokens_per_tile(cfg.model)
    src = build_source(cfg, tpt)
    tiles = np.asarray(src.tiles, dtype=np.int64)
    text = np.asarray(src.text_tokens, dtype=np.int64)
    image = tiles * tpt
    ids = [str(i) for i in getattr(src, "ids", range(len(tiles)))]
    errors = ErrorLog()
    for sid, _file, reason in getattr(src, "skipped", []):
        errors.add(reason.split(" (")[0], sid)
    result = ScanResult(
        ids=ids, image_tokens=image, text_tokens=text, total_tokens=image + text, tiles=tiles, errors=errors,
        num_scanned=len(tiles) + errors.total,
        notes=["lengths as training computes them: " + ("merged image tokens of each image at native resolution "
               "(the processor's smart resize) + text tokens" if is_native(cfg.model) else "tiles x tokens per tile + text tokens")],
    )
    sizes = getattr(src, "sizes", None)
    aspect = None
    if sizes is not None:
        aspect = np.asarray([w / h for per_sample in sizes for (w, h) in per_sample if h > 0], dtype=np.float64)
    d, v = cfg.data, cfg.model.vision
    source = getattr(d, "source", None)
    where = f" {source}" if source else f" ({d.num_samples} samples, seed {d.seed})"
    if is_native(cfg.model):
        per_image = getattr(src, "vision_lengths", None) or [[] for _ in ids]
        acct = getattr(getattr(src, "images", None), "acct", None)
        accounting = {"mode": "training (native resolution)", "patch_size": v.patch_size,
                      "spatial_merge_size": v.spatial_merge_size, "temporal_patch_size": v.temporal_patch_size,
                      "tokens_per_tile": tpt, "vit_patches_per_token": v.spatial_merge_size**2}
        if acct is not None:
            accounting.update(min_pixels=acct.min_pixels, max_pixels=acct.max_pixels)
        return TrainingView(
            result=result, description=f"training config: data={d.name}{where}, model={cfg.model.name}",
            accounting=accounting, seq_length=int(cfg.packing.seq_length), oversize_policy=cfg.packing.oversize_policy,
            aspect_ratios=aspect,
            notes=[] if aspect is not None else ["a length table has no image sizes: no aspect-ratio plot"],
            vit_patches_per_image=np.asarray([n for imgs in per_image for n in imgs], dtype=np.int64),
            vit_patches_per_sample=np.asarray([sum(imgs) for imgs in per_image], dtype=np.int64),
        )
    return TrainingView(
        result=result,
        description=f"training config: data={d.name}{where}, model={cfg.model.name}",
        accounting={"mode": "training", "tile_size": v.image_size, "patch_size": v.patch_size,
                    "tokens_per_tile": tpt, **({"min_tiles": d.min_tiles, "max_tiles": d.max_tiles} if hasattr(d, "min_tiles") else {})},
        seq_length=int(cfg.packing.seq_length),
        oversize_policy=cfg.packing.oversize_policy,
        aspect_ratios=aspect,
        notes=[] if aspect is not None else ["synthetic tiles have no image sizes: no aspect-ratio plot"],
    )


def packing_stats(view: TrainingView) -> dict[str, Any]:
    """What the lengths mean for packing at packing.seq_length."""
    total = view.result.total_tokens
    L = view.seq_length
    over = np.flatnonzero(total > L)
    n = int(total.size)
    return {
        "seq_length": L,
        "over_seq_length": int(over.size),
        "over_seq_length_first_ids": [str(view.result.ids[i]) for i in over[:10]],
        "oversize_policy": view.oversize_policy,
        "lower_bound_packs": int(-(-int(total.sum()) // L)) if n else 0,
        # each sample padded to seq_length (the unpacked baseline); undefined while some do not fit
        "padding_if_unpacked": float(1.0 - total.mean() / L) if n and not over.size else None,
    }
