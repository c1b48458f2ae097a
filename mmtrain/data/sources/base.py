"""The one Source protocol, for analysis and for training.

Analysis: `scan()` hands per-sample token counts plus a log of bad samples. Why a single result
type: the statistics, the report and the packer's length tables must not care whether counts came
from JSON + image headers, tar shards, a length table or the synthetic generator. Samples with an
error are logged (count + first ids per kind) and left out of the arrays.

Training: a source that `python -m mmtrain.train` can read also has the members of
`TRAINING_MEMBERS` (see `Source`): record ids, the shapes the step assembler packs and balances
(no pixels, no token ids), and `sample()` for the content of one sample when a step needs it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np

FIRST_IDS = 10  # ids kept per error kind


@dataclass
class ErrorLog:
    """Bad samples by kind: how many, and the first few ids (in scan order)."""

    counts: dict[str, int] = field(default_factory=dict)
    first_ids: dict[str, list[str]] = field(default_factory=dict)

    def add(self, kind: str, sample_id: Any) -> None:
        self.counts[kind] = self.counts.get(kind, 0) + 1
        ids = self.first_ids.setdefault(kind, [])
        if len(ids) < FIRST_IDS:
            ids.append(str(sample_id))

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return {k: {"count": self.counts[k], "first_ids": self.first_ids[k]} for k in sorted(self.counts)}


@dataclass
class ScanResult:
    """Token counts of the good samples; `num_scanned` also counts the ones with errors."""

    ids: Any  # list of str, or an array for length tables
    image_tokens: np.ndarray
    text_tokens: np.ndarray
    total_tokens: np.ndarray
    tiles: np.ndarray
    errors: ErrorLog
    num_scanned: int
    notes: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.image_tokens)


class ScanBuilder:
    """Collects per-sample rows; `finish()` turns them into a ScanResult."""

    def __init__(self) -> None:
        self.ids: list[str] = []
        self.image: list[int] = []
        self.text: list[int] = []
        self.placeholders: list[int] = []
        self.tiles: list[int] = []
        self.errors = ErrorLog()
        self.scanned = 0

    def add(self, sample_id: Any, image_tokens: int, text_tokens: int, placeholders: int, tiles: int) -> None:
        self.scanned += 1
        self.ids.append(str(sample_id))
        self.image.append(image_tokens)
        self.text.append(text_tokens)
        self.placeholders.append(placeholders)
        self.tiles.append(tiles)

    def error(self, kind: str, sample_id: Any) -> None:
        self.scanned += 1
        self.errors.add(kind, sample_id)

    def finish(self, notes: list[str] | None = None) -> ScanResult:
        image = np.asarray(self.image, dtype=np.int64)
        text = np.asarray(self.text, dtype=np.int64)
        total = text + image - np.asarray(self.placeholders, dtype=np.int64)
        return ScanResult(
            ids=self.ids,
            image_tokens=image,
            text_tokens=text,
            total_tokens=total,
            tiles=np.asarray(self.tiles, dtype=np.int64),
            errors=self.errors,
            num_scanned=self.scanned,
            notes=list(notes or []),
        )


@dataclass
class ScanOptions:
    """How a scan counts tokens and how it runs."""

    accounting: Any = None  # TokenAccounting; None = defaults
    tokenizer: Any = None  # TokenCounter; None = byte-level default
    workers: int | None = None  # header-reading threads; None = image_headers.default_workers()
    progress: bool = True
    max_images: int = 1  # images allowed per sample before `multiple_images` is logged

    def resolved(self) -> "ScanOptions":
        from mmtrain.data.accounting import TokenAccounting
        from mmtrain.data.text import ByteTokenizer

        return ScanOptions(
            accounting=self.accounting or TokenAccounting(),
            tokenizer=self.tokenizer or ByteTokenizer(),
            workers=self.workers,
            progress=self.progress,
            max_images=self.max_images,
        )


TRAINING_MEMBERS = ("ids", "tiles", "text_tokens", "sample", "__len__")


class Source(ABC):
    """A data set that can be scanned for token counts, and, if training reads it:

    ids          list[str]: every sample's record id (what metrics, plan files and errors name)
    tiles        int64 [n]: fixed-size ViT tiles of each sample (0 = text only)
    text_tokens  int64 [n]: decoder text tokens of each sample
    sample(index, with_pixels, keep_tokens=None) -> mmtrain.steps.batch.Sample: the content of
                 sample `index` (pixels only when `with_pixels`; text cut to `keep_tokens` total
                 tokens when the packer truncated it)
    len(source)  the number of samples training sees
    Decoder length = tiles x the model's tokens per tile + text_tokens.
    """

    kind: str = "source"

    @abstractmethod
    def scan(self, options: ScanOptions | None = None) -> ScanResult:
        """Token counts of every sample, bad samples logged instead of raised."""

    def __iter__(self) -> Iterator[dict[str, Any]]:
        raise NotImplementedError(f"{type(self).__name__} cannot be iterated sample by sample")

    def describe(self) -> str:
        return self.kind


def check_trainable(source: Any, name: str) -> None:
    """Raise naming the missing members if `source` cannot feed training."""
    missing = [m for m in TRAINING_MEMBERS if not hasattr(source, m)]
    if missing:
        raise TypeError(f"data={name}: {type(source).__name__} cannot feed training (missing {', '.join(missing)})")
    n = len(source)
    if not (len(source.ids) == len(source.tiles) == len(source.text_tokens) == n):
        raise ValueError(f"data={name}: ids, tiles and text_tokens must each hold one entry per sample ({n})")


def progress_bar(total: int | None, desc: str, enabled: bool):
    """tqdm on stderr for long scans; a no-op object when disabled."""
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="img", disable=not enabled, mininterval=0.5, leave=False)
