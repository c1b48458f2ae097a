"""Parallelism schema (`parallel=`): TP / PP sizes (DP is what is left of the world), optimizer sharding."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass
class ParallelConfig:
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    sequence_parallel: bool = False
    use_distributed_optimizer: Optional[bool] = None  # None = on with CUDA, off on CPU
    backend: str = "auto"  # auto | nccl | gloo
