"""Varlen attention backends behind one signature, chosen automatically or by name.

Signature: fn(q [T,H,D], k [T,G,D], v [T,G,D], cu_seqlens int32 [N+1], max_seqlen, causal, scale,
window=None) -> [T,H,D]. `window` (causal only) is transformers' sliding window: query i sees keys
i - window < j <= i, i.e. flash-attn's window_size=(window - 1, 0). GQA (G < H) is passed through to kernels that take it natively, so K/V are never
expanded on the fast paths. flash-attn and transformer-engine are optional and import-guarded.
"""

from __future__ import annotations

import importlib.util
from typing import Callable

import torch

from mmtrain.models.attention.reference import varlen_attention_reference

AttentionFn = Callable[..., torch.Tensor]


def _window_size(causal: bool, window) -> tuple[int, int]:
    """flash-attn's (left, right) for our causal flag and sliding window."""
    if window is not None:
        if not causal:
            raise ValueError("sliding-window attention is causal only")
        return (window - 1, 0)
    return (-1, 0) if causal else (-1, -1)


def _reference(q, k, v, cu_seqlens, max_seqlen, causal, scale, window=None):
    return varlen_attention_reference(q, k, v, cu_seqlens, causal=causal, scale=scale, window=window)


def _torch_varlen(q, k, v, cu_seqlens, max_seqlen, causal, scale, window=None):
    from torch.nn.attention.varlen import varlen_attn

    cu = cu_seqlens.to(torch.int32)
    return varlen_attn(q, k, v, cu, cu, max_seqlen, max_seqlen, scale=scale, window_size=_window_size(causal, window))


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
    "reference": _reference,
}


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def available(name: str, device: torch.device, dtype: torch.dtype) -> bool:
    """Whether backend `name` can run tensors of this device and dtype here."""
    half = dtype in (torch.float16, torch.bfloat16)
    if name == "reference":
        return True
    if device.type != "cuda" or not half:
        return False
    if name == "torch_varlen":
        return importlib.util.find_spec("torch.nn.attention.varlen") is not None
    if name == "flash_attn":
        return _installed("flash_attn")
    if name == "transformer_engine":
        return _installed("transformer_engine")
    raise KeyError(name)


AUTO_ORDER = ("flash_attn", "transformer_engine", "torch_varlen", "reference")


def resolve(name: str, device: torch.device, dtype: torch.dtype) -> str:
    """Pick a backend: `auto` takes the first available in AUTO_ORDER; a named one must be available."""
    if name == "auto":
        return next(n for n in AUTO_ORDER if available(n, device, dtype))
    if name not in BACKENDS:
        raise ValueError(f"model.attention_backend={name!r}: choose one of auto, {', '.join(BACKENDS)}")
    if not available(name, device, dtype):
        raise ValueError(
            f"model.attention_backend={name!r} cannot run on {device.type}/{dtype} here "
            "(fast backends need CUDA and bf16/fp16; flash_attn / transformer_engine must be installed)"
        )
    return name
