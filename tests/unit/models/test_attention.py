"""Reference varlen attention vs dense masked attention; the CPU-capable backends (sdpa, dense) vs the
reference, forward and backward; how backends are picked and probed; the per-segment tolerance the
GPU kernel tests use (tests/gpu/) is proved able to catch an off-by-one segment."""

from __future__ import annotations

import math

import pytest
import torch

from attention_checks import bf16_attention, check_segments, megatron_qkv_views
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


def _cu(lengths):
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)


def _fwd_bwd(fn, q, k, v, cu, causal, window=None):
    qs, ks, vs = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    out = fn(qs, ks, vs, cu, int((cu[1:] - cu[:-1]).max()), causal, None, window)
    g = torch.Generator().manual_seed(5)
    out.backward(torch.randn(out.shape, generator=g))
    return out.detach(), qs.grad, ks.grad, vs.grad


@pytest.mark.parametrize("name", ["sdpa", "dense"])
@pytest.mark.parametrize("causal,window", [(True, None), (False, None), (True, 4)])
def test_cpu_backends_match_the_reference_forward_and_backward(name, causal, window):
    cu = _cu([1, 9, 0, 23, 4]) if name == "dense" else _cu([1, 9, 23, 4])  # dense: empty segments too
    q, k, v, _ = megatron_qkv_views(int(cu[-1]), heads=4, groups=2, dim=8, dtype=torch.float32, device="cpu")
    assert not k.is_contiguous() and not v.is_contiguous()
    fast = _fwd_bwd(backends.BACKENDS[name], q, k, v, cu, causal, window)
    ref = _fwd_bwd(backends.BACKENDS["reference"], q, k, v, cu, causal, window)
    for a, b in zip(fast, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_segment_tolerance_passes_bf16_attention_and_catches_an_off_by_one_segment():
    """The GPU kernel tests judge bf16 kernels with check_segments: attention computed with a flash
    kernel's bf16 roundings must pass, and a stream whose 4th boundary moved by one token (either
    way) must fail, forward and backward."""
    cu = _cu([200, 1, 300, 57, 600])
    q, k, v, _ = megatron_qkv_views(int(cu[-1]), heads=8, groups=2, dim=64, dtype=torch.float32, device="cpu", seed=3)
    q, k, v = (t.detach().bfloat16().float() for t in (q, k, v))  # the kernel's inputs, exactly
    ref = _fwd_bwd(backends.BACKENDS["reference"], q, k, v, cu, True)
    for what, a, b in zip(("output", "dq", "dk", "dv"), _fwd_bwd(bf16_attention, q, k, v, cu, True), ref):
        check_segments(a, b, cu, what)
    late, early = cu.clone(), cu.clone()
    late[3] += 1  # the 57-token sample's first token joins the 300-token one
    early[3] -= 1
    for shifted in (late, early):
        wrong = _fwd_bwd(backends.BACKENDS["reference"], q, k, v, shifted, True)
        for what, a, b in zip(("output", "dq", "dk", "dv"), wrong, ref):
            with pytest.raises(AssertionError, match="segment"):
                check_segments(a, b, cu, what)


def test_probe_accepts_a_working_backend_and_names_what_breaks(monkeypatch):
    cpu = torch.device("cpu")
    assert backends._probe("sdpa", cpu, torch.float32) is None
    monkeypatch.setitem(backends.BACKENDS, "sdpa", lambda q, k, v, *a, **kw: backends._sdpa(q, k, v, *a, **kw) * 1.5)
    assert "differs from the reference" in backends._probe("sdpa", cpu, torch.float32)

    def crash(*a, **kw):
        raise RuntimeError("CUDA error: no kernel image is available for execution on the device")

    monkeypatch.setitem(backends.BACKENDS, "sdpa", crash)
    assert "no kernel image" in backends._probe("sdpa", cpu, torch.float32)
    monkeypatch.setitem(backends._MODULES, "torch_varlen", "mmtrain_no_such_module")
    assert "import mmtrain_no_such_module failed" in backends._probe("torch_varlen", cpu, torch.bfloat16)


def test_auto_skips_a_broken_backend_with_one_warning(monkeypatch, caplog):
    cpu = torch.device("cpu")

    def crash(*a, **kw):
        raise RuntimeError("undefined symbol: _ZN3c10")

    monkeypatch.setitem(backends.BACKENDS, "sdpa", crash)
    monkeypatch.setattr(backends, "_PROBED", {})
    monkeypatch.setattr(backends, "_WARNED", set())
    monkeypatch.setattr(backends, "_auto_candidates", lambda device, dtype: ("sdpa", "reference"))
    with caplog.at_level("WARNING", logger="mmtrain"):
        assert backends.resolve("auto", cpu, torch.float32) == "reference"
        assert backends.resolve("auto", cpu, torch.float32) == "reference"
    warned = [r for r in caplog.records if "sdpa" in r.getMessage()]
    assert len(warned) == 1 and "undefined symbol" in warned[0].getMessage()
    with pytest.raises(ValueError, match="undefined symbol"):
        backends.resolve("sdpa", cpu, torch.float32)


def test_auto_on_cuda_never_lists_the_reference_and_fp32_gets_a_real_kernel():
    cands = backends._auto_candidates(torch.device("cuda", 0), torch.float32)
    assert "reference" not in cands and "sdpa" in cands
    why = backends.unavailable_reason("torch_varlen", torch.device("cuda", 0), torch.float32)
    assert why is not None and "bf16" in why
