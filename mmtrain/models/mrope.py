"""Multimodal RoPE (Qwen2-VL): 3 x T position ids, and rotary applied per token inside the packed stream.

Positions. A sample's text tokens count up 0, 1, 2, ... on all three axes; an image's merged tokens
get (temporal, row, column) positions offset by the position where the image starts, and the text
after it resumes at that start + max(rows, columns). `mrope_position_ids` does this for one sample
(transformers' `get_rope_index`); a pack concatenates its samples' positions, so they restart for
every sample.

Rotary. megatron applies RoPE from a [max_seqlen] frequency table that its thd path indexes per
`cu_seqlens` segment, which cannot express positions that are not 0..n-1 per segment. Here every
token gets its own angles (`mrope_angles`); their cos/sin become the per-token tables of
mmtrain/models/rope.py, which the varlen attention core applies to q and k (megatron itself applies
no RoPE). The same mechanism carries the ViT's 2D rotary (mmtrain/models/qwen_vision.py).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from mmtrain.models.rope import inv_freq  # the one formula (base^(-2i/dim), fp32)

__all__ = ["inv_freq", "mrope_angles", "mrope_position_ids", "packed_mrope_position_ids", "rotary_cos_sin"]


# ---- positions (numpy: the data path computes them per sample) -----------------------------------


def mrope_position_ids(
    num_tokens: int,
    image_starts: Sequence[int],
    image_grid_thw,
    spatial_merge_size: int,
) -> np.ndarray:
    """int64 [3, num_tokens] mRoPE positions of one sample.

    image_starts: index in the sample of each image's first token, in order; image i occupies
    t * (h / m) * (w / m) tokens from there (grid (t, h, w) in patches, m = spatial_merge_size).
    """
    grids = np.asarray(image_grid_thw, dtype=np.int64).reshape(-1, 3)
    if len(image_starts) != len(grids):
        raise ValueError(f"{len(image_starts)} image starts for {len(grids)} image grids")
    m = spatial_merge_size
    out = np.empty((3, num_tokens), dtype=np.int64)
    pos = 0  # next position id
    cursor = 0  # next token index
    for i, (start, (t, h, w)) in enumerate(zip(image_starts, grids.tolist())):
        if h % m or w % m:
            raise ValueError(f"image {i}: grid {h}x{w} patches is not a multiple of spatial_merge_size={m}")
        lh, lw = h // m, w // m
        n = t * lh * lw
        if start < cursor or start + n > num_tokens:
            raise ValueError(
                f"image {i} ({n} tokens from index {start}) overlaps the previous image or runs past the "
                f"sample's {num_tokens} tokens"
            )
        out[:, cursor:start] = pos + np.arange(start - cursor)
        pos += start - cursor
        out[0, start : start + n] = pos + np.repeat(np.arange(t), lh * lw)
        out[1, start : start + n] = pos + np.tile(np.repeat(np.arange(lh), lw), t)
        out[2, start : start + n] = pos + np.tile(np.arange(lw), t * lh)
        pos += max(lh, lw)
        cursor = start + n
    out[:, cursor:] = pos + np.arange(num_tokens - cursor)
    return out


def packed_mrope_position_ids(samples: Sequence[tuple[int, Sequence[int], object]], spatial_merge_size: int) -> np.ndarray:
    """int64 [3, sum of lengths]: the positions of a pack of samples, given per sample as
    (num_tokens, image_starts, image_grid_thw). Every sample starts again from 0, as it would alone."""
    if not samples:
        return np.zeros((3, 0), np.int64)
    parts = [mrope_position_ids(n, starts, grids, spatial_merge_size) for n, starts, grids in samples]
    return np.concatenate(parts, axis=1)


# ---- angles ----------------------------------------------------------------------------------------


def mrope_angles(position_ids: torch.Tensor, freqs: torch.Tensor, section: Sequence[int]) -> torch.Tensor:
    """[T, len(freqs)] angles: frequency j of section i is rotated by position axis i % 3."""
    if sum(section) != freqs.numel():
        raise ValueError(f"mrope_section {list(section)} does not cover the {freqs.numel()} rotary frequencies")
    axes = np.repeat(np.arange(len(section)) % 3, list(section))  # on the host: no device sync
    axes = torch.from_numpy(axes).to(position_ids.device, non_blocking=True)
    return position_ids[axes].t().float() * freqs  # [T, D/2]


def rotary_cos_sin(angles: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos / sin [T, 1, 2 * angles.shape[1]] of the angles repeated over both halves of the head
    (the rotate-half layout transformers and megatron use), cast to the dtype the rotation runs in."""
    emb = torch.cat([angles, angles], dim=-1)[:, None, :]
    return emb.cos().to(dtype), emb.sin().to(dtype)
