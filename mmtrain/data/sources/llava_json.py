"""LLaVA-format JSON / JSONL: `id`, `image` (path under an image root), `conversations`.

Why this layout of work: parsing JSON and counting text is cheap and stays in this process; the
image headers are the slow part and go to `scan_sizes` (a thread pool) in one batch.
"""

from __future__ import annotations

import json
import os
from typing import Any, Iterator

from mmtrain.data.image_headers import scan_sizes
from mmtrain.data.sources.base import ScanBuilder, ScanOptions, ScanResult, Source, progress_bar
from mmtrain.data.text import count_conversation

MALFORMED_JSON = "malformed_json"
MALFORMED_RECORD = "malformed_record"
MISSING_PLACEHOLDER = "missing_placeholder"
UNEXPECTED_PLACEHOLDER = "unexpected_placeholder"
MULTIPLE_IMAGES = "multiple_images"


def read_records(path: str, errors_out: list[tuple[str, str]] | None = None) -> Iterator[tuple[str, Any]]:
    """(fallback id, record) pairs of a JSON array or a JSONL file; bad lines go to `errors_out`.

    The fallback id (for records without an `id`) is where the record is: `file:line` in JSONL,
    `file[index]` in a JSON array."""
    name = os.path.basename(path)
    with open(path, "rb") as f:
        head = f.read(4096).lstrip()
    if head.startswith(b"["):
        try:
            with open(path, "rb") as f:
                records = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            if errors_out is not None:
                errors_out.append((MALFORMED_JSON, f"{name}: {e}"))
            return
        for i, rec in enumerate(records):
            yield f"{name}[{i}]", rec
        return
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield f"{name}:{lineno}", json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError):
                if errors_out is not None:
                    errors_out.append((MALFORMED_JSON, f"{name}:{lineno}"))


def check_record(rec: Any, tokenizer, max_images: int) -> tuple[str | None, list[str], int, int]:
    """(error kind or None, image paths, text tokens, placeholders) of one record."""
    if not isinstance(rec, dict) or not isinstance(rec.get("conversations"), list):
        return MALFORMED_RECORD, [], 0, 0
    text, placeholders = count_conversation(tokenizer, rec["conversations"])
    image = rec.get("image")
    if image is None or image == "" or image == []:
        images: list[str] = []
    elif isinstance(image, str):
        images = [image]
    elif isinstance(image, list) and all(isinstance(p, str) for p in image):
        images = image
    else:
        return MALFORMED_RECORD, [], 0, 0
    if len(images) > max_images:
        return MULTIPLE_IMAGES, images, text, placeholders
    if placeholders < len(images):
        return MISSING_PLACEHOLDER, images, text, placeholders
    if placeholders > len(images):
        # more `<image>` than images: another image was expected where only one (or none) was given
        return (MULTIPLE_IMAGES if images else UNEXPECTED_PLACEHOLDER), images, text, placeholders
    return None, images, text, placeholders


class LlavaJsonSource(Source):
    kind = "llava-json"

    def __init__(self, path: str, image_root: str | None = None) -> None:
        self.path = path
        self.image_root = image_root if image_root is not None else os.path.dirname(os.path.abspath(path))

    def describe(self) -> str:
        return f"LLaVA JSON {self.path} (images under {self.image_root})"

    def __iter__(self) -> Iterator[dict[str, Any]]:
        """Raw records with absolute image paths (bad JSON lines skipped)."""
        for fallback, rec in read_records(self.path):
            if isinstance(rec, dict):
                rec = dict(rec, id=rec.get("id", fallback))
                if isinstance(rec.get("image"), str):
                    rec["image_path"] = os.path.join(self.image_root, rec["image"])
            yield rec

    def scan(self, options: ScanOptions | None = None) -> ScanResult:
        opt = (options or ScanOptions()).resolved()
        out = ScanBuilder()
        bad_lines: list[tuple[str, str]] = []
        pending: list[tuple[str, list[str], int, int]] = []  # id, paths, text, placeholders
        for fallback, rec in read_records(self.path, bad_lines):
            sid = rec.get("id", fallback) if isinstance(rec, dict) else fallback
            err, images, text, ph = check_record(rec, opt.tokenizer, opt.max_images)
            if err is not None:
                out.error(err, sid)
            else:
                pending.append((str(sid), [os.path.join(self.image_root, p) for p in images], text, ph))
        for kind, sid in bad_lines:
            out.error(kind, sid)

        paths = [p for _, ps, _, _ in pending for p in ps]
        with progress_bar(len(paths), "image headers", opt.progress and len(paths) > 2000) as bar:
            w, h, errs = scan_sizes(paths, workers=opt.workers, progress=bar.update)
        tokens, tiles = opt.accounting.image_tokens_array(w, h)
        k = 0
        for sid, ps, text, ph in pending:
            n = len(ps)
            err = next((e for e in errs[k : k + n] if e is not None), None)
            if err is not None:
                out.error(err, sid)
            else:
                out.add(sid, int(tokens[k : k + n].sum()), text, ph, int(tiles[k : k + n].sum()))
            k += n
        return out.finish([f"text tokens: {opt.tokenizer.name} tokenizer over conversation values"])
