"""Process-group and megatron-core parallel-state setup for one training process.

Works alone (world size 1, no torchrun) and under torchrun / srun; NCCL with CUDA, gloo without.
"""

from __future__ import annotations

import logging
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


class DeviceError(RuntimeError):
    """The requested device cannot be had on this machine; the message says what to change."""


_warned_cpu_fallback = False


def pick_device(requested: str, gpu_cluster: bool = False) -> torch.device:
    """The device this process runs on.

    requested: trainer.device (auto | cpu | cuda), the one device knob; gpu_cluster: the cluster
    config has GPUs (cluster.gpus_per_node > 0, e.g. cluster=h20), so `auto` means CUDA there.
    * cpu: the CPU, even on a GPU host.
    * cuda, or auto on a GPU cluster config: `cuda:LOCAL_RANK`, or an error before anything is built when
      CUDA is absent or LOCAL_RANK has no GPU of its own (NCCL cannot share one GPU between ranks).
    * auto on the CPU cluster config: CUDA when every local rank gets its own GPU; when more ranks
      than GPUs share this node (e.g. the 2-4-process CPU tests on a one-GPU box) the CPU for all of
      them, with one warning.
    """
    if requested not in ("auto", "cpu", "cuda"):
        raise ValueError(f"trainer.device must be auto, cpu or cuda, got {requested!r}")
    if requested == "cpu":
        return torch.device("cpu")
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", local_rank + 1))
    have = torch.cuda.is_available()
    count = torch.cuda.device_count() if have else 0
    if requested == "cuda" or gpu_cluster:
        why = "trainer.device=cuda" if requested == "cuda" else "a GPU cluster config (cluster.gpus_per_node > 0)"
        if count == 0:
            raise DeviceError(
                f"{why} but no CUDA device is visible on this machine; nothing was built. For a CPU run use "
                "scale=smoke (a recipe's CPU smoke: tiny model, cluster=cpu), cluster=cpu, or trainer.device=cpu "
                "to force the CPU."
            )
        if local_rank >= count:
            raise DeviceError(
                f"LOCAL_RANK={local_rank} but only {count} CUDA device(s) are visible ({why}): each rank needs a GPU "
                f"of its own. Launch at most {count} process(es) per node (torchrun --nproc_per_node={count}), expose "
                "more GPUs (CUDA_VISIBLE_DEVICES), or run every rank on the CPU with trainer.device=cpu."
            )
        return torch.device("cuda", local_rank)
    if count == 0:
        return torch.device("cpu")
    if local_world > count or local_rank >= count:
        global _warned_cpu_fallback
        if local_rank == 0 and not _warned_cpu_fallback:
            _warned_cpu_fallback = True
            logging.getLogger("mmtrain").warning(
                "%d processes on this node but %d CUDA device(s): every rank runs on the CPU (gloo); "
                "set trainer.device=cuda to make this an error", local_world, count,
            )
        return torch.device("cpu")
    return torch.device("cuda", local_rank)


def configure_cuda_allocator(expandable_segments: bool) -> None:
    """expandable_segments: the caching allocator grows segments in place instead of keeping many
    fixed-size blocks, so packs of varying length do not fragment GPU memory. Must run before the
    first CUDA allocation to apply to everything (PYTORCH_CUDA_ALLOC_CONF wins when set)."""
    if not expandable_segments or "PYTORCH_CUDA_ALLOC_CONF" in os.environ:
        return
    os.environ["PYTORCH_CUDA_ALLOC_CONF"] = "expandable_segments:True"
    # torch reads the variable when it loads; set the live allocator config too
    setter = getattr(torch._C, "_accelerator_setAllocatorSettings", None)
    try:
        if setter is not None:
            setter("expandable_segments:True")
        else:  # pragma: no cover - older torch
            torch.cuda.memory._set_allocator_settings("expandable_segments:True")
    except Exception as e:  # pragma: no cover - depends on the CUDA build
        logging.getLogger("mmtrain").warning("could not turn on expandable_segments: %s", e)


def check_parallel(par: ParallelConfig) -> None:
    """Reject settings this build cannot honour, naming the key."""
    if par.sequence_parallel:
        raise ValueError(
            "parallel.sequence_parallel=true is not supported: mmtrain builds megatron-core's local layer spec, "
            "whose torch LayerNorm/RMSNorm cannot run sequence parallel (megatron asserts in torch_norm.py); it needs "
            "transformer-engine layers, which this build does not use. Set parallel.sequence_parallel=false."
        )


def initialize(par: ParallelConfig, device_request: str, seed: int, gpu_cluster: bool = False,
               expandable_segments: bool = True) -> ParallelLayout:
    """Create the default process group (if needed) and megatron-core's TP/PP/DP groups."""
    check_parallel(par)
    device = pick_device(device_request, gpu_cluster)
    if device.type == "cpu":
        cpu_compat.enable_for_process(device)
    else:
        configure_cuda_allocator(expandable_segments)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        if "RANK" not in os.environ:  # plain `python -m mmtrain.train`: a world of one
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(_free_port()))
            os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        _init_default_group("nccl" if device.type == "cuda" else "gloo")
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
