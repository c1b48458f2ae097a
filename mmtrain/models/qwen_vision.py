"""The native-resolution ViT of Qwen2-VL / Qwen2.5-VL, with megatron-core blocks.

Input: the flattened patches of all images of a micro-batch [patches, C * T * p * p] (the image
processor's `pixel_values`, patches of each image in m x m merge-block order) and one (t, h, w) grid
per image. The whole micro-batch is ONE varlen stream, no padding: blocks with full attention see
one segment per image (per frame), windowed blocks (Qwen2.5-VL) one segment per window.

As transformers computes it: a linear patch embedding (the Conv3d weight, stride = kernel), 2D
rotary angles per patch (row positions on the first half of each head's frequencies, columns on
the second), blocks with pre-norm attention and MLP (LayerNorm + fc1/act/fc2 for Qwen2-VL, RMSNorm
+ SwiGLU for Qwen2.5-VL, biases everywhere), then the merger's norm (`ln_post`) on every patch and
m^2 neighbouring patches concatenated into one vector for the projector (the norm trains with the
projector, as the merger is the projector: freeze_vit leaves it trainable). For windowed attention the
stream is reordered window by window (at merge-unit granularity, so a merge unit never straddles a
window) before the first block and put back in image order after the last.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_block import TransformerBlock
from megatron.core.transformer.transformer_config import TransformerConfig

from mmtrain.models.config import ModelConfig, vision_windowed_layers
from mmtrain.models import rope
from mmtrain.models.mrope import inv_freq, rotary_cos_sin

__all__ = ["NativeVisionEncoder", "patch_positions", "window_index"]


def _grids(grid_thw) -> np.ndarray:
    g = grid_thw.cpu().numpy() if isinstance(grid_thw, torch.Tensor) else np.asarray(grid_thw)
    return g.astype(np.int64).reshape(-1, 3)


def patch_positions(grid_thw, merge: int) -> np.ndarray:
    """int64 [patches, 2] (row, column) of every patch, in the processor's merge-block order:
    block row, block column, row within the block, column within the block; repeated per frame."""
    out = []
    for t, h, w in _grids(grid_thw).tolist():
        rows = np.arange(h).reshape(h // merge, 1, merge, 1)
        cols = np.arange(w).reshape(1, w // merge, 1, merge)
        r = np.broadcast_to(rows, (h // merge, w // merge, merge, merge)).reshape(-1)
        c = np.broadcast_to(cols, (h // merge, w // merge, merge, merge)).reshape(-1)
        out.append(np.tile(np.stack([r, c], axis=1), (t, 1)))
    return np.concatenate(out) if out else np.zeros((0, 2), np.int64)


def window_index(grid_thw, merge: int, window_merged: int) -> tuple[np.ndarray, np.ndarray]:
    """(order, window lengths): `order` lists the merge units of the stream window by window
    (per image and frame: windows of window_merged x window_merged units in row-major order, units
    row-major inside a window; the last row / column of windows may be partial), `lengths` the
    number of units in each window."""
    order, lengths, offset = [], [], 0
    for t, h, w in _grids(grid_thw).tolist():
        lh, lw = h // merge, w // merge
        f, r, c = np.meshgrid(np.arange(t), np.arange(lh), np.arange(lw), indexing="ij")
        f, r, c = f.ravel(), r.ravel(), c.ravel()
        key = (f * -(-lh // window_merged) + r // window_merged) * -(-lw // window_merged) + c // window_merged
        perm = np.lexsort((c, r, key))  # by window, then row, then column
        order.append(offset + perm)
        lengths.append(np.bincount(key)[np.unique(key)])
        offset += t * lh * lw
    if not order:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    return np.concatenate(order), np.concatenate(lengths)


def _cu(lengths: np.ndarray, device) -> tuple[torch.Tensor, int]:
    cu = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    return torch.from_numpy(cu).to(device), int(lengths.max()) if len(lengths) else 0


def _psp(cu: torch.Tensor, max_len: int) -> PackedSeqParams:
    return PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=max_len, max_seqlen_kv=max_len)


def _tables(angles: torch.Tensor) -> rope.RotaryTables:
    """fp32 cos/sin of the patches' 2D rotary angles: the rotation runs in fp32 whatever the
    activation dtype, as transformers' vision rotary does."""
    return rope.RotaryTables(*rotary_cos_sin(angles, torch.float32))


@dataclass
class VisionStream:
    """How one micro-batch's patches run through the ViT: attention segments of the full and the
    windowed blocks (each with the rotary of every patch), and the window order (None: image order)."""

    full: rope.RotaryPackedSeqParams
    windows: Optional[rope.RotaryPackedSeqParams]
    order: Optional[torch.Tensor]  # [units] merge units in window order
    restore: Optional[torch.Tensor]  # [units] its inverse


class _RMSNorm(torch.nn.Module):
    """Qwen2.5-VL's RMSNorm: normalised in fp32, scaled in the input dtype."""

    def __init__(self, hidden: int, eps: float) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(hidden))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x.float()
        y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * y.to(x.dtype)


class NativeVisionEncoder(MegatronModule):
    def __init__(self, cfg: ModelConfig, tcfg: TransformerConfig, layer_spec) -> None:
        super().__init__(config=tcfg)
        v = cfg.vision
        self.merge = v.spatial_merge_size
        self.unit = v.spatial_merge_size**2
        self.window_merged = v.window_size // v.spatial_merge_size // v.patch_size if v.window_size else None
        self.windowed = vision_windowed_layers(cfg)
        self.head_dim = v.hidden_size // v.num_attention_heads
        self.rotary_base = float(v.rotary_base)
        h = v.hidden_size
        k = (v.temporal_patch_size, v.patch_size, v.patch_size)
        # Held as transformers' Conv3d weight; applied as the equivalent matmul (stride = kernel).
        self.conv = torch.nn.Conv3d(v.in_channels, h, kernel_size=k, stride=k, bias=False)
        self.blocks = TransformerBlock(config=tcfg, spec=layer_spec, post_layer_norm=False)
        self.ln_post = torch.nn.LayerNorm(h, eps=v.norm_epsilon) if v.normalization == "LayerNorm" else _RMSNorm(h, v.norm_epsilon)

    def stream(self, grid_thw, device) -> VisionStream:
        """Segments, rotary and window order of the micro-batch's images (host-side grid)."""
        grids = _grids(grid_thw)
        pos = torch.from_numpy(patch_positions(grids, self.merge)).to(device)
        freqs = inv_freq(self.head_dim // 2, self.rotary_base, device=device)  # head_dim / 4 per axis
        angles = torch.cat([pos[:, :1].float() * freqs, pos[:, 1:].float() * freqs], dim=-1)  # [P, D/2]
        order = restore = None
        windows = None
        if self.window_merged is not None and any(self.windowed):
            units, wlen = window_index(grids, self.merge, self.window_merged)
            order = torch.from_numpy(units).to(device)
            restore = torch.from_numpy(np.argsort(units)).to(device)
            angles = self._to_windows(angles, order)
            windows = rope.with_rope(_psp(*_cu(wlen * self.unit, device)), _tables(angles))
        frames = np.repeat(grids[:, 1] * grids[:, 2], grids[:, 0])
        full = rope.with_rope(_psp(*_cu(frames, device)), _tables(angles))
        return VisionStream(full, windows, order, restore)

    def blank_image(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """One black one-frame image of a single merge unit (m x m patches) and its grid [1, 3]:
        what a micro-batch without images runs so that the ViT still gets its (zero) gradients."""
        w = self.conv.weight
        return torch.zeros(self.unit, w[0].numel(), device=device, dtype=w.dtype), torch.tensor([[1, self.merge, self.merge]])

    def _to_windows(self, x: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
        """Rows of x (one per patch) regrouped window by window, merge unit by merge unit."""
        return x.reshape(-1, self.unit, x.shape[-1])[order].reshape(x.shape)

    def embed(self, pixels: torch.Tensor) -> torch.Tensor:
        w = self.conv.weight
        return F.linear(pixels.to(w.dtype), w.reshape(w.shape[0], -1))

    def hidden_states(self, pixels: torch.Tensor, grid_thw, layers: int, s: Optional[VisionStream] = None) -> torch.Tensor:
        """[patches, hidden] after the first `layers` blocks, in the stream's (window) order."""
        s = s or self.stream(grid_thw, pixels.device)
        x = self.embed(pixels)
        if s.order is not None:
            x = self._to_windows(x, s.order)
        y = x[:, None]
        for layer, windowed in zip(self.blocks.layers[:layers], self.windowed):
            y, _ = layer(hidden_states=y, attention_mask=None, packed_seq_params=s.windows if windowed else s.full)
        return y[:, 0]

    def forward(self, pixels: torch.Tensor, grid_thw) -> torch.Tensor:
        """[patches / m^2, m^2 * hidden]: merged patch groups in image order, for the projector."""
        s = self.stream(grid_thw, pixels.device)
        y = self.ln_post(self.hidden_states(pixels, grid_thw, len(self.blocks.layers), s))
        y = y.reshape(-1, self.unit * y.shape[-1])
        return y[s.restore] if s.restore is not None else y
