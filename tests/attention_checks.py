"""How a fast varlen attention kernel is judged against the reference: per segment, relative to that
segment's RMS, with each segment's boundary tokens checked on their own.

A kernel that lets one token see across a cu_seqlens boundary (an off-by-one segment) changes the
first tokens of the next segment by about the values' own size (a token that should see 1 key sees 2)
while the long rest of the segment hardly moves: a whole-tensor tolerance can miss it, a per-segment
max relative to the segment's RMS cannot. tests/unit/models/test_attention.py proves both halves on
the CPU (bf16 rounding passes, an off-by-one fails); tests/gpu/ applies it to the real kernels.
"""

from __future__ import annotations

import torch

# max |fast - ref| over a segment / RMS(ref of that segment). Attention computed in bf16 (bf16
# scores and probabilities, fp32 softmax, as flash kernels do) lands at <= 0.13 on the CPU test's
# stream; a boundary off by one token gives >= 4.
SEGMENT_TOL = 0.3
BOUNDARY_TOL = 0.3  # the same for the first and last token of each segment alone


def segment_errors(fast: torch.Tensor, ref: torch.Tensor, cu_seqlens: torch.Tensor) -> list[dict]:
    """Per non-empty segment: its bounds, the max error over it and over its boundary tokens, both
    relative to the segment's reference RMS."""
    fast, ref = fast.detach().float().cpu(), ref.detach().float().cpu()
    out = []
    bounds = cu_seqlens.tolist()
    for i, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
        if b == a:
            continue
        r = ref[a:b]
        rms = float(r.square().mean().sqrt().clamp_min(1e-6))
        err = (fast[a:b] - r).abs()
        edge = torch.stack([err[0], err[-1]])
        out.append({"segment": i, "start": a, "end": b, "rel": float(err.max()) / rms, "boundary_rel": float(edge.max()) / rms})
    return out


def check_segments(fast: torch.Tensor, ref: torch.Tensor, cu_seqlens: torch.Tensor, what: str = "output") -> None:
    """Fail naming the first segment whose error (or boundary-token error) is out of tolerance."""
    if fast.shape != ref.shape:
        raise AssertionError(f"{what}: shape {tuple(fast.shape)} != reference {tuple(ref.shape)}")
    for e in segment_errors(fast, ref, cu_seqlens):
        if not (e["rel"] <= SEGMENT_TOL and e["boundary_rel"] <= BOUNDARY_TOL):
            raise AssertionError(
                f"{what}: segment {e['segment']} [{e['start']}, {e['end']}) differs from the reference by "
                f"{e['rel']:.3g} of its RMS ({e['boundary_rel']:.3g} at its boundary tokens; tolerance {SEGMENT_TOL})"
            )


def megatron_qkv_views(total: int, heads: int, groups: int, dim: int, dtype, device, seed: int = 0):
    """q, k, v as megatron-core's SelfAttention hands them to the core attention for thd input: one
    fused QKV projection output [T, 1, groups * (heads/groups + 2) * dim] viewed per query group and
    split, so k and v are strided views (stride (heads/groups + 2) * dim between groups) and q is
    the reshaped copy. Returns (q, k, v, mixed) with `mixed` a leaf that collects their gradients."""
    g = torch.Generator().manual_seed(seed)
    per = heads // groups
    mixed = torch.randn(total, 1, groups * (per + 2) * dim, generator=g).to(device, dtype).requires_grad_(True)
    x = mixed.view(total, 1, groups, (per + 2) * dim)
    q, k, v = torch.split(x, [per * dim, dim, dim], dim=3)
    q = q.reshape(total, 1, heads, dim).squeeze(1)
    k = k.squeeze(1)  # [T, groups, dim], not contiguous
    v = v.squeeze(1)
    return q, k, v, mixed


def bf16_attention(q, k, v, cu_seqlens, max_seqlen, causal, scale, window=None):
    """Causal/bidirectional varlen attention with a flash kernel's bf16 roundings (bf16 operands,
    fp32 scores and softmax, bf16 probabilities into the PV product): the error level a correct bf16
    kernel is expected to show against the fp32 reference."""
    heads, groups = q.shape[1], k.shape[1]
    rep = heads // groups
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    outs = []
    bounds = cu_seqlens.tolist()
    for a, b in zip(bounds[:-1], bounds[1:]):
        if b == a:
            continue
        qs = q[a:b].transpose(0, 1).bfloat16()
        ks = k[a:b].transpose(0, 1).repeat_interleave(rep, 0).bfloat16()
        vs = v[a:b].transpose(0, 1).repeat_interleave(rep, 0).bfloat16()
        s = (qs @ ks.transpose(-1, -2)).float() * scale
        if causal:
            s = s.masked_fill(torch.ones(b - a, b - a, dtype=torch.bool, device=s.device).triu(1), float("-inf"))
        outs.append((s.softmax(-1).bfloat16() @ vs).transpose(0, 1))
    return torch.cat(outs).float()
