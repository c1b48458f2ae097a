"""Data schema (`data=`): which source, and how its samples are generated or read."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass
class DataConfig:
    name: str = "synthetic_tiles"  # synthetic_tiles | lengths | llava_json
    num_samples: int = 256
    min_tiles: int = 1
    max_tiles: int = 20
    tile_distribution: str = "uniform"  # uniform | geometric
    min_text_tokens: int = 16
    max_text_tokens: int = 128
    seed: int = 1234  # synthetic shapes and content (independent of trainer.seed, which drives shuffling/init)
    shuffle: bool = True
    # fail | skip: what a corrupt/missing sample does during training (skips are counted in metrics)
    bad_sample_policy: str = "fail"
    source: Optional[str] = None  # path for file-backed sources (llava json, length table)
    image_root: Optional[str] = None
