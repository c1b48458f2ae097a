"""The attention kernels on a real GPU against the reference, forward and backward, on q/k/v exactly as
megatron-core hands them over (k and v strided views of the fused QKV output, GQA 32 heads over 8
groups, head dim 128), judged per segment (tests/attention_checks.py). Run by bench/gpu_check.sh."""

from __future__ import annotations

import pytest
import torch
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.transformer_config import TransformerConfig

from attention_checks import check_segments, megatron_qkv_views
from mmtrain.models.attention import backends
from mmtrain.models.attention.core import VarlenCoreAttention
from mmtrain.models.attention.reference import varlen_attention_reference

pytestmark = pytest.mark.gpu

LENGTHS = [1, 300, 17, 2048, 5, 640]


def _cu(lengths, device="cuda"):
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=device)


def _grads(out, inputs, g):
    return torch.autograd.grad(out, inputs, g)


def _run(fn, cu, causal, window, dtype, seed=0):
    t = int(cu[-1])
    q, k, v, _ = megatron_qkv_views(t, 32, 8, 128, dtype, "cuda", seed=seed)
    assert not k.is_contiguous() and not v.is_contiguous() and k.stride(-1) == 1
    max_len = int((cu[1:] - cu[:-1]).max())
    out = fn(q, k, v, cu, max_len, causal, None, window)
    g = torch.randn(out.shape, generator=torch.Generator(device="cuda").manual_seed(seed + 1), device="cuda", dtype=out.dtype)
    dq, dk, dv = _grads(out, (q, k, v), g)
    qr, kr, vr = (x.detach().float().requires_grad_(True) for x in (q, k, v))
    ref = varlen_attention_reference(qr, kr, vr, cu, causal=causal, window=window)
    rq, rk, rv = _grads(ref, (qr, kr, vr), g.float())
    return (out, dq, dk, dv), (ref, rq, rk, rv)


def _fast_backends():
    return [n for n in ("torch_varlen", "torch_varlen_mha", "flash_attn", "transformer_engine") if n in backends.BACKENDS]


@pytest.mark.parametrize("name", _fast_backends())
@pytest.mark.parametrize("causal,window", [(True, None), (False, None), (True, 256)], ids=["causal", "bidirectional", "window256"])
def test_varlen_kernel_matches_reference_forward_and_backward(name, causal, window):
    why = backends.unavailable_reason(name, torch.device("cuda"), torch.bfloat16)
    if why is not None:
        pytest.skip(f"{name}: {why}")
    cu = _cu(LENGTHS)
    fast, ref = _run(backends.BACKENDS[name], cu, causal, window, torch.bfloat16)
    for what, a, b in zip(("output", "dq", "dk", "dv"), fast, ref):
        check_segments(a, b, cu, f"{name} {what}")


def test_torch_varlen_takes_empty_segments():
    """Static shapes (perf.compile) pad cu_seqlens with empty segments at the end."""
    cu = _cu(LENGTHS + [0, 0, 0])
    fast, ref = _run(backends.BACKENDS["torch_varlen"], cu, True, None, torch.bfloat16, seed=4)
    for what, a, b in zip(("output", "dq", "dk", "dv"), fast, ref):
        check_segments(a, b, cu, f"empty segments {what}")


def test_fp32_on_cuda_runs_sdpa_not_the_reference():
    dev = torch.device("cuda")
    assert backends.resolve("auto", dev, torch.bfloat16) in ("flash_attn", "torch_varlen", "torch_varlen_mha", "transformer_engine")
    assert backends.resolve("auto", dev, torch.float32) == "sdpa"
    cu = _cu([3, 700, 64])
    fast, ref = _run(backends.BACKENDS["sdpa"], cu, True, None, torch.float32, seed=2)
    for a, b in zip(fast, ref):
        torch.testing.assert_close(a.float(), b, rtol=2e-3, atol=2e-3)


def test_reference_is_refused_for_long_segments_on_cuda():
    cfg = TransformerConfig(num_layers=1, hidden_size=128, num_attention_heads=4, use_cpu_initialization=True)
    core = VarlenCoreAttention(cfg, layer_number=1, attn_mask_type=AttnMaskType.causal, backend="reference")
    n = backends.REFERENCE_MAX_SEGMENT_ON_GPU + 1
    cu = _cu([n])
    q = torch.zeros(n, 4, 32, device="cuda")
    psp = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=n, max_seqlen_kv=n)
    with pytest.raises(ValueError, match="reference on CUDA"):
        core(q, q, q, None, packed_seq_params=psp)
