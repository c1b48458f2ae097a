"""Multimodal RoPE (Qwen2-VL): 3 x T position ids, and rotary applied per token inside the packed stream.

Positions. A sample's text tokens count up 0, 1, 2, ... on all three axes; an image's merged tokens
get (temporal, row, column) positions offset by the position where the image starts, and the text
after it resumes at that start + max(rows, columns). `mrope_position_ids` does this for one sample
(transformers' `get_rope_index`); a pack concatenates its samples' positions, so they restart for
every sample.

Rotary. megatron applies RoPE from a [max_seqlen] frequency table that its thd path indexes per
`cu_seqlens` segment (positions restart at every segment, one host sync per segment), which cannot
express positions that are not 0..n-1 per segment. Here every token carries its own angles: the
rotary cos/sin [T, 1, head_dim] ride on the packed-sequence parameters (`RotaryPackedSeqParams`),
and `RotaryVarlenCoreAttention` rotates q and k with them just before the varlen attention (megatron
itself applies no RoPE: the decoder is built with position_embedding_type="none"). The same
mechanism carries the ViT's 2D rotary (mmtrain/models/qwen_vision.py).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch
from megatron.core.packed_seq_params import PackedSeqParams

from mmtrain.models.attention.core import VarlenCoreAttention

__all__ = [
    "RotaryPackedSeqParams", "RotaryVarlenCoreAttention", "inv_freq", "mrope_angles", "mrope_position_ids",
    "packed_mrope_position_ids", "rotary_cos_sin", "with_rotary",
]


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


def inv_freq(dim: int, base: float, device=None) -> torch.Tensor:
    """The dim/2 rotary inverse frequencies base^(-2i/dim), in float32 as transformers computes them."""
    return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32, device=device) / dim))


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


# ---- applying them inside the packed stream ---------------------------------------------------------


@dataclass
class RotaryPackedSeqParams(PackedSeqParams):
    """megatron's packed-sequence parameters plus each token's rotary cos / sin [T, 1, head_dim]."""

    rotary_cos: Optional[torch.Tensor] = None
    rotary_sin: Optional[torch.Tensor] = None


def with_rotary(psp: PackedSeqParams, cos: torch.Tensor, sin: torch.Tensor) -> RotaryPackedSeqParams:
    base = {f.name: getattr(psp, f.name) for f in dataclasses.fields(PackedSeqParams)}
    return RotaryPackedSeqParams(**base, rotary_cos=cos, rotary_sin=sin)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    a, b = x.chunk(2, dim=-1)
    return torch.cat([-b, a], dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, heads, D] rotated per token, computed in cos's dtype, returned in x's."""
    y = x.to(cos.dtype)
    return (y * cos + _rotate_half(y) * sin).to(x.dtype)


class RotaryVarlenCoreAttention(VarlenCoreAttention):
    """Varlen core attention that first rotates q and k by the per-token angles of the stream."""

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None, packed_seq_params=None):
        cos = getattr(packed_seq_params, "rotary_cos", None)
        if cos is None:
            raise ValueError("RotaryVarlenCoreAttention needs RotaryPackedSeqParams with the stream's rotary cos/sin")
        sin = packed_seq_params.rotary_sin
        query, key = apply_rotary(query, cos, sin), apply_rotary(key, cos, sin)
        return super().forward(query, key, value, attention_mask, attn_mask_type, attention_bias, packed_seq_params)
