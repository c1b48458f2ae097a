"""Varlen attention backends behind one signature, chosen automatically or by name.

Signature: fn(q [T,H,D], k [T,G,D], v [T,G,D], cu_seqlens int32 [N+1], max_seqlen, causal, scale,
window=None) -> [T,H,D]. `window` (causal only) is transformers' sliding window: query i sees keys
i - window < j <= i, i.e. flash-attn's window_size=(window - 1, 0). GQA (G < H) is passed through to
kernels that take it natively, so K/V are never expanded on the fast paths. flash-attn and
transformer-engine are optional and import-guarded.

A backend counts as available only after a real import *and* a tiny forward + backward on this
device and dtype that matches the reference: a flash-attn or transformer-engine build that does not
match the installed torch is then skipped (with one warning) instead of crashing the first step.

  flash_attn / transformer_engine / torch_varlen  CUDA, bf16/fp16: one kernel over the whole stream
  torch_varlen_mha  torch_varlen with K/V expanded to the query heads (if a build refuses GQA)
  sdpa       any device and dtype: torch's fused attention one segment at a time (O(L) memory;
             CUDA fp32 takes the memory-efficient kernel); one host sync per call for the bounds
  dense      any device and dtype: one masked attention over the whole stream (T x T block-diagonal
             mask from cu_seqlens, no host sync, static shapes: traceable by torch.compile); small T only
  reference  plain matmuls one segment at a time (L x L scores): for tests and short segments
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import math
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from mmtrain.models.attention.reference import varlen_attention_reference

AttentionFn = Callable[..., torch.Tensor]
log = logging.getLogger("mmtrain")

# The reference path materialises [H, L, L] fp32 scores per segment; on a GPU it is refused for
# segments longer than this (a 5k-token segment would need ~3.5 GB per layer call).
REFERENCE_MAX_SEGMENT_ON_GPU = 1024


def _window_size(causal: bool, window) -> tuple[int, int]:
    """flash-attn's (left, right) for our causal flag and sliding window."""
    if window is not None:
        if not causal:
            raise ValueError("sliding-window attention is causal only")
        return (window - 1, 0)
    return (-1, 0) if causal else (-1, -1)


def _reference(q, k, v, cu_seqlens, max_seqlen, causal, scale, window=None):
    return varlen_attention_reference(q, k, v, cu_seqlens, causal=causal, scale=scale, window=window)


def _sdpa(q, k, v, cu_seqlens, max_seqlen, causal, scale, window=None):
    """torch's scaled_dot_product_attention per segment (memory-efficient / flash / math kernels)."""
    if window is not None and not causal:
        raise ValueError("sliding-window attention is causal only")
    heads, groups = q.shape[1], k.shape[1]
    if heads % groups:
        raise ValueError(f"query heads {heads} not a multiple of key/value heads {groups}")
    rep = heads // groups
    bounds = cu_seqlens.tolist()
    parts = []
    for start, end in zip(bounds[:-1], bounds[1:]):
        if end == start:
            continue
        qs = q[start:end].transpose(0, 1)[None]  # [1, H, L, D]
        ks = k[start:end].transpose(0, 1)
        vs = v[start:end].transpose(0, 1)
        if rep > 1:
            ks, vs = ks.repeat_interleave(rep, dim=0), vs.repeat_interleave(rep, dim=0)
        mask, is_causal = None, causal
        if window is not None:
            n = end - start
            i = torch.arange(n, device=q.device)
            mask = (i[None, :] <= i[:, None]) & (i[None, :] > i[:, None] - window)
            is_causal = False
        o = F.scaled_dot_product_attention(qs, ks[None], vs[None], attn_mask=mask, is_causal=is_causal, scale=scale)
        parts.append(o[0].transpose(0, 1))
    tail = q.shape[0] - (bounds[-1] if bounds else 0)
    if tail > 0 or not parts:
        parts.append(q.new_zeros(max(tail, 0), heads, v.shape[-1]))
    return torch.cat(parts, dim=0)


def _dense(q, k, v, cu_seqlens, max_seqlen, causal, scale, window=None):
    """Whole-stream attention under a block-diagonal mask built on the device from cu_seqlens."""
    if window is not None and not causal:
        raise ValueError("sliding-window attention is causal only")
    total, heads = q.shape[0], q.shape[1]
    rep = heads // k.shape[1]
    pos = torch.arange(total, device=q.device)
    seg = torch.searchsorted(cu_seqlens[1:].to(torch.int64), pos, right=True)  # segment of every token
    allowed = seg[:, None] == seg[None, :]
    if causal:
        allowed = allowed & (pos[None, :] <= pos[:, None])
    if window is not None:
        allowed = allowed & (pos[None, :] > pos[:, None] - window)
    ks = k.repeat_interleave(rep, dim=1) if rep > 1 else k
    vs = v.repeat_interleave(rep, dim=1) if rep > 1 else v
    o = F.scaled_dot_product_attention(q.transpose(0, 1), ks.transpose(0, 1), vs.transpose(0, 1), attn_mask=allowed, scale=scale)
    return o.transpose(0, 1)


def _torch_varlen(q, k, v, cu_seqlens, max_seqlen, causal, scale, window=None):
    from torch.nn.attention.varlen import varlen_attn

    cu = cu_seqlens.to(torch.int32)
    return varlen_attn(q, k, v, cu, cu, max_seqlen, max_seqlen, scale=scale, window_size=_window_size(causal, window))


def _torch_varlen_mha(q, k, v, cu_seqlens, max_seqlen, causal, scale, window=None):
    """torch_varlen with K/V expanded to the query head count: the fallback should a torch build's
    varlen kernel not take fewer K/V heads (its probe decides)."""
    rep = q.shape[1] // k.shape[1]
    if rep > 1:
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    return _torch_varlen(q, k, v, cu_seqlens, max_seqlen, causal, scale, window)


def _flash_attn(q, k, v, cu_seqlens, max_seqlen, causal, scale, window=None):  # pragma: no cover - needs flash-attn
    from flash_attn import flash_attn_varlen_func

    cu = cu_seqlens.to(torch.int32)
    return flash_attn_varlen_func(
        q, k, v, cu, cu, max_seqlen, max_seqlen, softmax_scale=scale, causal=causal, window_size=_window_size(causal, window)
    )


_TE_MODULES: dict[tuple, torch.nn.Module] = {}


def _transformer_engine(q, k, v, cu_seqlens, max_seqlen, causal, scale, window=None):  # pragma: no cover - needs TE
    import transformer_engine.pytorch as te

    key = (q.shape[1], k.shape[1], q.shape[2], causal, scale, window)
    if key not in _TE_MODULES:
        _TE_MODULES[key] = te.DotProductAttention(
            num_attention_heads=q.shape[1],
            kv_channels=q.shape[2],
            num_gqa_groups=k.shape[1],
            attn_mask_type="padding_causal" if causal else "padding",
            qkv_format="thd",
            softmax_scale=scale,
            window_size=_window_size(causal, window),
        )
    cu = cu_seqlens.to(torch.int32)
    out = _TE_MODULES[key](q, k, v, cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=max_seqlen, max_seqlen_kv=max_seqlen)
    return out.view(q.shape[0], q.shape[1], -1)


BACKENDS: dict[str, AttentionFn] = {
    "flash_attn": _flash_attn,
    "transformer_engine": _transformer_engine,
    "torch_varlen": _torch_varlen,
    "torch_varlen_mha": _torch_varlen_mha,
    "sdpa": _sdpa,
    "dense": _dense,
    "reference": _reference,
}
# The module each optional backend needs; a missing one is "not installed" (no warning).
_MODULES = {
    "flash_attn": "flash_attn",
    "transformer_engine": "transformer_engine",
    "torch_varlen": "torch.nn.attention.varlen",
    "torch_varlen_mha": "torch.nn.attention.varlen",
}
_FAST = ("flash_attn", "transformer_engine", "torch_varlen", "torch_varlen_mha")  # CUDA, bf16/fp16 only

AUTO_ORDER = ("flash_attn", "torch_varlen", "torch_varlen_mha", "transformer_engine", "sdpa", "reference")


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def probe_inputs(device: torch.device, dtype: torch.dtype, seed: int = 0, dim: int = 64, gqa: bool = True):
    """A tiny stream: two causal segments (3 and 5 tokens), 4 query heads over 2 KV groups (or 4)."""
    g = torch.Generator().manual_seed(seed)
    cu = torch.tensor([0, 3, 8], dtype=torch.int32, device=device)
    kv = 2 if gqa else 4
    q = torch.randn(8, 4, dim, generator=g).to(device, dtype)
    k = torch.randn(8, kv, dim, generator=g).to(device, dtype)
    v = torch.randn(8, kv, dim, generator=g).to(device, dtype)
    return q, k, v, cu


def _probe(name: str, device: torch.device, dtype: torch.dtype, dim: int = 64, gqa: bool = True) -> Optional[str]:
    """None when `name` imports and computes the tiny case (forward and backward) like the
    reference; else why not."""
    module = _MODULES.get(name)
    if module is not None:
        try:
            importlib.import_module(module)
        except Exception as e:  # a broken build raises anything from ImportError to OSError
            return f"import {module} failed: {type(e).__name__}: {e}"
    try:
        q, k, v, cu = probe_inputs(device, dtype, dim=dim, gqa=gqa)
        qs, ks, vs = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
        out = BACKENDS[name](qs, ks, vs, cu, 5, True, None)
        out.float().square().sum().backward()
        qr, kr, vr = (t.detach().float().requires_grad_(True) for t in (q, k, v))
        ref = varlen_attention_reference(qr, kr, vr, cu, causal=True)
        ref.square().sum().backward()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    except Exception as e:
        return f"a test call failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    tol = 1e-3 if dtype == torch.float32 else 0.25  # bf16 attention lands near 5e-2 on these 8 tokens; broken builds at O(1)
    for what, a, b in (("output", out, ref), ("dq", qs.grad, qr.grad), ("dk", ks.grad, kr.grad), ("dv", vs.grad, vr.grad)):
        if a is None or a.shape != b.shape:
            return f"the test call gave no {what} of the right shape"
        a, b = a.detach().float(), b.detach()
        err = float((a - b).abs().max()) / max(float(b.square().mean().sqrt()), 1e-6)
        if not math.isfinite(err) or err > tol:
            return f"the test call's {what} differs from the reference ({err:.2e} of its RMS)"
    return None


_PROBED: dict[tuple, Optional[str]] = {}


def unavailable_reason(name: str, device: torch.device, dtype: torch.dtype, dim: int = 64, gqa: bool = True) -> Optional[str]:
    """None if backend `name` can run tensors of this device and dtype (and head dim, GQA or not)
    here, else why not (cached)."""
    if name not in BACKENDS:
        raise KeyError(name)
    if name == "reference":
        return None
    half = dtype in (torch.float16, torch.bfloat16)
    if name in _FAST:
        if device.type != "cuda":
            return "needs CUDA"
        if not half:
            return f"needs bf16/fp16, not {dtype}"
        if not _installed(_MODULES[name]):
            return f"{_MODULES[name]} is not installed"
    key = (name, device.type, device.index, dtype, dim, gqa)
    if key not in _PROBED:
        _PROBED[key] = _probe(name, device, dtype, dim, gqa)
    return _PROBED[key]


def available(name: str, device: torch.device, dtype: torch.dtype, dim: int = 64, gqa: bool = True) -> bool:
    """Whether backend `name` can run tensors of this device and dtype here."""
    return unavailable_reason(name, device, dtype, dim, gqa) is None


_WARNED: set[tuple] = set()


def _auto_candidates(device: torch.device, dtype: torch.dtype) -> tuple[str, ...]:
    if device.type != "cuda":
        return ("reference",)  # CPU: the exact path the tests compare everything against
    return tuple(n for n in AUTO_ORDER if n != "reference")  # never per-segment L x L scores on a GPU


def resolve(name: str, device: torch.device, dtype: torch.dtype, dim: int = 64, gqa: bool = True) -> str:
    """Pick a backend: `auto` takes the first available in AUTO_ORDER (CUDA: never `reference`; an
    installed backend that fails its test call is skipped with one warning); a named one must be
    available."""
    if name == "auto":
        for cand in _auto_candidates(device, dtype):
            why = unavailable_reason(cand, device, dtype, dim, gqa)
            if why is None:
                return cand
            failed_probe = _PROBED.get((cand, device.type, device.index, dtype, dim, gqa)) is not None
            if failed_probe and (cand, device.type, dtype) not in _WARNED:  # installed, but broken here
                _WARNED.add((cand, device.type, dtype))
                log.warning("attention backend %s is installed but unusable here (%s); trying the next one", cand, why)
        raise RuntimeError(f"no attention backend can run {device.type}/{dtype} here")
    if name not in BACKENDS:
        raise ValueError(f"model.attention_backend={name!r}: choose one of auto, {', '.join(BACKENDS)}")
    why = unavailable_reason(name, device, dtype, dim, gqa)
    if why is not None:
        raise ValueError(
            f"model.attention_backend={name!r} cannot run on {device.type}/{dtype} here: {why} "
            "(fast backends need CUDA and bf16/fp16; use model.attention_backend=auto)"
        )
    return name
