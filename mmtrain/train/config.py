"""Trainer schema (`trainer=`): steps and batch sizes, optimizer and schedule, checkpoints, faults, logging."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass
class TrainerConfig:
    max_steps: int = 10
    global_batch_size: int = 16  # samples per optimizer step
    micro_batch_size: int = 1  # packs (or padded samples when packing is off) per micro-batch
    seed: int = 42
    precision: str = "auto"  # auto (bf16 on CUDA, fp32 on the CPU) | fp32 | bf16
    output_dir: str = "outputs/run"
    lr: float = 1e-3
    min_lr: float = 0.0
    warmup_steps: int = 0
    lr_decay_style: str = "constant"  # constant | cosine | linear
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    clip_grad: float = 1.0
    device: str = "auto"  # auto | cpu | cuda
    progress_bar: str = "auto"  # auto (only on a terminal) | on | off
    log_sample_ids: bool = False
    log_interval: int = 10  # steps between lines on stdout and in train.log (also the first and last); 0 = none
    tensorboard: bool = True  # event files in trainer.output_dir (tensorboard --logdir <output_dir>)
    wandb: Optional[str] = None  # W&B project to log to (needs the wandb package); unset = no W&B
    save_interval: int = 0  # steps between checkpoints; 0 = none on the way (preemption still saves)
    save_final: bool = True  # a checkpoint after the last step (what `mmtrain export-hf` reads)
    keep_last: int = 0  # committed checkpoints kept; 0 = all (as Megatron-LM), set it for long runs
    eval_interval: int = 0  # steps between validation losses on data.validation_source; 0 = after the last step only
    resume: str = "auto"  # auto | never | <checkpoint path>
    async_save: bool = False  # periodic saves written by a background thread (preemption/final saves block)
    save_frozen: bool = False  # also write frozen parameters that came from model.pretrained
    verify_checkpoint: bool = True  # resume checks every file's crc32 (sizes are always checked)
    preempt_save_budget_s: float = 30.0  # the SIGTERM/USR1 save should finish within this (Slurm KillWait)
    max_consecutive_nonfinite: int = 3
    exit_code_preempted: int = 75
