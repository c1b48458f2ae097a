"""Process-group and megatron-core parallel-state setup for one training process.

Works alone (world size 1, no torchrun) and under torchrun / srun; NCCL with CUDA, gloo without.
"""

from __future__ import annotations

import os
import socket
from datetime import timedelta
from dataclasses import dataclass

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.tensor_parallel import random as mcore_random

from mmtrain.config import ParallelConfig
from mmtrain.parallel import cpu_compat


@dataclass(frozen=True)
class ParallelLayout:
    world_size: int
    rank: int
    local_rank: int
    tp: int
    pp: int
    dp: int
    tp_rank: int
    pp_rank: int
    dp_rank: int
    device: torch.device

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp - 1


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _init_default_group(backend: str) -> None:
    """init_process_group, surviving torchrun restarts.

    On torch 2.11 a worker group restarted by `torchrun --max-restarts` reads the *previous*
    attempt's gloo addresses from the agent's store and fails ("Gloo connectFullMesh failed ...
    Connection refused"). On a restart we rendezvous on a store prefixed with the attempt number.
    """
    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)
    if attempt == 0 or os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() != "true":
        dist.init_process_group(backend=backend)
        return
    world, rank = int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"])
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world, False, timeout=timedelta(minutes=10))
    dist.init_process_group(backend, store=dist.PrefixStore(f"/mmtrain/attempt_{attempt}", store), rank=rank, world_size=world)


def pick_device(requested: str) -> torch.device:
    if requested == "cpu":
        return torch.device("cpu")
    if requested == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("trainer.device=cuda but no CUDA device is visible")
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def initialize(par: ParallelConfig, device_request: str, seed: int) -> ParallelLayout:
    """Create the default process group (if needed) and megatron-core's TP/PP/DP groups."""
    device = pick_device(device_request)
    if device.type == "cpu":
        cpu_compat.enable_for_process()
    else:
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        if "RANK" not in os.environ:  # plain `python -m mmtrain.train`: a world of one
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(_free_port()))
            os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        backend = par.backend if par.backend != "auto" else ("nccl" if device.type == "cuda" else "gloo")
        _init_default_group(backend)
    world, rank = dist.get_world_size(), dist.get_rank()
    tp, pp = par.tensor_model_parallel_size, par.pipeline_model_parallel_size
    if tp < 1 or pp < 1 or world % (tp * pp):
        raise ValueError(
            f"world size {world} is not divisible by parallel.tensor_model_parallel_size={tp} x "
            f"parallel.pipeline_model_parallel_size={pp}"
        )
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    if device.type == "cuda":
        mcore_random.model_parallel_cuda_manual_seed(seed)
    else:
        # Dropout is 0 everywhere, so the no-op tracker is exact; weights come from CPU init.
        mcore_random.initialize_rng_tracker(inference_rng_tracker=True, force_reset=True)
    return ParallelLayout(
        world_size=world,
        rank=rank,
        local_rank=int(os.environ.get("LOCAL_RANK", 0)),
        tp=tp,
        pp=pp,
        dp=world // (tp * pp),
        tp_rank=parallel_state.get_tensor_model_parallel_rank(),
        pp_rank=parallel_state.get_pipeline_model_parallel_rank(),
        dp_rank=parallel_state.get_data_parallel_rank(),
        device=device,
    )


def shutdown() -> None:
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
