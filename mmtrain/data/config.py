"""Data schemas (`data=`): one per source type, each owning its own fields.

`data=synthetic_tiles | lengths | llava_json` selects the source and its schema (registered with
Hydra by `mmtrain.config.register_configs`), so a field of another source fails at composition
naming the key: `data=lengths data.num_samples=64` is an error, not a silently ignored setting.
Every schema extends `DataConfig`, the fields all sources share.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass
class DataConfig:
    """What every source has: its name, the seed of anything it generates, and the epoch order."""

    name: str = "synthetic_tiles"
    seed: int = 1234  # synthetic shapes and content (independent of trainer.seed, which drives shuffling/init)
    shuffle: bool = True


@dataclass
class SyntheticTilesData(DataConfig):
    """The seed's synthetic data: tiles per sample drawn from a distribution, each tile ->
    tokens_per_tile image tokens, plus random text."""

    name: str = "synthetic_tiles"
    num_samples: int = 256
    min_tiles: int = 1  # the tile distribution's range
    max_tiles: int = 20
    tile_distribution: str = "uniform"  # uniform | geometric
    min_text_tokens: int = 16
    max_text_tokens: int = 128


@dataclass
class LengthsData(DataConfig):
    """A length table (CSV / Parquet / NPY: id, tiles, text_tokens; image_tokens for native models)
    trained on synthetic content of its lengths."""

    name: str = "lengths"
    source: Optional[str] = None  # the table's path
    bad_sample_policy: str = "fail"  # fail | skip (rows without text tokens)


@dataclass
class LlavaJsonData(DataConfig):
    """LLaVA-format JSON / JSONL records with images on disk, through the model's tokenizer, chat
    template and image processor."""

    name: str = "llava_json"
    source: Optional[str] = None  # the .json / .jsonl file
    image_root: Optional[str] = None  # images are relative to this folder (default: the file's folder)
    # The tokenizer (a folder or tokenizer.json; None = model.pretrained's, else the byte-level one),
    # its chat template (None = the tokenizer's / processor's; a built-in name plain|vicuna|chatml, a
    # named template of the tokenizer, or a .jinja file) and the loss targets.
    tokenizer: Optional[str] = None
    chat_template: Optional[str] = None
    loss_on: str = "assistant"  # assistant (the answers the template marks) | all (every text token)
    # hf: model.pretrained's transformers image processor | tiles: dynamic tiling into
    # min_tiles..max_tiles tiles (+ a thumbnail tile when `thumbnail`). None = hf under model.pretrained.
    image_processor: Optional[str] = None
    min_tiles: int = 1  # the tiling's bounds (image_processor=tiles)
    max_tiles: int = 6
    thumbnail: bool = False
    bad_sample_policy: str = "fail"  # fail | skip: what a corrupt / missing sample does (counted and reported)
    # A held-out LLaVA JSON whose loss training logs after the last step and every
    # trainer.eval_interval steps (images under validation_image_root, default: its own folder).
    validation_source: Optional[str] = None
    validation_image_root: Optional[str] = None


SOURCES = {"synthetic_tiles": SyntheticTilesData, "lengths": LengthsData, "llava_json": LlavaJsonData}
