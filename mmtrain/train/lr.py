"""Learning-rate schedule: a pure function of the step, so resuming the step restores it."""

from __future__ import annotations

import math

from mmtrain.config import MMTrainConfig


def lr_at(cfg: MMTrainConfig, step: int) -> float:
    t = cfg.trainer
    if t.warmup_steps and step < t.warmup_steps:
        return t.lr * (step + 1) / t.warmup_steps
    if t.lr_decay_style == "constant" or t.max_steps <= t.warmup_steps:
        return t.lr
    frac = min(1.0, (step - t.warmup_steps) / max(1, t.max_steps - t.warmup_steps))
    if t.lr_decay_style == "linear":
        return t.min_lr + (t.lr - t.min_lr) * (1 - frac)
    if t.lr_decay_style == "cosine":
        return t.min_lr + 0.5 * (t.lr - t.min_lr) * (1 + math.cos(math.pi * frac))
    raise ValueError(f"trainer.lr_decay_style must be constant|linear|cosine, got {t.lr_decay_style!r}")
