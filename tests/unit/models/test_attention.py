"""Reference varlen attention vs dense masked attention; GPU backend vs reference (GPU only)."""

from __future__ import annotations

import math

import pytest
import torch

from mmtrain.models.attention import backends
from mmtrain.models.attention.reference import varlen_attention_reference


def dense_masked(q, k, v, cu, causal):
    """Attention over the whole stream with a block-diagonal (optionally causal) mask."""
    t, h, d = q.shape
    g = k.shape[1]
    seg = torch.zeros(t, dtype=torch.long)
    for i, (a, b) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        seg[a:b] = i
    allowed = seg[:, None] == seg[None, :]
    if causal:
        allowed &= torch.ones(t, t, dtype=torch.bool).tril()
    kk = k.repeat_interleave(h // g, dim=1)
    vv = v.repeat_interleave(h // g, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q.double(), kk.double()) / math.sqrt(d)
    scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), vv.double()).to(q.dtype)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_reference_matches_dense_masked(causal, seed):
    g = torch.Generator().manual_seed(seed)
    # random segments including length-1 segments and a trailing padding segment
    lens = [1, int(torch.randint(2, 40, (1,), generator=g)), 1, int(torch.randint(2, 40, (1,), generator=g)), 7]
    cu = torch.tensor([0] + list(torch.tensor(lens).cumsum(0)), dtype=torch.int32)
    t, h, kvh, d = int(cu[-1]), 4, 2, 16
    q = torch.randn(t, h, d, generator=g)
    k = torch.randn(t, kvh, d, generator=g)
    v = torch.randn(t, kvh, d, generator=g)
    out = varlen_attention_reference(q, k, v, cu, causal=causal)
    ref = dense_masked(q, k, v, cu, causal)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_reference_rejects_bad_gqa():
    q, k = torch.randn(4, 3, 8), torch.randn(4, 2, 8)
    with pytest.raises(ValueError, match="multiple"):
        varlen_attention_reference(q, k, k, torch.tensor([0, 4], dtype=torch.int32), causal=True)


def test_auto_backend_on_cpu_is_reference_and_named_gpu_backend_is_refused():
    assert backends.resolve("auto", torch.device("cpu"), torch.float32) == "reference"
    with pytest.raises(ValueError, match="cannot run"):
        backends.resolve("torch_varlen", torch.device("cpu"), torch.float32)
    with pytest.raises(ValueError, match="choose one of"):
        backends.resolve("nope", torch.device("cpu"), torch.float32)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("causal", [True, False])
def test_torch_varlen_matches_reference_bf16(causal):
    g = torch.Generator().manual_seed(0)
    lens = [1, 300, 17, 1024, 5]
    cu = torch.tensor([0] + list(torch.tensor(lens).cumsum(0)), dtype=torch.int32).cuda()
    t = int(cu[-1])
    q = torch.randn(t, 32, 128, generator=g).cuda().bfloat16()
    k = torch.randn(t, 8, 128, generator=g).cuda().bfloat16()
    v = torch.randn(t, 8, 128, generator=g).cuda().bfloat16()
    fast = backends.BACKENDS["torch_varlen"](q, k, v, cu, max(lens), causal, None)
    ref = varlen_attention_reference(q, k, v, cu, causal=causal)
    torch.testing.assert_close(fast.float(), ref.float(), rtol=2e-2, atol=2e-2)
