"""Packing schema (`packing=`): capacity, buffer, algorithm, alignment, oversize policy, plan file."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional


@dataclass
class PackingConfig:
    enabled: bool = True
    seq_length: int = 512  # pack capacity in decoder tokens (image tokens after expansion included)
    # Samples per online packing buffer. None = 1000 samples, or what the balancing window needs if
    # more; under strict_equivalence a step's samples are its buffer.
    buffer_size: Optional[int] = None
    algorithm: str = "default"
    max_tiles_per_pack: Optional[int] = None  # cap on ViT tiles per pack (ViT memory); None = no cap
    # Cap on ViT patches per pack (ViT memory and attention work; None = no cap): a native image
    # counts its t*h*w patches, a tile its ViT sequence (patches + CLS). Every packer path enforces
    # it (mmtrain.steps.from_config.vision_unit_cap); a sample over it follows oversize_policy.
    max_vision_patches_per_pack: Optional[int] = None
    align: int = 1  # pad each pack to a multiple of this (TP/SP/CP/FP8 divisibility)
    segment_align: int = 1  # pad each sample segment to a multiple of this (CP: 2*cp; FP8: 16)
    oversize_policy: str = "error"  # error | truncate | drop
    # unpacked runs: "seq_length" pads every sample to packing.seq_length (the seed's baseline);
    # "none" runs each sample at its own length.
    pad_unpacked_to: str = "seq_length"
    # packed runs: "seq_length" pads every pack to packing.seq_length (a static token count, for
    # perf.compile and fixed pipeline shapes); null pads only to packing.align.
    pad_to: Optional[str] = None
    plan: Optional[str] = None  # offline PLAN.jsonl from `mmtrain pack`; None = online packing
    # carry under-filled packs into the next buffer (better fill). None = on, off under strict_equivalence.
    carry_over: Optional[bool] = None
    # Strict-equivalence mode: a step is trainer.global_batch_size *samples* (as without packing),
    # packed among themselves, so packed and unpacked runs give the same losses. Off: a step is
    # trainer.global_batch_size packs, balanced across steps (see README, Loss / step semantics).
    strict_equivalence: bool = False
    max_images_per_pack: Optional[Any] = None  # renamed: packing.max_tiles_per_pack (setting it is an error)
