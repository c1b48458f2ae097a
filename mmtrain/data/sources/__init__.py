"""Data sources behind one interface (`Source.scan` -> per-sample token counts + error log).

`open_source(spec)` picks the reader from the path:
  synthetic:...            the seed's synthetic tiles (see synthetic_source)
  *.csv/.parquet/.npy      a length table, columns used as-is
  *.json / *.jsonl         LLaVA-format records, images under --image-root (default: the file's folder)
  *.tar, a brace/glob of tars, or a folder holding .tar files   WebDataset shards
  any other folder         a folder of images, one sample per file
"""

from __future__ import annotations

import glob
import os

from mmtrain.data.sources.base import ErrorLog, ScanOptions, ScanResult, Source
from mmtrain.data.sources.image_folder import ImageFolderSource
from mmtrain.data.sources.lengths import LENGTH_TABLE_EXTS, LengthTableSource
from mmtrain.data.sources.llava_json import LlavaJsonSource
from mmtrain.data.sources.synthetic import SyntheticSource
from mmtrain.data.sources.webdataset import WebDatasetSource

__all__ = [
    "ErrorLog",
    "ImageFolderSource",
    "LengthTableSource",
    "LlavaJsonSource",
    "ScanOptions",
    "ScanResult",
    "Source",
    "SyntheticSource",
    "WebDatasetSource",
    "open_source",
]


def open_source(spec: str, image_root: str | None = None) -> Source:
    """The Source for a path or spec string; raises FileNotFoundError / ValueError if none fits."""
    if spec.startswith("synthetic:") or spec == "synthetic":
        return SyntheticSource(spec)
    lower = spec.lower()
    if lower.endswith(LENGTH_TABLE_EXTS):
        _must_exist(spec)
        return LengthTableSource(spec)
    if lower.endswith((".json", ".jsonl")):
        _must_exist(spec)
        return LlavaJsonSource(spec, image_root)
    if lower.endswith(".tar") or "{" in spec or any(c in spec for c in "*?["):
        if not os.path.exists(spec) and not glob.glob(spec) and "{" not in spec:
            raise FileNotFoundError(f"no shards match {spec!r}")
        return WebDatasetSource(spec)
    if os.path.isdir(spec):
        if glob.glob(os.path.join(spec, "*.tar")):
            return WebDatasetSource(spec)
        return ImageFolderSource(spec)
    _must_exist(spec)
    raise ValueError(f"cannot tell what kind of source {spec!r} is (json/jsonl, csv/parquet/npy, tar, folder, synthetic:)")


def _must_exist(path: str) -> None:
    if not os.path.exists(path):
        raise FileNotFoundError(f"no such file: {path}")
