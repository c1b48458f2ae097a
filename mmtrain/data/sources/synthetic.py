"""The seed's synthetic 1-20-tile data as a Source: length columns for analysis, tensors for training.

Addressed on the command line as `synthetic:KEY=VALUE,...` with the fields of SyntheticTilesSpec
(`num_samples`, `min_tiles`, `max_tiles`, `tile_distribution`, `min_text_tokens`,
`max_text_tokens`, `seed`) plus `image_size` (pixels per tile side, for iteration) and
`tokens_per_tile` (default: the accounting's tokens per tile); `synthetic:1000` is short for
`num_samples=1000`.
"""

from __future__ import annotations

from dataclasses import fields
from typing import Any, Iterator

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
    ) -> None:
        extra: dict[str, int] = {}
        if isinstance(spec, str):
            spec, extra = parse_spec(spec)
        self.spec = spec
        self.image_size = extra.get("image_size", image_size)
        self.tokens_per_tile = extra.get("tokens_per_tile", tokens_per_tile)
        self.vocab_size = vocab_size

    def describe(self) -> str:
        return f"synthetic tiles {self.spec}"

    def scan(self, options: ScanOptions | None = None) -> ScanResult:
        opt = (options or ScanOptions()).resolved()
        per_tile = self.tokens_per_tile or opt.accounting.tile_tokens
        cols = synthetic.length_table_columns(self.spec, per_tile)
        return ScanResult(
            ids=[str(i) for i in cols["id"]],
            image_tokens=cols["image_tokens"],
            text_tokens=cols["text_tokens"],
            total_tokens=cols["image_tokens"] + cols["text_tokens"],
            tiles=cols["tiles"],
            errors=ErrorLog(),
            num_scanned=self.spec.num_samples,
            notes=[f"synthetic: {per_tile} tokens per tile; text has no placeholder token"],
        )

    def __iter__(self) -> Iterator[dict[str, Any]]:
        """Training samples: `pixels` float32 tensor [tiles, 3, S, S] and `text` int64 token ids."""
        import torch

        for i in range(self.spec.num_samples):
            text, _ = synthetic.sample_text(self.spec, i, vocab_size=self.vocab_size)
            pixels = synthetic.sample_pixels(self.spec, i, self.image_size)
            yield {"id": i, "tiles": pixels.shape[0], "pixels": torch.from_numpy(pixels), "text": torch.from_numpy(text)}
