"""The seed's synthetic 1-20-tile data as a Source: length columns for analysis, samples for training
(`data=synthetic_tiles`), both from the one generator in `mmtrain.data.synthetic`.

Addressed on the command line as `synthetic:KEY=VALUE,...` with the fields of SyntheticTilesSpec
(`num_samples`, `min_tiles`, `max_tiles`, `tile_distribution`, `min_text_tokens`,
`max_text_tokens`, `seed`) plus `image_size` (pixels per tile side, for iteration) and
`tokens_per_tile` (default: the accounting's tokens per tile); `synthetic:1000` is short for
`num_samples=1000`.
"""

from __future__ import annotations

from dataclasses import fields
from typing import Any

import numpy as np

from mmtrain.data import synthetic
from mmtrain.data.sources.base import ErrorLog, ScanOptions, ScanResult, Source


def parse_spec(text: str) -> tuple[synthetic.SyntheticTilesSpec, dict[str, int]]:
    """SyntheticTilesSpec and extra options from `num_samples=...,seed=...` (or a bare count)."""
    body = text.split(":", 1)[1] if text.startswith("synthetic:") else text
    spec_fields = {f.name: f.type for f in fields(synthetic.SyntheticTilesSpec)}
    kwargs: dict[str, Any] = {}
    extra: dict[str, int] = {}
    for item in filter(None, (p.strip() for p in body.split(","))):
        key, eq, value = item.partition("=")
        if not eq:
            key, value = "num_samples", item
        key = key.strip().replace("-", "_")
        if key == "distribution":
            key = "tile_distribution"
        if key in ("image_size", "tokens_per_tile"):
            extra[key] = int(value)
        elif key == "tile_distribution":
            kwargs[key] = value.strip()
        elif key in spec_fields:
            kwargs[key] = int(value)
        else:
            known = sorted(spec_fields) + ["image_size", "tokens_per_tile"]
            raise ValueError(f"unknown synthetic option {key!r}; known: {known}")
    kwargs.setdefault("num_samples", 1000)
    return synthetic.SyntheticTilesSpec(**kwargs), extra


class SyntheticSource(Source):
    kind = "synthetic"

    def __init__(
        self,
        spec: synthetic.SyntheticTilesSpec | str,
        image_size: int = 28,
        tokens_per_tile: int | None = None,
        vocab_size: int = synthetic.FIRST_TEXT_ID + 1024,
        channels: int = 3,
    ) -> None:
        extra: dict[str, int] = {}
        if isinstance(spec, str):
            spec, extra = parse_spec(spec)
        self.spec = spec
        self.image_size = extra.get("image_size", image_size)
        self.tokens_per_tile = extra.get("tokens_per_tile", tokens_per_tile)
        self.vocab_size = vocab_size
        self.channels = channels
        self._shapes: tuple[np.ndarray, np.ndarray] | None = None

    def describe(self) -> str:
        return f"synthetic tiles {self.spec}"

    def scan(self, options: ScanOptions | None = None) -> ScanResult:
        opt = (options or ScanOptions()).resolved()
        per_tile = self.tokens_per_tile or opt.accounting.tile_tokens
        image = self.tiles * np.int64(per_tile)
        return ScanResult(
            ids=self.ids,
            image_tokens=image,
            text_tokens=self.text_tokens,
            total_tokens=image + self.text_tokens,
            tiles=self.tiles,
            errors=ErrorLog(),
            num_scanned=self.spec.num_samples,
            notes=[f"synthetic: {per_tile} tokens per tile; text has no placeholder token"],
        )

    # ---- training ------------------------------------------------------------------------------
    def __len__(self) -> int:
        return self.spec.num_samples

    @property
    def ids(self) -> list[str]:
        return [str(i) for i in range(self.spec.num_samples)]

    def _shape_arrays(self) -> tuple[np.ndarray, np.ndarray]:
        if self._shapes is None:
            self._shapes = synthetic.sample_shapes(self.spec)
        return self._shapes

    @property
    def tiles(self) -> np.ndarray:
        return self._shape_arrays()[0]

    @property
    def text_tokens(self) -> np.ndarray:
        return self._shape_arrays()[1]

    def sample(self, index: int, with_pixels: bool, keep_tokens: int | None = None):
        from mmtrain.steps.batch import Sample

        if self.tokens_per_tile is None:
            raise ValueError("SyntheticSource: training needs tokens_per_tile (the model's image tokens per tile)")
        text, _ = synthetic.sample_text(self.spec, index, self.vocab_size)
        tiles = int(self.tiles[index])
        image_tokens = tiles * self.tokens_per_tile
        if keep_tokens is not None:  # packing.oversize_policy=truncate cuts text, never the image
            text = text[: max(keep_tokens - image_tokens, 1)]
        pixels = synthetic.sample_pixels(self.spec, index, self.image_size, self.channels) if with_pixels else None
        return Sample(sample_id=index, text=text, pixels=pixels, tiles=tiles, image_tokens=image_tokens)
