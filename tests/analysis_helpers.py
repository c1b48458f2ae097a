"""Helpers that generate small images for the data-analysis tests (no files are shipped)."""

from __future__ import annotations

import io

from PIL import Image, features

WEBP = features.check("webp")

# (Pillow format, extension, save kwargs)
FORMATS = [
    ("JPEG", "jpg", {"quality": 80}),
    ("JPEG", "jpg", {"progressive": True}),
    ("PNG", "png", {}),
    ("GIF", "gif", {}),
    ("BMP", "bmp", {}),
    ("TIFF", "tif", {}),
] + ([("WEBP", "webp", {"lossless": True}), ("WEBP", "webp", {"quality": 70})] if WEBP else [])


def image_bytes(fmt: str, size: tuple[int, int], **kw) -> bytes:
    w, h = size
    im = Image.new("RGB", (w, h), ((w * 7) % 256, (h * 13) % 256, 90))
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def write_image(path: str, fmt: str, size: tuple[int, int], **kw) -> str:
    with open(path, "wb") as f:
        f.write(image_bytes(fmt, size, **kw))
    return path


def conv(text: str = "<image>\nDescribe it.", answer: str = "A cat.") -> list[dict]:
    return [{"from": "human", "value": text}, {"from": "gpt", "value": answer}]
