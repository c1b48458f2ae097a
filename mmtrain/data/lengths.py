"""Per-sample length tables (CSV / Parquet / NPY): what packing and balancing need, no pixels.

Columns: `text_tokens`, and `image_tokens` or `tiles` or both; optional `id` (row number if absent).
Without `image_tokens`, image tokens are tiles x `tokens_per_tile` (the caller's model); without
`tiles`, tiles are zeros. Integer ids are kept as int64; any other id column (e.g. "GCC_train_002582585") is kept as an
object array of str. CSV goes through pyarrow when installed (1M rows in well under a second), else a numpy
fast path for plain integer CSV.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

REQUIRED = ("text_tokens",)


@dataclass
class LengthTable:
    image_tokens: np.ndarray
    text_tokens: np.ndarray
    tiles: np.ndarray
    ids: np.ndarray
    source: str = ""
    has_tiles: bool = True  # the table had a `tiles` column
    has_image_tokens: bool = True  # the table had an `image_tokens` column

    def __len__(self) -> int:
        return len(self.text_tokens)

    @property
    def lengths(self) -> np.ndarray:
        return self.image_tokens + self.text_tokens

    @property
    def total_tokens(self) -> np.ndarray:
        """Per-sample decoder tokens (image + text), int64; same values as `lengths` (use
        `.sum()` for the table total)."""
        return self.image_tokens + self.text_tokens

    def fingerprint(self) -> str:
        from mmtrain.packing.plan_file import fingerprint

        return fingerprint(self.image_tokens, self.text_tokens, self.tiles)


def _from_columns(cols: dict, path: Path, tokens_per_tile: int | None) -> LengthTable:
    missing = [c for c in REQUIRED if c not in cols]
    if missing or not ({"image_tokens", "tiles"} & set(cols)):
        raise ValueError(f"{path}: found columns {sorted(cols)}; a length table needs text_tokens and image_tokens "
                         "and/or tiles (optional id)")
    n = len(cols["text_tokens"])
    arr = {k: _int_column(v, k, path) for k, v in cols.items() if k in ("image_tokens", "text_tokens", "tiles")}
    if "id" in cols:
        arr["id"] = _id_column(cols["id"])
    for k, a in arr.items():
        if len(a) != n:
            raise ValueError(f"{path}: column {k} has {len(a)} rows, text_tokens has {n}")
        if len(a) and k != "id" and a.min() < 0:
            raise ValueError(f"{path}: column {k} has a negative value at row {int(np.argmin(a))}")
    tiles = arr.get("tiles", np.zeros(n, np.int64))
    ids = arr.get("id", np.arange(n, dtype=np.int64))
    image = arr.get("image_tokens")
    if image is None:
        if tokens_per_tile is None:
            raise ValueError(f"{path}: no image_tokens column; image tokens are tiles x tokens per tile, which the "
                             "model decides (pass the training config's model, e.g. model=tiny)")
        image = tiles * np.int64(tokens_per_tile)
    return LengthTable(image, arr["text_tokens"], tiles, ids, str(path), "tiles" in arr, "image_tokens" in arr)


def _int_column(v, name: str, path: Path) -> np.ndarray:
    a = np.asarray(v)
    if a.dtype.kind not in "iub":
        try:
            a = a.astype(np.int64)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{path}: column {name} must be integer, got {a.dtype} ({e})") from None
    return a.astype(np.int64, copy=False)


def _id_column(v) -> np.ndarray:
    """int64 when every id is an integer, else an object array of str (never coerced to numbers)."""
    a = np.asarray(v)
    if a.dtype.kind in "iub":
        return a.astype(np.int64, copy=False)
    if a.dtype.kind == "f" and np.all(np.isfinite(a)) and np.all(a == np.round(a)):
        return a.astype(np.int64)
    out = np.empty(len(a), dtype=object)
    out[:] = [x.decode() if isinstance(x, bytes) else str(x) for x in a.tolist()]
    return out


def _read_csv(path: Path) -> dict:
    try:
        import pyarrow.csv as pacsv
    except ImportError:
        pacsv = None
    if pacsv is not None:
        t = pacsv.read_csv(path)
        return {name: t.column(name).to_numpy() for name in t.column_names}
    raw = path.read_bytes()
    head, _, body = raw.partition(b"\n")
    names = [h.strip().decode() for h in head.split(b",")]
    toks = body.replace(b",", b" ").split()
    if len(toks) % len(names):
        raise ValueError(f"{path}: {len(toks)} values is not a multiple of {len(names)} columns")
    try:
        vals = np.array(toks, dtype=np.int64).reshape(-1, len(names))
        return {n: vals[:, i] for i, n in enumerate(names)}
    except ValueError:  # a non-integer column (string ids): parse column by column
        cells = np.array([t.decode() for t in toks], dtype=object).reshape(-1, len(names))
        return {n: cells[:, i] for i, n in enumerate(names)}


def load_length_table(path, tokens_per_tile: int | None = None) -> LengthTable:
    """Read a table; `tokens_per_tile` makes image tokens from tiles when there is no image_tokens column."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"length table {path} does not exist")
    suffix = path.suffix.lower()
    if suffix in (".csv", ".txt"):
        return _from_columns(_read_csv(path), path, tokens_per_tile)
    if suffix in (".parquet", ".pq"):
        import pyarrow.parquet as pq

        t = pq.read_table(path)
        return _from_columns({n: t.column(n).to_numpy() for n in t.column_names}, path, tokens_per_tile)
    if suffix == ".npy":
        a = np.load(path, allow_pickle=False)
        if a.dtype.names:
            return _from_columns({n: a[n] for n in a.dtype.names}, path, tokens_per_tile)
        if a.ndim == 2 and a.shape[1] == 2:
            return _from_columns({"image_tokens": a[:, 0], "text_tokens": a[:, 1]}, path, tokens_per_tile)
        raise ValueError(f"{path}: NPY must be a structured array or an (n, 2) int array of image,text tokens; got {a.dtype} {a.shape}")
    raise ValueError(f"{path}: unsupported length table format {suffix!r} (csv, parquet, npy)")
