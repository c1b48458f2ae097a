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


# Length-table shapes that stress packing and balancing (tests, bench/balance_train_bench.py):
# (tiles, text tokens) per sample, every sample fitting seq_length at tokens_per_tile per tile.
STRESS_KINDS = ("uniform", "skewed", "bimodal", "all_long", "all_short", "near_seq", "text_only", "mixed_vlm")


def stress_shapes(kind: str, n: int, seed: int, tokens_per_tile: int, seq_length: int) -> tuple[np.ndarray, np.ndarray]:
    """(tiles, text_tokens) of `n` samples of a named distribution:
    uniform (1-20-tile-like, scaled to seq_length), skewed (geometric tiles, log-normal text),
    bimodal (short text-only vs long many-tile samples), all_long (every sample > half a pack),
    all_short (a few dozen tokens each), near_seq (5% of samples within 10 tokens of seq_length),
    text_only (tiles = 0), mixed_vlm (real-table-like: 1-6 tiles, 10% text-only, long-tailed text)."""
    if kind not in STRESS_KINDS:
        raise ValueError(f"unknown stress distribution {kind!r}; choose from {STRESS_KINDS}")
    rng = np.random.default_rng([seed, STRESS_KINDS.index(kind)])
    t, L = tokens_per_tile, seq_length
    max_tiles = max(1, (L * 5 // 8) // t)
    if kind == "uniform":
        tiles = rng.integers(1, max_tiles + 1, n)
        text = rng.integers(16, max(17, L // 4), n)
    elif kind == "skewed":
        tiles = np.minimum(rng.geometric(0.35, n), max_tiles)
        text = rng.lognormal(np.log(max(L / 10, 4)), 0.9, n).astype(np.int64) + 1
    elif kind == "bimodal":
        long = rng.random(n) < 0.4
        tiles = np.where(long, rng.integers(max_tiles * 3 // 4, max_tiles + 1, n), 0)
        text = np.where(long, rng.integers(8, max(9, L // 8), n), rng.integers(8, max(9, L // 10), n))
    elif kind == "all_long":
        tiles = rng.integers(max_tiles // 2, max_tiles + 1, n)
        text = rng.integers(L // 2, L, n) - tiles * t
    elif kind == "all_short":
        tiles = rng.integers(0, 2, n)
        text = rng.integers(4, max(5, L // 16), n)
    elif kind == "near_seq":
        tiles = rng.integers(0, max_tiles // 2 + 1, n)
        text = rng.integers(16, max(17, L // 3), n)
        near = rng.random(n) < 0.05
        text[near] = L - tiles[near] * t - rng.integers(0, 10, int(near.sum()))
    elif kind == "text_only":
        tiles = np.zeros(n, np.int64)
        text = rng.integers(1, L + 1, n)
    else:  # mixed_vlm
        tiles = rng.choice([1, 1, 2, 3, 4, 5, 5, 6], n)
        tiles[rng.random(n) < 0.1] = 0
        text = rng.lognormal(np.log(max(L / 6, 4)), 0.7, n).astype(np.int64) + 1
    tiles = np.asarray(tiles, np.int64)
    text = np.clip(np.asarray(text, np.int64), 1, None)
    text = np.minimum(text, L - tiles * t)  # every sample fits a pack
    return tiles, np.maximum(text, 1)


def write_length_table(path, tiles, text_tokens, ids=None) -> None:
    """A CSV length table (id, tiles, text_tokens), as `data=lengths` reads it."""
    ids = [f"s{i}" for i in range(len(tiles))] if ids is None else ids
    with open(path, "w") as f:
        f.write("id,tiles,text_tokens\n")
        for i, a, b in zip(ids, np.asarray(tiles).tolist(), np.asarray(text_tokens).tolist()):
            f.write(f"{i},{a},{b}\n")
