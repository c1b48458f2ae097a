"""Sliding-window attention in the reference backend equals transformers' own mask semantics."""

from __future__ import annotations

import math

import pytest
import torch

from mmtrain.models.attention import backends
from mmtrain.models.attention.reference import varlen_attention_reference


def transformers_masked(q, k, v, cu, window):
    """Dense attention with the mask transformers builds (`sliding_window_causal_mask_function`),
    applied within each segment."""
    from transformers.masking_utils import sliding_window_causal_mask_function

    fn = sliding_window_causal_mask_function(window)
    h, g = q.shape[1], k.shape[1]
    out = torch.zeros(q.shape, dtype=torch.float64)
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
        n = b - a
        i, j = torch.arange(n)[:, None], torch.arange(n)[None, :]
        allowed = fn(torch.tensor(0), torch.tensor(0), i, j)
        kk = k[a:b].double().repeat_interleave(h // g, dim=1)
        vv = v[a:b].double().repeat_interleave(h // g, dim=1)
        s = torch.einsum("qhd,khd->hqk", q[a:b].double(), kk) / math.sqrt(q.shape[-1])
        out[a:b] = torch.einsum("hqk,khd->qhd", s.masked_fill(~allowed, float("-inf")).softmax(-1), vv)
    return out.to(q.dtype)


@pytest.mark.parametrize("window", [1, 3, 8, 100])
def test_reference_window_equals_transformers_mask(window):
    g = torch.Generator().manual_seed(window)
    cu = torch.tensor([0, 1, 13, 20, 40], dtype=torch.int32)
    q, k, v = (torch.randn(40, n, 8, generator=g) for n in (4, 2, 2))
    ours = backends.BACKENDS["reference"](q, k, v, cu, 20, True, None, window)
    torch.testing.assert_close(ours, transformers_masked(q, k, v, cu, window), rtol=1e-5, atol=1e-5)
    if window < 12:  # the window really cuts: full causal attention differs
        assert not torch.allclose(ours, varlen_attention_reference(q, k, v, cu, causal=True), atol=1e-4)


def test_window_maps_to_flash_attn_window_size():
    assert backends._window_size(True, 4096) == (4095, 0)
    assert backends._window_size(True, None) == (-1, 0) and backends._window_size(False, None) == (-1, -1)
    with pytest.raises(ValueError, match="causal"):
        varlen_attention_reference(torch.randn(2, 1, 4), torch.randn(2, 1, 4), torch.randn(2, 1, 4),
                                   torch.tensor([0, 2], dtype=torch.int32), causal=False, window=2)
