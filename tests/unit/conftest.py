"""Fixtures for the data-analysis tests: generated LLaVA-style data sets with broken files."""

from __future__ import annotations

import json
import os

import pytest

from analysis_helpers import conv, image_bytes, write_image


@pytest.fixture
def llava_dir(tmp_path):
    """A LLaVA JSON data set: 4 good samples, one per kind of bad one.

    Image tokens (patch 14, ceil): 336x336 -> 576, 100x50 -> 8*4 = 32, 14x14 -> 1, 700x15 -> 50*2 = 100.
    Text tokens (bytes): "<image>\\nDescribe it." = 1 + 13, "A cat." = 6 -> 20.
    """
    root = tmp_path / "images"
    root.mkdir()
    write_image(str(root / "a.jpg"), "JPEG", (336, 336))
    write_image(str(root / "b.png"), "PNG", (100, 50))
    write_image(str(root / "c.gif"), "GIF", (14, 14))
    write_image(str(root / "d.bmp"), "BMP", (700, 15))
    good = image_bytes("JPEG", (64, 64))
    (root / "trunc.jpg").write_bytes(good[: len(good) // 2])
    (root / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(60))
    (root / "text.jpg").write_bytes(b"hello, I am not an image\n" * 10)
    (root / "empty.png").write_bytes(b"")
    records = [
        {"id": "a", "image": "a.jpg", "conversations": conv()},
        {"id": "b", "image": "b.png", "conversations": conv()},
        {"id": "c", "image": "c.gif", "conversations": conv()},
        {"id": "d", "image": "d.bmp", "conversations": conv()},
        {"id": "missing", "image": "nope.jpg", "conversations": conv()},
        {"id": "trunc", "image": "trunc.jpg", "conversations": conv()},
        {"id": "corrupt", "image": "corrupt.png", "conversations": conv()},
        {"id": "text", "image": "text.jpg", "conversations": conv()},
        {"id": "empty", "image": "empty.png", "conversations": conv()},
        {"id": "noph", "image": "a.jpg", "conversations": conv("Describe it.")},
        {"id": "two", "image": ["a.jpg", "b.png"], "conversations": conv("<image><image>")},
        {"id": "twoph", "image": "a.jpg", "conversations": conv("<image> and <image>")},
    ]
    jsonl = tmp_path / "data.jsonl"
    lines = [json.dumps(r) for r in records]
    lines.insert(3, '{"id": "broken", "image": ')  # line 4 is malformed
    jsonl.write_text("\n".join(lines) + "\n")
    as_json = tmp_path / "data.json"
    as_json.write_text(json.dumps(records))
    return {"root": str(root), "jsonl": str(jsonl), "json": str(as_json), "tmp": tmp_path}
