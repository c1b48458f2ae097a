"""The one synthetic generator: sample shapes (the seed's 1-20-tile distribution) and content,
deterministic per (seed, sample index), no files. `synthetic:N` in `mmtrain analyze`,
`mmtrain simulate` / `pack`, `data=synthetic_tiles` in training and the tests all read it.

Each sample is an image of `tiles` fixed-size tiles followed by text. The text is a learnable
sequence (an arithmetic progression modulo the vocabulary whose stride is encoded in the image), so a
few training steps measurably lower the loss. `text_ids` / `tile_pixels` make the same content for
any shape, so a length table (`data=lengths`) trains on synthetic content of its real lengths.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Reserved token ids; real text uses ids >= FIRST_TEXT_ID.
PAD_ID = 0
IMAGE_TOKEN_ID = 1
FIRST_TEXT_ID = 2
NUM_STRIDES = 4


@dataclass(frozen=True)
class SyntheticTilesSpec:
    num_samples: int
    min_tiles: int = 1
    max_tiles: int = 20
    min_text_tokens: int = 16
    max_text_tokens: int = 128
    tile_distribution: str = "uniform"  # uniform | geometric
    seed: int = 1234

    def __post_init__(self) -> None:
        if not 1 <= self.min_tiles <= self.max_tiles:
            raise ValueError(f"need 1 <= min_tiles <= max_tiles, got {self.min_tiles}..{self.max_tiles}")
        if not 2 <= self.min_text_tokens <= self.max_text_tokens:
            raise ValueError(
                f"need 2 <= min_text_tokens <= max_text_tokens, got {self.min_text_tokens}..{self.max_text_tokens}"
            )
        if self.tile_distribution not in ("uniform", "geometric"):
            raise ValueError(f"tile_distribution must be uniform|geometric, got {self.tile_distribution!r}")


@dataclass(frozen=True)
class SampleShape:
    """What packing and balancing need of a sample: no pixels, no token ids."""

    tiles: int
    text_tokens: int


def _rng(spec: SyntheticTilesSpec, index: int, stream: int) -> np.random.Generator:
    return np.random.default_rng([spec.seed, index, stream])


def sample_shape(spec: SyntheticTilesSpec, index: int) -> SampleShape:
    if not 0 <= index < spec.num_samples:
        raise IndexError(f"sample {index} out of range [0, {spec.num_samples})")
    rng = _rng(spec, index, 0)
    if spec.tile_distribution == "uniform":
        tiles = int(rng.integers(spec.min_tiles, spec.max_tiles + 1))
    else:  # geometric: many small images, a long tail of big ones
        tiles = int(min(spec.max_tiles, spec.min_tiles - 1 + rng.geometric(0.25)))
    text = int(rng.integers(spec.min_text_tokens, spec.max_text_tokens + 1))
    return SampleShape(tiles=tiles, text_tokens=text)


def sample_shapes(spec: SyntheticTilesSpec) -> tuple[np.ndarray, np.ndarray]:
    """(tiles, text_tokens) arrays for the whole data set, as a length table would hold them."""
    shapes = [sample_shape(spec, i) for i in range(spec.num_samples)]
    return (
        np.array([s.tiles for s in shapes], dtype=np.int64),
        np.array([s.text_tokens for s in shapes], dtype=np.int64),
    )


def text_ids(seed: int, index: int, length: int, vocab_size: int) -> tuple[np.ndarray, int]:
    """`length` text token ids of sample `index` and the stride that generated them."""
    rng = np.random.default_rng([seed, index, 1])
    span = vocab_size - FIRST_TEXT_ID
    if span < NUM_STRIDES + 1:
        raise ValueError(f"vocab_size {vocab_size} too small for synthetic text")
    stride = int(rng.integers(1, NUM_STRIDES + 1))
    start = int(rng.integers(0, span))
    text = FIRST_TEXT_ID + (start + stride * np.arange(length)) % span
    return text.astype(np.int64), stride


def tile_pixels(seed: int, index: int, tiles: int, stride: int, image_size: int, channels: int = 3) -> np.ndarray:
    """float32 [tiles, C, H, W]: noise plus a per-stride brightness so the stride is learnable."""
    rng = np.random.default_rng([seed, index, 2])
    pixels = rng.standard_normal((tiles, channels, image_size, image_size), dtype=np.float32) * 0.1
    pixels += np.float32(stride / NUM_STRIDES - 0.5)
    return pixels


def sample_text(spec: SyntheticTilesSpec, index: int, vocab_size: int) -> tuple[np.ndarray, int]:
    """Text token ids and the stride that generated them (the image encodes the stride)."""
    return text_ids(spec.seed, index, sample_shape(spec, index).text_tokens, vocab_size)


def sample_pixels(spec: SyntheticTilesSpec, index: int, image_size: int, channels: int = 3) -> np.ndarray:
    """float32 [tiles, C, H, W] of sample `index`."""
    shape = sample_shape(spec, index)
    _, stride = sample_text(spec, index, vocab_size=FIRST_TEXT_ID + 1024)
    return tile_pixels(spec.seed, index, shape.tiles, stride, image_size, channels)


def length_table_columns(spec: SyntheticTilesSpec, tokens_per_tile: int) -> dict[str, np.ndarray]:
    """The data set as length-table columns (`id`, `tiles`, `image_tokens`, `text_tokens`), no pixels.

    Lets `mmtrain analyze` and the packer see exactly what training on `spec` would see.
    """
    if tokens_per_tile < 1:
        raise ValueError(f"tokens_per_tile must be >= 1, got {tokens_per_tile}")
    tiles, text = sample_shapes(spec)
    return {
        "id": np.arange(spec.num_samples, dtype=np.int64),
        "tiles": tiles,
        "image_tokens": tiles * np.int64(tokens_per_tile),
        "text_tokens": text,
    }
