"""Reference varlen attention: one segment at a time with plain matmuls, on any device.

Slow but obviously correct; every fast backend is tested against it.
"""

from __future__ import annotations

import math

import torch


def varlen_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    *,
    causal: bool,
    scale: float | None = None,
    window: int | None = None,
) -> torch.Tensor:
    """q [T, H, D], k/v [T, G, D] with H % G == 0 (GQA); segments given by int cu_seqlens [N+1].

    window (causal only): query i sees keys i - window < j <= i of its segment (transformers'
    sliding-window semantics, `window` keys including itself). Returns [T, H, D]. Tokens outside
    cu_seqlens[-1] (if any) are left at zero.
    """
    total, heads, dim = q.shape
    groups = k.shape[1]
    if heads % groups:
        raise ValueError(f"query heads {heads} not a multiple of key/value heads {groups}")
    if window is not None and not causal:
        raise ValueError("sliding-window attention is causal only")
    scale = 1.0 / math.sqrt(dim) if scale is None else scale
    out = q.new_zeros(total, heads, v.shape[-1])
    bounds = cu_seqlens.tolist()
    for start, end in zip(bounds[:-1], bounds[1:]):
        if end == start:
            continue
        qs = q[start:end].transpose(0, 1)  # [H, s, D]
        ks = k[start:end].transpose(0, 1).repeat_interleave(heads // groups, dim=0)
        vs = v[start:end].transpose(0, 1).repeat_interleave(heads // groups, dim=0)
        scores = torch.matmul(qs.float(), ks.float().transpose(-1, -2)) * scale
        if causal:
            n = end - start
            mask = torch.ones(n, n, dtype=torch.bool, device=q.device).triu(1)
            if window is not None:
                mask |= torch.ones(n, n, dtype=torch.bool, device=q.device).tril(-window)
            scores = scores.masked_fill(mask, float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        out[start:end] = torch.matmul(probs, vs.float()).transpose(0, 1).to(out.dtype)
    return out
