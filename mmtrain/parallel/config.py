"""Parallelism schema (`parallel=`): TP / PP sizes (DP is what is left of the world), optimizer
sharding; and the performance schema (`perf=`): how the model and the input pipeline run on the
device, none of which changes what is computed."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional


@dataclass
class ParallelConfig:
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    sequence_parallel: bool = False  # refused: the local layer spec's torch norms cannot do it
    use_distributed_optimizer: Optional[bool] = None  # None = on with CUDA, off on CPU
    backend: Optional[str] = None  # removed (the backend follows trainer.device): set only to fail naming it


@dataclass
class PerfConfig:
    # packed: rope tables built once per micro-batch from the per-sample position ids and applied
    # to the whole stream (no host syncs); megatron: megatron-core's per-segment thd rope.
    rope: str = "packed"
    # Fused bias-activation kernels (SwiGLU: megatron's, keeping only the fc1 output for backward;
    # the ViT's QuickGELU / GELU and the projector's GELU: the same formula compiled into one
    # kernel) and a fused rope. None = on with CUDA, off on the CPU.
    fuse: Optional[bool] = None
    # torch.compile every transformer layer (ViT and decoder): none | layers. Needs a static token
    # count: packing.pad_to=seq_length (or unpacked runs padded to seq_length) and micro-batch 1;
    # cu_seqlens are then padded to perf.max_segments entries with empty segments.
    compile: str = "none"
    max_segments: int = 64  # segments per micro-batch under perf.compile (samples + padding runs)
    # Activation recompute of the decoder, megatron-core's names: null | selective | full.
    recompute_granularity: Optional[str] = None
    recompute_modules: list = field(default_factory=lambda: ["core_attn"])  # selective: core_attn | mlp | layernorm
    recompute_num_layers: int = 1  # full: layers per recomputed unit (uniform method)
    # CUDA caching allocator grows segments in place (less fragmentation from packs of varying length).
    expandable_segments: bool = True
    # DP gradient reduce overlapped with the backward (bucketed). None = on when any decoder weight
    # trains and DP > 1 (a frozen LM leaves only tiny projector gradients to reduce).
    overlap_grad_reduce: Optional[bool] = None
    # A device sync after every batched pipeline send/recv (a workaround for old NCCL races).
    # None = off with NCCL on CUDA, on otherwise.
    batch_p2p_sync: Optional[bool] = None
    # Build the next step's micro-batches on a background thread while this step computes; pin
    # them and copy them to the device on a side stream.
    prefetch: bool = True
    pin_memory: Optional[bool] = None  # None = on with CUDA
