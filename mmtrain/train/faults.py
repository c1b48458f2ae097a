"""Non-finite loss/gradient detection, and test-only fault injection.

A step whose global loss or any gradient is NaN/Inf is skipped: the optimizer does not step (the
parameters and Adam moments are untouched), the samples count as consumed, the metrics line says
`"skipped": true` and the running `skipped_steps` grows. After `trainer.max_consecutive_nonfinite`
such steps in a row the run stops with `NonFiniteError`.

Fault injection (tests only): `MMTRAIN_FAULT_INJECT` is a comma-separated list of `what@step`:
  nan_loss@K     the loss and the gradients of step K become NaN (every rank)
  nan_grad@K     the gradients of step K become NaN, the loss stays finite (every rank)
  inf_grad@K     one gradient of step K becomes +Inf on the last rank only
  kill_rankR@K   rank R dies (SIGKILL) in the middle of step K, after its backward pass
  kill_save_rankR@K  rank R dies (SIGKILL) while writing checkpoint step_K (after its first tensor;
                 in the background thread with trainer.async_save=true)
  sigterm@K      every rank sends itself SIGTERM in the middle of step K (exercises preemption)
  sigterm_rankR@K  only rank R gets SIGTERM in step K
Injections fire only in the first attempt (TORCHELASTIC_RESTART_COUNT unset or 0), so a
torchrun restart that resumes from a checkpoint does not hit the same fault again.
"""

from __future__ import annotations

import math
import os
import re
import signal
from dataclasses import dataclass

import torch
import torch.distributed as dist

ENV = "MMTRAIN_FAULT_INJECT"


class NonFiniteError(RuntimeError):
    pass


@dataclass(frozen=True)
class Fault:
    kind: str  # nan_loss | nan_grad | inf_grad | kill | kill_save | sigterm
    step: int
    rank: int | None = None


def parse(spec: str) -> list[Fault]:
    out = []
    for item in filter(None, (x.strip() for x in spec.split(","))):
        m = re.fullmatch(r"(nan_loss|nan_grad|inf_grad|kill_rank(\d+)|sigterm(?:_rank(\d+))?|kill_save_rank(\d+))@(\d+)", item)
        if not m:
            raise ValueError(f"{ENV}: cannot parse {item!r} (expected e.g. nan_loss@3, kill_rank1@4, sigterm@2, kill_save_rank1@4)")
        name, step = m.group(1), int(m.group(5))
        if m.group(4) is not None:
            out.append(Fault("kill_save", step, int(m.group(4))))
        elif m.group(2) is not None:
            out.append(Fault("kill", step, int(m.group(2))))
        elif name.startswith("sigterm"):
            out.append(Fault("sigterm", step, int(m.group(3)) if m.group(3) is not None else None))
        else:
            out.append(Fault(name, step))
    return out


class FaultInjector:
    def __init__(self, rank: int, world_size: int) -> None:
        first_attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0) == 0
        self.faults = parse(os.environ.get(ENV, "")) if first_attempt else []
        self.rank, self.world = rank, world_size

    def _at(self, step: int, kind: str) -> list[Fault]:
        return [f for f in self.faults if f.step == step and f.kind == kind]

    def kill_during_save(self, step: int) -> bool:
        """Whether this rank is to die while writing checkpoint step_<step>."""
        return any(f.rank == self.rank for f in self._at(step, "kill_save"))

    def after_backward(self, step: int, result: dict, model) -> None:
        """Called between backward and the optimizer step."""
        if not self.faults:
            return
        for f in self._at(step, "kill"):
            if f.rank == self.rank:
                os.kill(os.getpid(), signal.SIGKILL)
        for f in self._at(step, "sigterm"):
            if f.rank is None or f.rank == self.rank:
                os.kill(os.getpid(), signal.SIGTERM)
        poison = None
        if self._at(step, "nan_loss"):
            result["loss_sum"] = float("nan")
            poison = float("nan")
        if self._at(step, "nan_grad"):
            poison = float("nan")
        if self._at(step, "inf_grad") and self.rank == self.world - 1:
            poison = float("inf")
        if poison is not None:
            for p in model.parameters():
                g = getattr(p, "main_grad", None)
                if g is not None and g.numel():
                    g.view(-1)[0] = poison
                    break


def grads_finite(model, device: torch.device) -> bool:
    """Collective over the world: are all of this step's gradients finite on every rank?"""
    bad = False
    buffers = []
    for name in ("buffers", "expert_parallel_buffers"):  # megatron DDP's param-and-grad buffers
        v = getattr(model, name, None)
        if isinstance(v, (list, tuple)):
            buffers += [x for x in v if getattr(x, "grad_data", None) is not None]
    if buffers:
        for buf in buffers:
            if not bool(torch.isfinite(buf.grad_data).all()):
                bad = True
                break
    else:
        for p in model.parameters():
            g = getattr(p, "main_grad", None)
            if g is None:
                g = p.grad
            if g is not None and not bool(torch.isfinite(g).all()):
                bad = True
                break
    flag = torch.tensor([1 if bad else 0], dtype=torch.int32, device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return int(flag.item()) == 0


def finite(x: float) -> bool:
    return math.isfinite(x)
