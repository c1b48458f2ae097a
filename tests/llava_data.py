"""Build a tiny LLaVA JSONL dataset with PNG images (some broken on purpose) for the tests."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np


def make_dataset(root: Path, n: int = 32, missing: tuple[int, ...] = (), corrupt_header: tuple[int, ...] = (),
                 corrupt_body: tuple[int, ...] = ()) -> Path:
    """n records `s<i>` with images img<i>.png of varying sizes. `missing`: file deleted;
    `corrupt_header`: garbage bytes (fails the header check); `corrupt_body`: a valid PNG header and
    end marker with damaged pixel data (passes the header check, fails to decode)."""
    from PIL import Image

    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    recs = []
    for i in range(n):
        w, h = int(rng.integers(20, 90)), int(rng.integers(20, 90))
        name = f"img{i}.png"
        path = root / name
        if i not in missing:
            arr = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
            Image.fromarray(arr).save(path)
            if i in corrupt_header:
                path.write_bytes(b"this is not an image at all" * 4)
            elif i in corrupt_body:
                data = bytearray(path.read_bytes())
                start = data.index(b"IDAT") + 8
                for j in range(start, min(start + 200, len(data) - 20)):
                    data[j] ^= 0x5A
                path.write_bytes(bytes(data))
        words = " ".join(f"w{int(x)}" for x in rng.integers(0, 100, int(rng.integers(3, 12))))
        recs.append({"id": f"s{i}", "image": name,
                     "conversations": [{"from": "human", "value": f"<image>\nDescribe {words}"},
                                       {"from": "gpt", "value": f"It shows {words}."}]})
    src = root / "data.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return src
