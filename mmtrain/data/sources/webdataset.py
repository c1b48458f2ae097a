"""WebDataset tar shards as Megatron-LM's LLaVA converter writes them: `KEY.jpg` + `KEY.json`.

The json member holds the conversations list (or a dict with `conversations`). Shards are read with
plain `tarfile` in streaming mode (members of one sample are consecutive, as webdataset requires),
one shard per pool thread (reads release the GIL); the image size comes from the in-memory bytes' header.
"""

from __future__ import annotations

import glob
import json
import os
import re
import tarfile
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Iterator

from mmtrain.data.image_headers import MISSING, ImageError, default_workers, image_size_from_bytes
from mmtrain.data.sources.base import ScanBuilder, ScanOptions, ScanResult, Source, progress_bar
from mmtrain.data.sources.llava_json import MALFORMED_JSON, check_record

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "gif", "bmp", "ppm", "tif", "tiff")
CORRUPT_SHARD = "corrupt_shard"


def expand_shards(spec: str) -> list[str]:
    """A directory, a glob, a single tar, or a brace range like `shard-{000..009}.tar`."""
    if os.path.isdir(spec):
        return sorted(glob.glob(os.path.join(spec, "**", "*.tar"), recursive=True))
    m = re.search(r"\{(\d+)\.\.(\d+)\}", spec)
    if m:
        lo, hi, width = int(m.group(1)), int(m.group(2)), len(m.group(1))
        return [spec[: m.start()] + str(i).zfill(width) + spec[m.end() :] for i in range(lo, hi + 1)]
    if any(c in spec for c in "*?["):
        return sorted(glob.glob(spec))
    return [spec]


def _split(name: str) -> tuple[str, str]:
    """webdataset's rule: the key is the path up to the first dot of the basename."""
    d, base = os.path.split(name)
    stem, _, ext = base.partition(".")
    return os.path.join(d, stem) if d else stem, ext.lower()


def iter_tar_samples(path: str) -> Iterator[dict[str, Any]]:
    """{'__key__', ext: bytes, ...} per sample, in tar order; a broken tar raises tarfile.TarError."""
    current: dict[str, Any] | None = None
    with tarfile.open(path, "r|*") as tar:
        for member in tar:
            if not member.isfile():
                continue
            key, ext = _split(member.name)
            if current is not None and current["__key__"] != key:
                yield current
                current = None
            if current is None:
                current = {"__key__": key}
            f = tar.extractfile(member)
            current[ext] = f.read() if f is not None else b""
    if current is not None:
        yield current


def _read_shard(path: str) -> tuple[list[tuple[str, int, int, str | None, bytes | None]], str | None]:
    """(key, width, height, image error, json bytes) per sample, plus a shard error if the tar broke."""
    rows: list[tuple[str, int, int, str | None, bytes | None]] = []
    try:
        for sample in iter_tar_samples(path):
            key = f"{os.path.basename(path)}/{sample['__key__']}"
            image = next((sample[e] for e in IMAGE_EXTS if e in sample), None)
            w = h = 0
            err = None
            if image is None:
                err = MISSING
            else:
                try:
                    w, h = image_size_from_bytes(image)
                except ImageError as e:
                    err = e.kind
            rows.append((key, w, h, err, sample.get("json")))
    except (tarfile.TarError, OSError, EOFError) as e:
        return rows, f"{type(e).__name__}: {e}"
    return rows, None


class WebDatasetSource(Source):
    kind = "webdataset"

    def __init__(self, spec: str) -> None:
        self.spec = spec
        self.shards = expand_shards(spec)

    def describe(self) -> str:
        return f"WebDataset {self.spec} ({len(self.shards)} shards)"

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for shard in self.shards:
            yield from iter_tar_samples(shard)

    def scan(self, options: ScanOptions | None = None) -> ScanResult:
        opt = (options or ScanOptions()).resolved()
        out = ScanBuilder()
        workers = default_workers() if opt.workers is None else max(1, opt.workers)
        if workers > 1 and len(self.shards) > 1:
            pool = ThreadPoolExecutor(max_workers=min(workers, len(self.shards)))
            results = pool.map(_read_shard, self.shards)
        else:
            pool, results = None, map(_read_shard, self.shards)
        try:
            with progress_bar(len(self.shards), "shards", opt.progress and len(self.shards) > 1) as bar:
                for shard, (rows, shard_err) in zip(self.shards, results):
                    for key, w, h, img_err, raw in rows:
                        self._add(out, opt, key, w, h, img_err, raw)
                    if shard_err is not None:
                        out.errors.add(CORRUPT_SHARD, os.path.basename(shard))
                    bar.update(1)
        finally:
            if pool is not None:
                pool.shutdown()
        return out.finish([f"text tokens: {opt.tokenizer.name} tokenizer over conversation values"])

    @staticmethod
    def _add(out: ScanBuilder, opt: ScanOptions, key: str, w: int, h: int, img_err: str | None, raw) -> None:
        if raw is None:
            out.error(MALFORMED_JSON, key)
            return
        try:
            doc = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError):
            out.error(MALFORMED_JSON, key)
            return
        convs = doc if isinstance(doc, list) else doc.get("conversations") if isinstance(doc, dict) else None
        if img_err == MISSING:
            out.error(MISSING, key)
            return
        record = {"conversations": convs, "image": "<tar member>"}
        err, _, text, ph = check_record(record, opt.tokenizer, opt.max_images)
        if err is None and img_err is not None:
            err = img_err
        if err is not None:
            out.error(err, key)
            return
        tokens, tiles = opt.accounting.image_tokens_array([w], [h])
        out.add(key, int(tokens[0]), text, ph, int(tiles[0]))
