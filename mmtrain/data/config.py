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
    # LLaVA JSON text: the tokenizer (a folder or tokenizer.json; None = model.pretrained's, else the
    # byte-level one), its chat template (None = the tokenizer's / processor's; a built-in name
    # plain|vicuna|chatml, a named template of the tokenizer, or a .jinja file) and the loss targets.
    tokenizer: Optional[str] = None
    chat_template: Optional[str] = None
    loss_on: str = "assistant"  # assistant (the answers the template marks) | all (every text token)
    # hf: model.pretrained's transformers image processor, one tile per image | tiles: dynamic tiling
    # (min_tiles..max_tiles, + a thumbnail tile when `thumbnail`). None = hf under model.pretrained.
    image_processor: Optional[str] = None
    thumbnail: bool = False
    # A held-out LLaVA JSON whose loss training logs after the last step and every
    # trainer.eval_interval steps (images under validation_image_root, default: its own folder).
    validation_source: Optional[str] = None
    validation_image_root: Optional[str] = None
