"""Length tables (CSV / Parquet / NPY with `text_tokens` and `tiles` and/or `image_tokens`, optional `id`).

Analysis (`scan`): the columns are used as-is, no accounting, no tokenizer; loading is the
packing component's `load_length_table`, so analysis and packing read a table the same way.

Training (`data=lengths data.source=T.csv`): synthetic content shaped by the table, so the schedule
can be tried on the distribution of a data set before its images exist. Each row is a sample of
`tiles` tiles (image tokens = tiles x the model's tokens per tile; an `image_tokens` column is not
used, since the model decides what a tile becomes) and `text_tokens` learnable synthetic text
(`mmtrain.data.synthetic`, keyed by data.seed and the row). Record ids are the `id` column (row
numbers without one). Native-resolution models (`native=(m, patch values)`): each row with image
tokens is one image of `image_tokens` merged tokens (m^2 ViT patches each; an `image_tokens` column
is needed), as a still frame of a near-square grid of those tokens, random patches. Rows training cannot use (no text tokens) fail naming their ids, or are left
out and counted with data.bad_sample_policy=skip.
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from mmtrain.data.sources.base import ErrorLog, ScanOptions, ScanResult, Source

LENGTH_TABLE_EXTS = (".csv", ".parquet", ".pq", ".npy")


class LengthTableSource(Source):
    kind = "length-table"

    def __init__(
        self,
        path: str,
        *,
        tokens_per_tile: Optional[int] = None,
        image_size: int = 28,
        channels: int = 3,
        vocab_size: int = 1026,
        seed: int = 1234,
        bad_sample_policy: str = "fail",
        native: Optional[tuple[int, int]] = None,
    ) -> None:
        self.path = path
        self.native = native  # (spatial_merge_size, values per flattened patch) of a native ViT
        self.tokens_per_tile = tokens_per_tile
        self.image_size = image_size
        self.channels = channels
        self.vocab_size = vocab_size
        self.seed = seed
        self.policy = bad_sample_policy
        self._table = None
        self._rows: Optional[np.ndarray] = None  # table rows training uses
        self.skipped: list[tuple[str, str, str]] = []  # (record id, file, reason)

    def describe(self) -> str:
        return f"length table {self.path}"

    def load(self, tokens_per_tile: Optional[int] = None):
        from mmtrain.data.lengths import load_length_table

        if self._table is None:
            # training never reads image_tokens (tiles x the model's tokens per tile), so any value does
            self._table = load_length_table(self.path, tokens_per_tile if tokens_per_tile else self.tokens_per_tile or 0)
        return self._table

    def scan(self, options: ScanOptions | None = None) -> ScanResult:
        opt = (options or ScanOptions()).resolved()
        table = self.load(self.tokens_per_tile or opt.accounting.tile_tokens)
        image = np.asarray(table.image_tokens, dtype=np.int64)
        text = np.asarray(table.text_tokens, dtype=np.int64)
        return ScanResult(
            ids=table.ids,  # kept as loaded (an array): turning 1M ids into str costs more than the stats
            image_tokens=image,
            text_tokens=text,
            total_tokens=np.asarray(table.lengths, dtype=np.int64),  # per-sample image + text
            tiles=np.asarray(table.tiles, dtype=np.int64),
            errors=ErrorLog(),
            num_scanned=len(image),
            notes=["length table: columns used as-is (accounting and tokenizer options ignored)"
                   if table.has_image_tokens else "length table: image tokens = tiles x tokens per tile"],
        )

    # ---- training ------------------------------------------------------------------------------
    def _training_rows(self) -> np.ndarray:
        if self._rows is not None:
            return self._rows
        if self.policy not in ("fail", "skip"):
            raise ValueError(f"data.bad_sample_policy must be fail|skip, got {self.policy!r}")
        table = self.load()
        if self.native is not None and not table.has_image_tokens:
            raise ValueError(f"data.source={self.path}: a native-resolution model reads a length table's "
                             "`image_tokens` column (merged tokens of each sample's image, 0 = text only)")
        if self.native is None and not table.has_tiles:
            raise ValueError(f"data.source={self.path}: data=lengths needs a `tiles` column (tiles per sample, 0 = text "
                             "only); image tokens are tiles x the model's tokens per tile")
        text = np.asarray(table.text_tokens, dtype=np.int64)
        bad = np.flatnonzero(text < 1)
        if bad.size:
            ids = [str(table.ids[i]) for i in bad[:10]]
            if self.policy == "fail":
                raise ValueError(
                    f"data.source={self.path}: {bad.size} row(s) have no text tokens, so nothing to train on "
                    f"(record ids {', '.join(ids)}{' ...' if bad.size > 10 else ''}); fix the table or set "
                    "data.bad_sample_policy=skip to leave them out")
            self.skipped = [(str(table.ids[i]), "", "no text tokens") for i in bad]
        keep = np.ones(len(text), bool)
        keep[bad] = False
        self._rows = np.flatnonzero(keep)
        if not self._rows.size:
            raise ValueError(f"data.source={self.path}: no usable rows")
        return self._rows

    @property
    def skipped_samples(self) -> int:
        self._training_rows()
        return len(self.skipped)

    def __len__(self) -> int:
        return int(self._training_rows().size)

    @property
    def ids(self) -> list[str]:
        ids = self.load().ids
        return [str(ids[i]) for i in self._training_rows()]

    @property
    def tiles(self) -> np.ndarray:
        """Vision units per sample: tiles, or a native image's merged tokens."""
        t = self.load()
        return np.asarray(t.image_tokens if self.native is not None else t.tiles, dtype=np.int64)[self._training_rows()]

    @property
    def vision_lengths(self) -> Optional[list[list[int]]]:
        """Native: one image of units x m^2 ViT patches per sample with image tokens; None for tiles."""
        if self.native is None:
            return None
        m2 = self.native[0] ** 2
        return [[int(u) * m2] if u else [] for u in self.tiles.tolist()]

    @property
    def image_shape(self) -> tuple[int, ...]:
        return (self.native[1],) if self.native is not None else (self.channels, self.image_size, self.image_size)

    @property
    def text_tokens(self) -> np.ndarray:
        return np.asarray(self.load().text_tokens, dtype=np.int64)[self._training_rows()]

    def sample(self, index: int, with_pixels: bool, keep_tokens: Optional[int] = None):
        from mmtrain.data import synthetic
        from mmtrain.steps.batch import Sample

        if self.tokens_per_tile is None:
            raise ValueError("LengthTableSource: training needs tokens_per_tile (the model's image tokens per tile)")
        row = int(self._training_rows()[index])
        table = self.load()
        if self.native is not None:
            return self._native_sample(index, row, with_pixels, keep_tokens)
        tiles = int(table.tiles[row])
        image_tokens = tiles * self.tokens_per_tile
        text, stride = synthetic.text_ids(self.seed, row, int(table.text_tokens[row]), self.vocab_size)
        if keep_tokens is not None:  # packing.oversize_policy=truncate cuts text, never the image
            text = text[: max(keep_tokens - image_tokens, 1)]
        pixels = None
        if with_pixels:
            pixels = synthetic.tile_pixels(self.seed, row, tiles, stride, self.image_size, self.channels)
        return Sample(sample_id=index, text=text, pixels=pixels, tiles=tiles, image_tokens=image_tokens)

    def _native_sample(self, index: int, row: int, with_pixels: bool, keep_tokens: Optional[int]):
        from mmtrain.data import synthetic
        from mmtrain.steps.batch import Sample

        table = self.load()
        m, dim = self.native
        units = int(table.image_tokens[row])
        text, stride = synthetic.text_ids(self.seed, row, int(table.text_tokens[row]), self.vocab_size)
        if keep_tokens is not None:  # packing.oversize_policy=truncate cuts text, never the image
            text = text[: max(keep_tokens - units, 1)]
        grid = np.zeros((0, 3), np.int64)
        if units:
            rows = max(r for r in range(1, int(units**0.5) + 1) if units % r == 0)  # near-square
            grid = np.array([[1, rows * m, units // rows * m]], np.int64)
        pixels = None
        if with_pixels:
            rng = np.random.default_rng([self.seed, row, 2])
            pixels = rng.standard_normal((units * m * m, dim), dtype=np.float32) * 0.1
            pixels += np.float32(stride / synthetic.NUM_STRIDES - 0.5)
        return Sample(sample_id=index, text=text, pixels=pixels, tiles=units, image_tokens=units,
                      image_at=np.zeros(1 if units else 0, np.int64),
                      image_lengths=np.asarray([units] if units else [], np.int64), image_grid=grid)
