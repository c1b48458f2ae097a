"""Checks shared by the checkpoint / resume tests: a checkpoint's full state by layout-independent
name, compared tensor by tensor."""

from __future__ import annotations

from pathlib import Path

import torch


def state(path: Path) -> dict[str, torch.Tensor]:
    """Parameters and optimizer state of a checkpoint folder (step_N), full tensors by global name."""
    from mmtrain.train import checkpoint as ck

    return {k: v for k, v in ck.read_full(path).items() if k.startswith(("model/", "optim/"))}


def same_state(got: dict, ref: dict, rel: float = 1e-5) -> None:
    """The same tensors, values equal up to another layout's reduction order (relative to each
    tensor's largest value, so a small Adam second moment is not hidden by an absolute tolerance);
    Adam's step counts exact."""
    assert got.keys() == ref.keys(), sorted(set(got) ^ set(ref))[:10]
    assert any(k.endswith("/exp_avg_sq") for k in ref), "no optimizer state in the checkpoint"
    for k, r in ref.items():
        g = got[k]
        assert g.shape == r.shape and g.dtype == r.dtype, k
        if k.endswith("/step"):
            assert torch.equal(g, r), f"{k}: {g} vs {r}"
            continue
        scale = float(r.abs().max()) if r.numel() else 0.0
        err = float((g.double() - r.double()).abs().max()) if r.numel() else 0.0
        assert err <= rel * max(scale, 1e-12), f"{k}: differs by {err:.3e} (scale {scale:.3e})"
