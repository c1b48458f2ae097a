"""How many decoder tokens an image of a given size becomes, configured per model.

Why: packing settings depend on the image-token distribution, and that distribution depends on the
vision encoder's preprocessing. Two families are covered:

* native resolution (LLaVA-style at native size, Qwen2-VL-like): ceil(w/p) x ceil(h/p) patches
  (or floor, at least one per side), optionally merged m x m (ceil/floor again) and plus a class token;
* dynamic tiling as InternVL does it: pick a (cols, rows) grid with min <= cols*rows <= max whose
  aspect ratio is closest to the image's (ties go to the larger grid when the image's area exceeds
  half of that grid's pixel area), optionally add a thumbnail tile; tokens = tiles x tokens_per_tile.

* smart resize as Qwen2-VL's image processor does it (`SmartResize`): the image is resized to
  multiples of patch x merge pixels with min_pixels <= area <= max_pixels, cut into patches (a
  still image is one temporal patch, its frame repeated), and every m x m patches become one
  decoder token. `vit_patches` is the ViT's sequence length for the image: full-attention ViT
  layers cost ~ vit_patches^2 per image, the term a cost model adds for the vision encoder.

The decoder sees text + image tokens - image placeholders (each `<image>` is replaced by the
image's tokens), see `total_tokens`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Mapping

import numpy as np


@dataclass(frozen=True)
class TokenAccounting:
    mode: str = "native"  # native | dynamic
    patch_size: int = 14
    rounding: str = "ceil"  # ceil | floor
    merge: int = 1  # spatial merge factor per side (2 = 2x2 patches -> 1 token)
    class_token: bool = False  # one extra token per image (native) or per tile (dynamic)
    tile_size: int = 448
    min_tiles: int = 1
    max_tiles: int = 12
    thumbnail: bool = False
    tokens_per_tile: int | None = None  # None: (tile_size / patch_size / merge)^2 [+1]

    def __post_init__(self) -> None:
        if self.mode not in ("native", "dynamic"):
            raise ValueError(f"mode must be native|dynamic, got {self.mode!r}")
        if self.rounding not in ("ceil", "floor"):
            raise ValueError(f"rounding must be ceil|floor, got {self.rounding!r}")
        if self.patch_size < 1 or self.merge < 1:
            raise ValueError("patch_size and merge must be >= 1")
        if not 1 <= self.min_tiles <= self.max_tiles:
            raise ValueError(f"need 1 <= min_tiles <= max_tiles, got {self.min_tiles}..{self.max_tiles}")
        if self.tile_size < 1 or (self.tokens_per_tile is not None and self.tokens_per_tile < 1):
            raise ValueError("tile_size and tokens_per_tile must be >= 1")

    # --- per-tile / native ------------------------------------------------------------------

    @property
    def tile_tokens(self) -> int:
        """Tokens one dynamic tile becomes."""
        if self.tokens_per_tile is not None:
            return self.tokens_per_tile
        side = self._side(self.tile_size)
        return side * side + int(self.class_token)

    def _side(self, pixels: int) -> int:
        step = self.patch_size * self.merge
        if self.rounding == "ceil":
            return -(-pixels // step)  # ceil(ceil(x/p)/m) == ceil(x/(p*m))
        return max(1, pixels // step)  # floor, but an image keeps at least one token per side

    def native_tokens(self, width: int, height: int) -> int:
        return self._side(width) * self._side(height) + int(self.class_token)

    # --- dynamic tiling ---------------------------------------------------------------------

    def grid(self, width: int, height: int) -> tuple[int, int]:
        """(cols, rows) tile grid chosen for an image (dynamic mode)."""
        return _closest_grid(width, height, self.min_tiles, self.max_tiles, self.tile_size)

    def tiles(self, width: int, height: int) -> int:
        """Number of vision-encoder inputs: 1 for native, grid tiles (+ thumbnail) for dynamic."""
        if self.mode == "native":
            return 1
        cols, rows = self.grid(width, height)
        n = cols * rows
        return n + 1 if self.thumbnail and n != 1 else n

    def image_tokens(self, width: int, height: int) -> int:
        if self.mode == "native":
            return self.native_tokens(width, height)
        return self.tiles(width, height) * self.tile_tokens

    # --- whole arrays -----------------------------------------------------------------------

    def image_tokens_array(self, widths: np.ndarray, heights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(image_tokens, tiles) for arrays of sizes; entries with width or height 0 give 0."""
        w = np.asarray(widths, dtype=np.int64)
        h = np.asarray(heights, dtype=np.int64)
        valid = (w > 0) & (h > 0)
        if self.mode == "native":
            step = self.patch_size * self.merge
            if self.rounding == "ceil":
                sw, sh = -(-w // step), -(-h // step)
            else:
                sw, sh = np.maximum(1, w // step), np.maximum(1, h // step)
            tokens = sw * sh + int(self.class_token)
            tiles = np.ones_like(w)
        else:
            tiles = np.zeros_like(w)
            for i in np.flatnonzero(valid):
                tiles[i] = self.tiles(int(w[i]), int(h[i]))
            tokens = tiles * self.tile_tokens
        return np.where(valid, tokens, 0), np.where(valid, tiles, 0)


@lru_cache(maxsize=64)
def _candidate_grids(min_tiles: int, max_tiles: int) -> tuple[tuple[int, int], ...]:
    """All (cols, rows) with min <= cols*rows <= max, smallest area first."""
    grids = {
        (i, j)
        for n in range(min_tiles, max_tiles + 1)
        for i in range(1, n + 1)
        for j in range(1, n + 1)
        if min_tiles <= i * j <= max_tiles
    }
    return tuple(sorted(grids, key=lambda g: g[0] * g[1]))


@lru_cache(maxsize=1 << 16)
def _closest_grid(width: int, height: int, min_tiles: int, max_tiles: int, tile_size: int) -> tuple[int, int]:
    aspect = width / height
    area = width * height
    best, best_diff = (1, 1), float("inf")
    for cols, rows in _candidate_grids(min_tiles, max_tiles):
        diff = abs(aspect - cols / rows)
        if diff < best_diff:
            best, best_diff = (cols, rows), diff
        elif diff == best_diff and area > 0.5 * tile_size * tile_size * cols * rows:
            best = (cols, rows)  # same shape, more tiles: only when the image has the pixels for it
    return best


def total_tokens(text_tokens: np.ndarray, image_tokens: np.ndarray, placeholders: np.ndarray) -> np.ndarray:
    """What the decoder sees: each placeholder token is replaced by the image's tokens."""
    return np.asarray(text_tokens) + np.asarray(image_tokens) - np.asarray(placeholders)


# ---- smart resize (Qwen2-VL / Qwen2.5-VL image processor) ---------------------------------------

MAX_ASPECT_RATIO = 200  # the processor refuses more elongated images


def smart_resize(height: int, width: int, factor: int = 28, min_pixels: int = 56 * 56, max_pixels: int = 28 * 28 * 1280) -> tuple[int, int]:
    """(height, width) the image is resized to: both multiples of `factor` (patch x merge), the
    aspect ratio kept as well as rounding allows, the area brought into [min_pixels, max_pixels]."""
    if min(height, width) < 1:
        raise ValueError(f"image of {width}x{height} pixels has no area")
    if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        raise ValueError(f"image of {width}x{height} pixels: aspect ratio above {MAX_ASPECT_RATIO}, which the processor refuses")
    h = round(height / factor) * factor  # Python's round: half to even, as the processor
    w = round(width / factor) * factor
    if h * w > max_pixels:
        scale = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / scale / factor) * factor)
        w = max(factor, math.floor(width / scale / factor) * factor)
    elif h * w < min_pixels:
        scale = math.sqrt(min_pixels / (height * width))
        h = math.ceil(height * scale / factor) * factor
        w = math.ceil(width * scale / factor) * factor
    return h, w


@dataclass(frozen=True)
class SmartResize:
    """Token accounting of a native-resolution Qwen2-VL-style vision encoder."""

    patch_size: int = 14
    merge_size: int = 2
    temporal_patch_size: int = 2
    min_pixels: int = 56 * 56
    max_pixels: int = 28 * 28 * 1280

    def __post_init__(self) -> None:
        if min(self.patch_size, self.merge_size, self.temporal_patch_size) < 1:
            raise ValueError("patch_size, merge_size and temporal_patch_size must be >= 1")
        if not 0 < self.min_pixels <= self.max_pixels:
            raise ValueError(f"need 0 < min_pixels <= max_pixels, got {self.min_pixels}..{self.max_pixels}")

    @classmethod
    def from_processor_config(cls, d: Mapping[str, Any]) -> "SmartResize":
        """From a preprocessor_config.json (or the image processor part of processor_config.json):
        size.shortest_edge / longest_edge are the min / max pixels (older files: min_pixels / max_pixels)."""
        size = d.get("size") or {}
        return cls(
            patch_size=int(d.get("patch_size", 14)),
            merge_size=int(d.get("merge_size", 2)),
            temporal_patch_size=int(d.get("temporal_patch_size", 2)),
            min_pixels=int(d.get("min_pixels") or size.get("shortest_edge") or 56 * 56),
            max_pixels=int(d.get("max_pixels") or size.get("longest_edge") or 28 * 28 * 1280),
        )

    @property
    def factor(self) -> int:
        return self.patch_size * self.merge_size

    def grid_thw(self, width: int, height: int) -> tuple[int, int, int]:
        """(t, h, w) in patches, as the processor's image_grid_thw (t = 1 for a still image)."""
        h, w = smart_resize(height, width, self.factor, self.min_pixels, self.max_pixels)
        return 1, h // self.patch_size, w // self.patch_size

    def vit_patches(self, width: int, height: int) -> int:
        """The image's sequence length inside the ViT."""
        t, h, w = self.grid_thw(width, height)
        return t * h * w

    def image_tokens(self, width: int, height: int) -> int:
        """Merged tokens the image occupies in the decoder stream (<|image_pad|> count)."""
        return self.vit_patches(width, height) // (self.merge_size * self.merge_size)

    def arrays(self, widths: np.ndarray, heights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(image_tokens, vit_patches) for arrays of sizes; 0 where an entry has no area or an
        aspect ratio the processor refuses."""
        w = np.asarray(widths, dtype=np.int64)
        h = np.asarray(heights, dtype=np.int64)
        f = self.factor
        ok = (w > 0) & (h > 0)
        ok &= np.maximum(w, h) <= MAX_ASPECT_RATIO * np.minimum(w, h)
        hf, wf = np.where(ok, h, 1).astype(np.float64), np.where(ok, w, 1).astype(np.float64)
        rh, rw = np.round(hf / f) * f, np.round(wf / f) * f  # numpy rounds half to even too
        big = rh * rw > self.max_pixels
        small = ~big & (rh * rw < self.min_pixels)
        down = np.sqrt(hf * wf / self.max_pixels)
        up = np.sqrt(self.min_pixels / (hf * wf))
        rh = np.where(big, np.maximum(f, np.floor(hf / down / f) * f), np.where(small, np.ceil(hf * up / f) * f, rh))
        rw = np.where(big, np.maximum(f, np.floor(wf / down / f) * f), np.where(small, np.ceil(wf * up / f) * f, rw))
        patches = (rh // self.patch_size * (rw // self.patch_size)).astype(np.int64)
        patches = np.where(ok, patches, 0)
        return patches // (self.merge_size * self.merge_size), patches
