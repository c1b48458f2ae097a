"""Header parsing: sizes of many formats/sizes without decoding, and every kind of broken file."""

from __future__ import annotations

import struct

import pytest
from PIL import Image

from mmtrain.data import image_headers as ih
from analysis_helpers import FORMATS, image_bytes, write_image

SIZES = [(1, 1), (14, 14), (15, 13), (336, 336), (640, 480), (1001, 3), (3, 777)]


@pytest.mark.parametrize("fmt,ext,kw", FORMATS, ids=[f"{f}-{i}" for i, (f, _, _) in enumerate(FORMATS)])
def test_sizes_match_pillow(tmp_path, fmt, ext, kw):
    for w, h in SIZES:
        p = write_image(str(tmp_path / f"{w}x{h}.{ext}"), fmt, (w, h), **kw)
        assert ih.image_size(p) == (w, h)
        assert ih.image_size_from_bytes(open(p, "rb").read()) == (w, h)
        with Image.open(p) as im:
            assert im.size == (w, h)


@pytest.mark.parametrize("fmt,ext,kw", [f for f in FORMATS if f[0] != "TIFF"])
def test_truncated_files_are_detected(tmp_path, fmt, ext, kw):
    data = image_bytes(fmt, (200, 120), **kw)
    for cut in (len(data) // 2, len(data) - 3, 20):
        p = tmp_path / f"t{cut}.{ext}"
        p.write_bytes(data[:cut])
        with pytest.raises(ih.ImageError) as e:
            ih.image_size(p)
        assert e.value.kind in (ih.TRUNCATED, ih.CORRUPT), (cut, e.value)


def test_jpeg_with_big_exif_segment(tmp_path):
    """The frame header lies beyond the first read: the parser fetches more of the file."""
    data = image_bytes("JPEG", (123, 45))
    app1 = b"\xff\xe1" + struct.pack(">H", 60002) + b"Exif\x00\x00" + b"\x00" * 59994
    p = tmp_path / "exif.jpg"
    p.write_bytes(data[:2] + app1 + data[2:])
    assert ih.image_size(p) == (123, 45)
    with Image.open(p) as im:
        assert im.size == (123, 45)


def test_broken_kinds(tmp_path):
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "text.png").write_text("not an image at all")
    png = bytearray(image_bytes("PNG", (10, 10)))
    png[20] ^= 0xFF  # inside IHDR: checksum no longer matches
    (tmp_path / "badcrc.png").write_bytes(bytes(png))
    (tmp_path / "garbage.jpg").write_bytes(b"\xff\xd8" + b"\x12\x34" * 50)
    gif = bytearray(image_bytes("GIF", (10, 10)))
    gif[6:10] = b"\x00\x00\x0a\x00"  # width 0
    (tmp_path / "zero.gif").write_bytes(bytes(gif))
    expected = {
        "empty.jpg": ih.ZERO_SIZE,
        "text.png": ih.NOT_IMAGE,
        "badcrc.png": ih.CORRUPT,
        "garbage.jpg": ih.CORRUPT,
        "zero.gif": ih.ZERO_SIZE,
        "nope.jpg": ih.MISSING,
    }
    for name, kind in expected.items():
        with pytest.raises(ih.ImageError) as e:
            ih.image_size(tmp_path / name)
        assert e.value.kind == kind, name
    with pytest.raises(ih.ImageError) as e:
        ih.image_size(tmp_path)
    assert e.value.kind == ih.NOT_IMAGE


def test_scan_sizes_pool_matches_serial(tmp_path):
    paths = []
    for i in range(1200):
        w, h = 1 + i % 97, 1 + (i * 7) % 89
        paths.append(write_image(str(tmp_path / f"{i}.png"), "PNG", (w, h)))
    paths.append(str(tmp_path / "missing.png"))
    seen = []
    w1, h1, e1 = ih.scan_sizes(paths, workers=1)
    w2, h2, e2 = ih.scan_sizes(paths, workers=2, chunk=256, progress=seen.append)
    assert (w1 == w2).all() and (h1 == h2).all() and e1 == e2
    assert sum(seen) == len(paths)
    assert e1[-1] == ih.MISSING and w1[-1] == 0
    assert (w1[0], h1[0]) == (1, 1) and (w1[100], h1[100]) == (4, 78)
