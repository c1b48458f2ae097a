"""A folder of image files, one sample per file (no text): the quickest look at raw images.

Every regular, non-hidden file below the folder is a sample, so a stray non-image file shows up as
`not_an_image` rather than vanishing. Ids are paths relative to the folder.
"""

from __future__ import annotations

import os
from typing import Any, Iterator

from mmtrain.data.image_headers import scan_sizes
from mmtrain.data.sources.base import ScanBuilder, ScanOptions, ScanResult, Source, progress_bar


def list_files(root: str) -> list[str]:
    """Relative paths of all non-hidden files below `root`, sorted (deterministic ids)."""
    out: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        rel = os.path.relpath(dirpath, root)
        for name in filenames:
            if not name.startswith("."):
                out.append(name if rel == "." else os.path.join(rel, name))
    return sorted(out)


class ImageFolderSource(Source):
    kind = "image-folder"

    def __init__(self, root: str) -> None:
        self.root = root

    def describe(self) -> str:
        return f"image folder {self.root}"

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for rel in list_files(self.root):
            yield {"id": rel, "image_path": os.path.join(self.root, rel)}

    def scan(self, options: ScanOptions | None = None) -> ScanResult:
        opt = (options or ScanOptions()).resolved()
        rels = list_files(self.root)
        paths = [os.path.join(self.root, r) for r in rels]
        with progress_bar(len(paths), "image headers", opt.progress and len(paths) > 2000) as bar:
            w, h, errs = scan_sizes(paths, workers=opt.workers, progress=bar.update)
        tokens, tiles = opt.accounting.image_tokens_array(w, h)
        out = ScanBuilder()
        for i, rel in enumerate(rels):
            if errs[i] is not None:
                out.error(errs[i], rel)
            else:
                out.add(rel, int(tokens[i]), 0, 0, int(tiles[i]))
        return out.finish(["image folder: no text, text_tokens = 0 for every sample"])
