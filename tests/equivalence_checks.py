"""Checks shared by the DP equivalence tests (tests/integration/dist_worker.py `train` records)."""

from __future__ import annotations

import torch


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest difference relative to the reference tensor's largest value."""
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def check_same_updates(one: dict, two: list[dict], grad_rel: float = 1e-5, later_grad_rel: float = 1e-4,
                       param_abs: float = 1e-6) -> None:
    """DP2 ranks against one process, step by step: losses; the gradients the optimizer gets (DP-reduced,
    divided by the global loss-token count, before clipping: Adam's scale invariance and clipping
    would hide a wrong scale in the parameters) and megatron's grad norm; the parameters after.
    Step 0 sees the same parameters everywhere (`grad_rel`); later steps see parameters that the
    layouts' rounding has already moved apart by ~1e-7 (`later_grad_rel`)."""
    steps = len(one["losses"])
    assert steps >= 2 and len(one["grads"]) == len(one["grad_norms"]) == steps
    assert any(float(g.abs().max()) > 0 for g in one["grads"][0].values()), "no gradient to compare"
    for other in two:
        assert len(other["losses"]) == len(other["grads"]) == len(other["grad_norms"]) == steps
        for k in range(steps):
            tol = grad_rel if k == 0 else later_grad_rel
            a, b = one["losses"][k], other["losses"][k]
            assert abs(a - b) <= 1e-5 * abs(a), (k, one["losses"], other["losses"])
            assert other["grads"][k].keys() == one["grads"][k].keys() and one["grads"][k]
            for name, ref in one["grads"][k].items():
                r = rel(other["grads"][k][name], ref)
                assert r <= tol, f"step {k}: reduced gradient of {name} differs between DP1 and DP2 (rel {r:.2e})"
            gn, ref = other["grad_norms"][k], one["grad_norms"][k]
            assert ref > 0 and abs(gn - ref) <= tol * ref, f"step {k}: grad norm {gn} at DP2, {ref} at DP1"
        for name, ref in one["params"].items():
            d = float((other["params"][name] - ref).abs().max())
            assert d <= param_abs, f"{name} after {steps} steps differs between DP1 and DP2 by {d:.2e}"
