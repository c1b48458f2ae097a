"""A length table of LLaVA-Pretrain at native resolution, generated (the image files are not here).

What it is: a *synthetic* stand-in with the image-size distribution the design note describes for
LLaVA-Pretrain (LCS-558K) encoded at native resolution with 14 px patches, ceil(w/14) x ceil(h/14)
patches per image: 99.4% of the samples between 500 and 1500 patches, the rest between 1501 and
2999 but for a tail of 0.03% (the note: 180 samples of 558K) at 3000 and more, 576 (336 x 336) to
20,880 patches overall. Each sample is one image (as in LLaVA-Pretrain) whose size is drawn here:
shortest side 336 px for most, aspect ratios of photos (square, 4:3, 3:2, 16:9, taller ones), a
quarter portrait; the extremes 336 x 336 and a 20,880-patch image are always in. Text tokens:
a short caption (8-40 tokens) plus the prompt and Qwen's chat template around it (40 tokens).

Columns: id, width, height, patches_p14 (the note's count), and what a Qwen2.5-VL processor
(smart resize, min_pixels 56*56, max_pixels 28*28*16384 = its shipped preprocessor_config) makes
of it: vit_patches (ViT sequence length), image_tokens (merged 2x2: the decoder's image tokens),
and text_tokens. `data=lengths data.source=TABLE` trains a native model (image_tokens per sample).

    python bench/native_lengths.py --out tests/assets/llava_pretrain_native_10k.csv            # 10,000 rows
    python bench/native_lengths.py --out tests/assets/llava_pretrain_native_smoke.csv --rows 64 --scale 0.25

`--scale` shrinks every side (the CPU smoke scale of the native recipe: a quarter of each side is
1/16 of the tokens, as the tile recipes' smoke scales 8192 to 512). Deterministic (--seed).
"""

from __future__ import annotations

import argparse
import csv
import math

import numpy as np

from mmtrain.data.accounting import SmartResize

QWEN25 = SmartResize(patch_size=14, merge_size=2, temporal_patch_size=2, min_pixels=56 * 56, max_pixels=28 * 28 * 16384)
ASPECTS = [(1.0, 0.22), (4 / 3, 0.36), (3 / 2, 0.24), (16 / 9, 0.08), (2.0, 0.05), (2.5, 0.05)]


def _patches(w: int, h: int) -> int:
    return math.ceil(w / 14) * math.ceil(h / 14)


def sizes(rows: int, seed: int) -> list[tuple[int, int]]:
    """Image sizes with the note's patch distribution: 99.4% in [500, 1500], 0.03% >= 3000, rest
    in [1501, 2999]; first two rows 336 x 336 (576 patches) and the 20,880-patch maximum."""
    rng = np.random.default_rng(seed)
    n_tail = max(1, round(rows * 180 / 558_128))
    n_mid = max(1, round(rows * 0.006) - n_tail)
    out = [(336, 336), (2030, 2016)]  # 24 x 24 = 576 and 145 x 144 = 20,880 patches
    assert _patches(*out[1]) == 20_880

    def draw(lo: int, hi: int) -> tuple[int, int]:
        while True:
            a = ASPECTS[rng.choice(len(ASPECTS), p=[p for _, p in ASPECTS])][0] * rng.uniform(0.97, 1.03)
            if lo >= 1501:  # bigger photos: the shortest side grows
                short = int(rng.uniform(336, 1600 if lo >= 3000 else 700))
            else:
                short = 336 if rng.random() < 0.85 else int(rng.uniform(337, 420))
            w, h = int(round(short * a)), short
            if rng.random() < 0.25:
                w, h = h, w
            if lo <= _patches(w, h) <= hi:
                return w, h

    out += [draw(3000, 20_879) for _ in range(n_tail - 1)]
    out += [draw(1501, 2999) for _ in range(n_mid)]
    out += [draw(500, 1500) for _ in range(rows - len(out))]
    order = rng.permutation(len(out))
    return [out[i] for i in order]


def table(rows: int, seed: int, scale: float) -> list[dict]:
    rng = np.random.default_rng(seed + 1)
    out = []
    for i, (w, h) in enumerate(sizes(rows, seed)):
        w, h = max(1, round(w * scale)), max(1, round(h * scale))
        t = QWEN25.image_tokens(w, h)
        out.append({"id": f"lcs558k-native-{i:05d}", "width": w, "height": h, "patches_p14": _patches(w, h),
                    "vit_patches": QWEN25.vit_patches(w, h), "image_tokens": t,
                    "text_tokens": 40 + int(rng.integers(8, 41))})
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--rows", type=int, default=10_000)
    ap.add_argument("--seed", type=int, default=558)
    ap.add_argument("--scale", type=float, default=1.0, help="multiply every image side (smoke scale)")
    args = ap.parse_args(argv)
    rows = table(args.rows, args.seed, args.scale)
    with open(args.out, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    p = np.array([r["patches_p14"] for r in rows])
    v = np.array([r["vit_patches"] for r in rows])
    t = np.array([r["image_tokens"] + r["text_tokens"] for r in rows])
    print(f"{args.out}: {len(rows)} rows; patches (ceil, p14) {p.min()}..{p.max()}, "
          f"{np.mean((p >= 500) & (p <= 1500)):.2%} in 500-1500, {int((p >= 3000).sum())} >= 3000; "
          f"Qwen2.5-VL ViT patches {v.min()}..{v.max()}, decoder tokens {t.min()}..{t.max()} (median {int(np.median(t))})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
