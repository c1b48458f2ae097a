"""Build one training process: process groups, the model on this rank's pipeline stage (initialised
layout-invariantly or loaded from `model.pretrained`), megatron DDP, the megatron optimizer and the
data module."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

from mmtrain.config import MMTrainConfig
from mmtrain.models import params
from mmtrain.models.config import tokens_per_tile
from mmtrain.models.vlm import VLM, ParallelShape
from mmtrain.parallel import setup
from mmtrain.steps.datamodule import DataModule
from mmtrain.train import runtime


@dataclass
class Built:
    cfg: MMTrainConfig
    layout: setup.ParallelLayout
    model: DistributedDataParallel
    optimizer: Any
    data: DataModule
    tokens_per_tile: int
    dtype: torch.dtype
    extra: dict = field(default_factory=dict)


def build(cfg: MMTrainConfig) -> Built:
    """Set up process groups, the model on this rank's stage, DDP, the optimizer and the data."""
    logging.getLogger("megatron").setLevel(logging.WARNING)
    logging.getLogger("megatron.core.models.gpt.gpt_model").setLevel(logging.ERROR)  # "GPTModel IS DEPRECATED"
    runtime.dtype_of(cfg.trainer.precision)  # a bad value fails before any process group exists
    layout = setup.initialize(
        cfg.parallel, cfg.trainer.device, cfg.trainer.seed, gpu_cluster=cfg.cluster.gpus_per_node > 0,
        expandable_segments=cfg.perf.expandable_segments,
    )
    dtype = runtime.dtype_of(cfg.trainer.precision, layout.device)
    cfg.trainer.precision = runtime.precision_name(dtype)  # auto resolved: summaries and checkpoints name it
    torch.manual_seed(cfg.trainer.seed)
    on_cpu = layout.device.type == "cpu"
    vlm = build_model(cfg, layout, dtype)
    use_dist_opt = cfg.parallel.use_distributed_optimizer
    if use_dist_opt is None:
        use_dist_opt = not on_cpu
    ddp = DistributedDataParallel(
        config=vlm.config,
        ddp_config=DistributedDataParallelConfig(
            grad_reduce_in_fp32=True,
            overlap_grad_reduce=runtime.overlap_grad_reduce(cfg, layout.dp),
            use_distributed_optimizer=use_dist_opt,
        ),
        module=vlm,
    )
    t = cfg.trainer
    opt = get_megatron_optimizer(
        OptimizerConfig(
            optimizer="adam",
            lr=t.lr,
            min_lr=t.min_lr,
            weight_decay=t.weight_decay,
            adam_beta1=t.adam_beta1,
            adam_beta2=t.adam_beta2,
            clip_grad=t.clip_grad,
            bf16=dtype == torch.bfloat16,
            params_dtype=dtype,
            use_distributed_optimizer=use_dist_opt,
        ),
        [ddp],
    )
    tcfg = vlm.config
    tcfg.finalize_model_grads_func = _TimedFinalize()
    tcfg.no_sync_func = ddp.no_sync
    tpt = tokens_per_tile(cfg.model)
    data = DataModule(cfg, dp=layout.dp, dp_rank=layout.dp_rank, pp=layout.pp, first_stage=layout.is_first_stage, tokens_per_tile=tpt)
    return Built(cfg=cfg, layout=layout, model=ddp, optimizer=opt, data=data, tokens_per_tile=tpt, dtype=dtype)


def build_model(cfg: MMTrainConfig, layout: setup.ParallelLayout, dtype: torch.dtype) -> VLM:
    """This rank's VLM stage with its weights: `model.pretrained` loaded into the TP/PP shards, or
    every full tensor drawn from (trainer.seed, its layout-independent name) and then sharded."""
    on_cpu = layout.device.type == "cpu"
    import torch.distributed as dist

    backend = dist.get_backend() if dist.is_initialized() else "gloo"
    rt = runtime.model_runtime(cfg, layout.device, backend, layout.dp)
    vlm = VLM(cfg.model, ParallelShape(layout.tp, layout.pp), dtype, use_cpu_init=on_cpu, backend=cfg.model.attention_backend, runtime=rt)
    # Our own ViT stem (conv, positions, LNs) is built in fp32; run the whole model in the training
    # dtype (the megatron optimizer keeps fp32 main params for bf16).
    vlm.to(device=layout.device, dtype=dtype)
    if cfg.model.pretrained:
        from mmtrain.models import hf

        report = hf.load_pretrained(vlm, cfg.model, layout.tp_rank, layout.tp)
        _check_every_tensor_used(cfg, report)
    else:
        params.initialize(vlm, cfg.model, cfg.trainer.seed, layout.tp_rank, layout.tp)
    vlm.attention_backends = vlm.prepare(layout.device, dtype)
    if cfg.perf.compile == "layers":
        vlm.compile_layers()
    return vlm


def _check_every_tensor_used(cfg: MMTrainConfig, report: dict) -> None:
    """A checkpoint tensor that no rank loaded means the model config does not describe the checkpoint."""
    import torch.distributed as dist

    from mmtrain.models import hf

    unused = set(report["unused"])
    if dist.is_initialized() and dist.get_world_size() > 1:
        gathered: list = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, report["unused"])
        unused = set.intersection(*(set(g) for g in gathered))
    left = hf.unused_tensors(cfg.model, sorted(unused))
    if left:
        raise hf.PretrainedError(
            f"model.pretrained={cfg.model.pretrained}: {len(left)} checkpoint tensors have no place in this model "
            f"config: {', '.join(left[:12])}{' ...' if len(left) > 12 else ''}. Use model=hf, or match the model keys "
            "(layer counts, class_token, qkv_bias, tie_word_embeddings) to the checkpoint."
        )


class _TimedFinalize:
    """megatron's finalize_model_grads, noting when this rank's own compute ended (before the DP
    gradient all-reduce makes every rank wait for the slowest): the measured per-rank time that the
    metrics put next to the balancer's prediction."""

    def __init__(self) -> None:
        self.entered: Optional[float] = None

    def __call__(self, *args, **kwargs):
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()
        self.entered = time.perf_counter()
        return finalize_model_grads(*args, **kwargs)
