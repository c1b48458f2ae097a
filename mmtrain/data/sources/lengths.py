"""Length tables (CSV / Parquet / NPY with `image_tokens`, `text_tokens`, optional `tiles`, `id`).

The columns are used as-is: no accounting, no tokenizer. Loading is the packing component's
`load_length_table`, so analysis and packing read a table the same way.
"""

from __future__ import annotations

import numpy as np

from mmtrain.data.sources.base import ErrorLog, ScanOptions, ScanResult, Source

LENGTH_TABLE_EXTS = (".csv", ".parquet", ".pq", ".npy")


class LengthTableSource(Source):
    kind = "length-table"

    def __init__(self, path: str) -> None:
        self.path = path

    def describe(self) -> str:
        return f"length table {self.path}"

    def load(self):
        from mmtrain.data.lengths import load_length_table

        return load_length_table(self.path)

    def scan(self, options: ScanOptions | None = None) -> ScanResult:
        table = self.load()
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
            notes=["length table: columns used as-is (accounting and tokenizer options ignored)"],
        )
