"""Rotary position embedding for packed (thd) streams, driven by per-token position ids.

megatron-core's thd rope splits the stream at every cu_seqlens boundary on the host (`.tolist()`,
`.item()`), then runs about a dozen small kernels per segment, for q and k, in every layer. Here the
model turns the micro-batch's position ids (which restart at 0 for every sample) into per-token
frequencies once per micro-batch, `RotaryTables` keeps their cos/sin, and every layer applies them to
the whole stream at once: no host sync, no per-segment work, and the same numbers as megatron's path
(the same fp32 outer product, cos/sin cast to the activation dtype, `t * cos + rotate_half(t) * sin`).

The contract is per token: anything that can say which frequencies each token rotates by can use it.
`freqs_from_positions` covers 1-D positions; multi-axis schemes (Qwen2-VL's mRoPE: per-axis positions,
frequency sections taken from different axes) build their own [T, 1, 1, rot_dim] freqs and hand them
to `RotaryTables.from_freqs`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from megatron.core.packed_seq_params import PackedSeqParams


def inv_freq(rot_dim: int, base: float, device: Optional[torch.device] = None) -> torch.Tensor:
    """[rot_dim / 2] fp32 inverse frequencies, base^(-2i / rot_dim) (megatron's and transformers' formula)."""
    if rot_dim % 2:
        raise ValueError(f"rotary dimension {rot_dim} must be even")
    return 1.0 / (base ** (torch.arange(0, rot_dim, 2, dtype=torch.float32, device=device) / rot_dim))


def freqs_from_positions(position_ids: torch.Tensor, inv: torch.Tensor) -> torch.Tensor:
    """Per-token rotation angles [T, 1, 1, rot_dim] (fp32) from 1-D position ids [T].

    Halves are repeated ([f, f]), the non-interleaved layout of megatron and transformers.
    """
    if position_ids.dim() != 1:
        raise ValueError(f"position_ids must be [T], got shape {tuple(position_ids.shape)}")
    f = position_ids.to(torch.float32)[:, None] * inv.to(position_ids.device)[None, :]  # [T, rot/2]
    return torch.cat((f, f), dim=-1)[:, None, None, :]


@dataclass
class RotaryTables:
    """cos / sin [T, 1, rot_dim] in the activation dtype, shared by every layer of a micro-batch."""

    cos: torch.Tensor
    sin: torch.Tensor

    @classmethod
    def from_freqs(cls, freqs: torch.Tensor, dtype: torch.dtype) -> "RotaryTables":
        f = freqs.reshape(freqs.shape[0], 1, freqs.shape[-1])
        return cls(cos=torch.cos(f).to(dtype), sin=torch.sin(f).to(dtype))

    @property
    def rot_dim(self) -> int:
        return int(self.cos.shape[-1])


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = torch.chunk(x, 2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def _rope_eager(t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return t * cos + _rotate_half(t) * sin


# Compiled lazily at its first call; made here, not at that call, so that a first call inside
# another compiled region (perf.compile=layers) finds it already wrapped.
_rope_fused = torch.compile(_rope_eager, dynamic=True, fullgraph=True)


def fused_kernels_work(device: torch.device, dtype: torch.dtype) -> Optional[str]:
    """None when torch.compile can generate and run kernels here (the fused rope on a tiny stream,
    forward and backward, equal to the eager formula); else why not. The symbolic-shape kernels it
    builds are the ones real streams reuse, so on a working machine this costs nothing extra."""
    try:
        g = torch.Generator().manual_seed(0)
        t = torch.randn(6, 2, 8, generator=g).to(device, dtype).requires_grad_(True)
        tables = RotaryTables.from_freqs(freqs_from_positions(torch.arange(6, device=device) % 4, inv_freq(8, 100.0, device)), dtype)
        out = _rope_fused(t, tables.cos, tables.sin)
        (grad,) = torch.autograd.grad(out.float().square().sum(), t)
        ref = _rope_eager(t, tables.cos, tables.sin)
        (ref_grad,) = torch.autograd.grad(ref.float().square().sum(), t)
        tol = 1e-5 if dtype == torch.float32 else 2e-2
        if not (torch.allclose(out.float(), ref.float(), atol=tol, rtol=tol) and torch.allclose(grad.float(), ref_grad.float(), atol=tol, rtol=tol)):
            return "the compiled rope differs from the eager formula"
    except Exception as e:  # a missing compiler or Triton toolchain raises anything
        return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    return None


def apply_rotary(t: torch.Tensor, tables: RotaryTables, fused: bool = False) -> torch.Tensor:
    """Rotate the first rot_dim channels of every head of t [T, heads, dim] by its token's angles."""
    rot = tables.rot_dim
    cos, sin = tables.cos, tables.sin
    out_dtype = t.dtype
    if cos.dtype == torch.float32 and t.dtype != torch.float32:
        t = t.float()  # fp32 tables (the native ViT's 2D rotary): rotate in fp32, as transformers does
    elif cos.dtype != t.dtype:
        cos, sin = cos.to(t.dtype), sin.to(t.dtype)
    fn = _rope_fused if fused else _rope_eager
    if rot == t.shape[-1]:
        return fn(t, cos, sin).to(out_dtype)
    return torch.cat((fn(t[..., :rot], cos, sin), t[..., rot:]), dim=-1).to(out_dtype)


@dataclass
class RotaryPackedSeqParams(PackedSeqParams):
    """megatron's PackedSeqParams plus this micro-batch's rope tables: the attention core applies
    them to q and k (megatron's own rope is off for the decoder)."""

    rope: Optional[RotaryTables] = None
    fused_rope: bool = False


def with_rope(psp: PackedSeqParams, tables: RotaryTables, fused: bool = False) -> RotaryPackedSeqParams:
    """A copy of `psp` carrying the rope tables (the caller's object is left as it was)."""
    fields = {k: getattr(psp, k) for k in psp.__dataclass_fields__}
    return RotaryPackedSeqParams(**fields, rope=tables, fused_rope=fused)
