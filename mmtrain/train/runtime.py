"""perf.* and the device -> the concrete run settings: training dtype, the model's Runtime, DDP's
grad-reduce overlap. Every `null` (auto) in perf= is decided here, in one place."""

from __future__ import annotations

from typing import Optional

import torch

from mmtrain.config import MMTrainConfig
from mmtrain.models.vlm import Runtime

PRECISIONS = ("auto", "fp32", "bf16")


def dtype_of(precision: str, device: Optional[torch.device] = None) -> torch.dtype:
    """trainer.precision -> dtype; auto is bf16 on CUDA (fp32 weights of a 7B decoder alone are
    29 GB, and the fast attention kernels are bf16/fp16 only) and fp32 on the CPU."""
    if precision not in PRECISIONS:
        raise ValueError(f"trainer.precision must be auto, fp32 or bf16, got {precision!r}")
    if precision == "auto":
        return torch.bfloat16 if device is not None and device.type == "cuda" else torch.float32
    return torch.bfloat16 if precision == "bf16" else torch.float32


def precision_name(dtype: torch.dtype) -> str:
    return "bf16" if dtype == torch.bfloat16 else "fp32"


def static_tokens(cfg: MMTrainConfig) -> Optional[int]:
    """The token count of every micro-batch when it is fixed (every row padded to
    packing.seq_length and one row per micro-batch), else None."""
    p = cfg.packing
    padded = (p.enabled and p.pad_to == "seq_length") or (not p.enabled and p.pad_unpacked_to == "seq_length")
    return p.seq_length if padded and cfg.trainer.micro_batch_size == 1 else None


def model_runtime(cfg: MMTrainConfig, device: torch.device, backend: str = "nccl", dp: int = 1) -> Runtime:
    p = cfg.perf
    cuda = device.type == "cuda"
    if p.compile not in ("none", "layers"):
        raise ValueError(f"perf.compile={p.compile!r}: choose none or layers")
    static = static_tokens(cfg)
    if p.compile == "layers" and static is None:
        raise ValueError(
            "perf.compile=layers needs a static token count: set packing.pad_to=seq_length (packed) or "
            "packing.pad_unpacked_to=seq_length (unpacked), and trainer.micro_batch_size=1"
        )
    if p.recompute_granularity not in (None, "selective", "full"):
        raise ValueError(f"perf.recompute_granularity={p.recompute_granularity!r}: choose null, selective or full")
    sync = p.batch_p2p_sync
    if sync is None:
        sync = not (cuda and backend == "nccl")
    return Runtime(
        rope=p.rope,
        fuse=cuda if p.fuse is None else bool(p.fuse),
        recompute_granularity=p.recompute_granularity,
        recompute_modules=tuple(p.recompute_modules),
        recompute_num_layers=p.recompute_num_layers,
        static_tokens=static,
        batch_p2p_sync=sync,
        grads_every_micro_batch=overlap_grad_reduce(cfg, dp),
    )


def overlap_grad_reduce(cfg: MMTrainConfig, dp: int) -> bool:
    """perf.overlap_grad_reduce; auto: on when the decoder trains and DP > 1 (a frozen LM leaves
    only the small projector / ViT gradients, not worth the bucketing)."""
    if cfg.perf.overlap_grad_reduce is not None:
        return bool(cfg.perf.overlap_grad_reduce)
    return dp > 1 and not cfg.model.freeze_lm


def static_shape(cfg: MMTrainConfig):
    """The fixed micro-batch shape perf.compile needs (tokens and cu_seqlens size), else None."""
    from mmtrain.steps.prefetch import StaticShape

    tokens = static_tokens(cfg)
    if cfg.perf.compile == "none" or tokens is None:
        return None
    return StaticShape(tokens=tokens, segments=cfg.perf.max_segments)


def step_feed(b, limit: Optional[int] = None):
    """The loop's feed of (plan, micro-batches) for this rank, per perf.prefetch / perf.pin_memory."""
    from mmtrain.steps.prefetch import StepFeed

    p = b.cfg.perf
    return StepFeed(
        b.data, b.layout.device, prefetch=p.prefetch, pin_memory=p.pin_memory, pixel_dtype=b.dtype,
        static=static_shape(b.cfg), limit=limit,
    )
