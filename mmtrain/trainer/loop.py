"""The one training loop: plan a step, run megatron-core's schedule over this rank's packed
micro-batches, finalize grads (DP all-reduce, divide by the global loss-token count), step the
optimizer, log one metrics line.

The loss is the global per-token mean over all micro-batches and DP ranks (megatron-core's
`calculate_per_token_loss`): each rank returns loss *sums*, grads are summed across DP, and
`finalize_model_grads` divides by the total number of loss tokens. So packing, balancing and the
DP size change where tokens are computed, never the loss or the update.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.pipeline_parallel import get_forward_backward_func

from mmtrain.config import MMTrainConfig
from mmtrain.datamodule.batch import PackedMicroBatch
from mmtrain.datamodule.module import DataModule, buffer_size
from mmtrain.model.vlm import VLM, ParallelShape, tokens_per_tile
from mmtrain.parallel import setup
from mmtrain.trainer import checkpoint as ckpt
from mmtrain.trainer import faults
from mmtrain.trainer import flops as flops_mod
from mmtrain.trainer.preemption import Preempted, PreemptionHandler


def dtype_of(precision: str) -> torch.dtype:
    if precision not in ("fp32", "bf16"):
        raise ValueError(f"trainer.precision must be fp32 or bf16, got {precision!r}")
    return torch.bfloat16 if precision == "bf16" else torch.float32


def packed_seq_params(mb: PackedMicroBatch) -> PackedSeqParams:
    return PackedSeqParams(
        qkv_format="thd",
        cu_seqlens_q=mb.cu_seqlens,
        cu_seqlens_kv=mb.cu_seqlens,
        cu_seqlens_q_padded=mb.cu_seqlens_padded,
        cu_seqlens_kv_padded=mb.cu_seqlens_padded,
        max_seqlen_q=mb.max_seqlen,
        max_seqlen_kv=mb.max_seqlen,
    )


def _loss_func(loss_mask: torch.Tensor, output: torch.Tensor):
    losses = output.float().reshape(-1)
    loss_sum = (losses * loss_mask).sum()
    n = loss_mask.sum().to(torch.int)
    return loss_sum, n, {"loss_sum": loss_sum.detach().clone(), "tokens": n.detach().clone()}


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
    layout = setup.initialize(cfg.parallel, cfg.trainer.device, cfg.trainer.seed)
    dtype = dtype_of(cfg.trainer.precision)
    torch.manual_seed(cfg.trainer.seed)
    on_cpu = layout.device.type == "cpu"
    vlm = VLM(cfg.model, ParallelShape(layout.tp, layout.pp), dtype, use_cpu_init=on_cpu, backend=cfg.model.attention_backend)
    # Our own ViT stem (conv, positions, pre-LN) is built in fp32; run the whole model in the
    # training dtype (the megatron optimizer keeps fp32 main params for bf16).
    vlm.to(device=layout.device, dtype=dtype)
    use_dist_opt = cfg.parallel.use_distributed_optimizer
    if use_dist_opt is None:
        use_dist_opt = not on_cpu
    ddp = DistributedDataParallel(
        config=vlm.config,
        ddp_config=DistributedDataParallelConfig(
            grad_reduce_in_fp32=True, overlap_grad_reduce=False, use_distributed_optimizer=use_dist_opt
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


# Dense bf16 peak per device (TFLOP/s), used when the cluster config does not say (cluster=cpu on a GPU box).
_KNOWN_PEAKS = (("H200", 989.0), ("H100", 989.0), ("H20", 148.0), ("A100", 312.0), ("L40S", 362.0))


def peak_flops(cfg: MMTrainConfig, device: torch.device) -> float:
    """FLOP/s for MFU: cluster.peak_tflops_bf16, else looked up from the GPU's name; 0 on CPU."""
    if device.type != "cuda":
        return 0.0
    if cfg.cluster.peak_tflops_bf16 > 0:
        return cfg.cluster.peak_tflops_bf16 * 1e12
    name = torch.cuda.get_device_name(device)
    return next((tf * 1e12 for key, tf in _KNOWN_PEAKS if key in name), 0.0)


def useful_flops(data: DataModule, plan) -> float:
    """Useful FLOPs of a step (real tokens only; mmtrain/trainer/flops.py), for TFLOP/s and MFU."""
    return flops_mod.step_flops(data.cfg.model, data.sample_lengths(plan), data.plan_tiles(plan), data.tokens_per_tile)


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


def forward_backward(b: Built, micro_batches: list[PackedMicroBatch], *, forward_only: bool = False, step: int = 0) -> dict:
    """Run megatron-core's schedule over this rank's micro-batches; grads end in DDP's main_grad,
    already all-reduced over DP and divided by the global loss-token count."""
    mbs = [mb.to(b.layout.device) for mb in micro_batches]
    first, last = b.layout.is_first_stage, b.layout.is_last_stage

    def forward_step(data_iterator, model):
        mb: PackedMicroBatch = next(data_iterator)
        out = model(
            mb.tokens,
            mb.position_ids,
            packed_seq_params(mb),
            images=mb.images.to(b.dtype) if first else None,
            image_token_index=mb.image_token_index if first else None,
            labels=mb.labels if last else None,
        )
        return out, partial(_loss_func, mb.loss_mask)

    b.model.zero_grad_buffer()
    b.optimizer.zero_grad()
    timer = b.model.module.config.finalize_model_grads_func
    if isinstance(timer, _TimedFinalize):
        timer.entered = None
    t0 = time.perf_counter()
    losses = get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=iter(mbs),
        model=[b.model],
        num_microbatches=len(mbs),
        seq_length=max(mb.num_tokens for mb in mbs),
        micro_batch_size=1,
        forward_only=forward_only,
    )
    if b.layout.device.type == "cuda":
        torch.cuda.synchronize()
    done = timer.entered if isinstance(timer, _TimedFinalize) and timer.entered is not None else time.perf_counter()
    compute_s = done - t0  # this rank's forward/backward, without waiting for the DP all-reduce
    local = torch.zeros(2, dtype=torch.float64, device=b.layout.device)
    if last and b.layout.tp_rank == 0:
        for d in losses:
            local[0] += d["loss_sum"].double()
            local[1] += d["tokens"].double()
    dist.all_reduce(local)
    return {
        "loss_sum": float(local[0]),
        "loss_tokens": int(local[1]),
        "compute_s": compute_s,
        "local_tokens": sum(mb.num_tokens for mb in mbs),
    }


def _mask_failed_samples(b: Built, mbs: list[PackedMicroBatch]) -> int:
    """Zero the loss of samples whose image failed to decode (data.bad_sample_policy=skip), so every
    rank still runs the same schedule. Returns how many such samples this rank holds."""
    failed = getattr(b.data.source, "decode_failed", None)
    if not failed:
        return 0
    n = 0
    for mb in mbs:
        for sid, (start, end) in zip(mb.sample_ids, mb.sample_spans):
            if sid in failed:
                mb.loss_mask[start:end] = 0.0
                n += 1
    return n


def run_step(b: Built, plan, injector: Optional[faults.FaultInjector] = None) -> dict:
    """Forward/backward over this rank's micro-batches of `plan`, then the optimizer step, unless
    the loss or a gradient is NaN/Inf on any rank: then the update is skipped (`nonfinite`)."""
    for group in b.optimizer.param_groups:
        group["lr"] = lr_at(b.cfg, plan.step)
    mbs = list(b.data.micro_batches(plan))
    bad = _mask_failed_samples(b, mbs)
    r = forward_backward(b, mbs, step=plan.step)
    r["bad_samples_local"] = bad
    if injector is not None:
        injector.after_backward(plan.step, r, b.model)
    if not (math.isfinite(r["loss_sum"]) and faults.grads_finite(b.model, b.layout.device)):
        r.update(grad_norm=float("nan"), update_ok=False, nonfinite=True)
        return r
    ok, grad_norm, _ = b.optimizer.step()
    r["grad_norm"] = float(grad_norm) if grad_norm is not None else float("nan")
    r["update_ok"] = bool(ok)
    r["nonfinite"] = not bool(ok) or not math.isfinite(r["grad_norm"])
    return r


class MetricsWriter:
    def __init__(self, path: Path, enabled: bool, append: bool = False) -> None:
        self.enabled = enabled
        self.path = path
        if enabled:
            path.parent.mkdir(parents=True, exist_ok=True)
            self.fh = open(path, "a" if append else "w", buffering=1)

    def write(self, rec: dict) -> None:
        if self.enabled:
            self.fh.write(json.dumps(rec) + "\n")

    def close(self) -> None:
        if self.enabled:
            self.fh.close()


def _progress(cfg: MMTrainConfig, is_rank0: bool):
    mode = cfg.trainer.progress_bar
    show = is_rank0 and (mode == "on" or (mode == "auto" and sys.stderr.isatty()))
    if not show:
        return None
    from tqdm import tqdm

    return tqdm(total=cfg.trainer.max_steps, desc="train", unit="step", dynamic_ncols=True)


def _read_metrics(path: Path, before_step: int) -> list[dict]:
    """Metrics lines of steps < before_step (a resumed run re-does the later ones)."""
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:  # a line cut short by a kill
            continue
        if rec.get("step", before_step) < before_step:
            out.append(rec)
    return out


def _resume(b: Built, src_fp: str) -> tuple[int, dict]:
    """Load the checkpoint trainer.resume selects; (first step to run, saved counters)."""
    cfg, lay = b.cfg, b.layout
    if lay.rank == 0:
        ckpt.clean_partial(cfg.trainer.output_dir)
    dist.barrier()
    path = ckpt.resolve_resume(cfg.trainer.resume, cfg.trainer.output_dir)
    if path is None:
        return 0, {}
    meta = ckpt.load(b, path, src_fp)
    b.data.load_state_dict(meta["data"])
    if lay.rank == 0:
        log = logging.getLogger("mmtrain")
        log.warning("resumed from %s at step %d (saved with DP=%d, now DP=%d)", path, meta["step"], meta["layout"]["dp"], lay.dp)
        print(f"[mmtrain] resumed from {path} at step {meta['step']}", file=sys.stderr, flush=True)
    return int(meta["step"]), meta.get("counters", {})


def train(cfg: MMTrainConfig) -> dict:
    """Train (resuming per trainer.resume); raises Preempted (a SystemExit with
    trainer.exit_code_preempted) after SIGTERM/SIGUSR1 and faults.NonFiniteError after too many
    NaN/Inf steps in a row."""
    preempt = PreemptionHandler().install()  # before the (slow) build: a signal then is not lost
    try:
        return _train(cfg, preempt)
    finally:
        preempt.uninstall()


def _train(cfg: MMTrainConfig, preempt: PreemptionHandler) -> dict:
    t = cfg.trainer
    b = build(cfg)
    lay = b.layout
    is_rank0 = lay.rank == 0
    out_dir = Path(t.output_dir)
    src_fp = b.data.source_fingerprint()
    start, counters = _resume(b, src_fp)
    metrics_path = out_dir / "metrics.jsonl"
    history: list[dict] = _read_metrics(metrics_path, start) if (is_rank0 and start) else []
    if is_rank0 and start:  # one line per step: drop what the interrupted run logged after the checkpoint
        out_dir.mkdir(parents=True, exist_ok=True)
        metrics_path.write_text("".join(json.dumps(r) + "\n" for r in history))
    writer = MetricsWriter(metrics_path, is_rank0, append=bool(start))
    injector = faults.FaultInjector(lay.rank, lay.world_size)
    bar = _progress(cfg, is_rank0)
    if bar is not None and start:
        bar.update(start)
    peak = peak_flops(cfg, lay.device)
    skipped_steps = int(counters.get("skipped_steps", 0))
    consecutive = int(counters.get("consecutive_nonfinite", 0))
    bad_samples = int(counters.get("bad_samples", 0))
    skipped_samples = int(getattr(b.data.source, "skipped_samples", 0))
    last_saved = start if start else -1

    def save(done: int) -> None:
        nonlocal last_saved
        if done == last_saved:
            return
        extra = {
            "source_fingerprint": src_fp,
            "counters": {"skipped_steps": skipped_steps, "consecutive_nonfinite": consecutive, "bad_samples": bad_samples},
        }
        ckpt.save(b, done, b.data.state_dict(), extra, t.keep_last)
        last_saved = done

    try:
        for step in range(start, t.max_steps):
            plan = b.data.next_step()
            if plan.step != step:
                raise RuntimeError(f"data plan is at step {plan.step}, the trainer at step {step}")
            t0 = time.perf_counter()
            r = run_step(b, plan, injector)
            step_s = time.perf_counter() - t0
            # Measured per-rank compute time next to the balancer's prediction; the last slot sums
            # the samples whose image failed to decode (counted once: TP rank 0 of the first stage).
            times = torch.zeros(lay.world_size + 1, dtype=torch.float64, device=lay.device)
            times[lay.rank] = r["compute_s"]
            if lay.tp_rank == 0 and lay.is_first_stage:
                times[-1] = r["bad_samples_local"]
            dist.all_reduce(times)
            step_bad = int(times[-1])
            bad_samples += step_bad
            times = times[:-1]
            if r["nonfinite"]:
                skipped_steps += 1
                consecutive += 1
            else:
                consecutive = 0
            samples = plan.num_samples
            real_tokens = sum(plan.row_tokens)
            padded = b.data.padded_tokens(plan)
            useful = useful_flops(b.data, plan)
            rec = {
                "step": plan.step,
                "loss": r["loss_sum"] / max(r["loss_tokens"], 1),
                "grad_norm": r["grad_norm"],
                "lr": lr_at(cfg, plan.step),
                "samples": samples,
                "loss_tokens": r["loss_tokens"],
                "time_per_sample_ms": 1000.0 * step_s / samples,
                "step_time_s": step_s,
                "tokens_per_s": real_tokens / step_s,
                "padding_fraction": 1.0 - real_tokens / max(padded, 1),
                "packs": len(plan.rows),
                "useful_tflops": useful / step_s / 1e12 / lay.world_size,
                "rank_compute_ms": [1000.0 * float(x) for x in times.tolist()],
                "predicted_rank_cost": plan.predicted_rank_cost,
                "epoch": plan.epoch,
                "skipped_steps": skipped_steps,
            }
            if skipped_samples or bad_samples:
                rec["skipped_samples"] = skipped_samples  # excluded when the source was opened
                rec["bad_samples"] = bad_samples  # failed to decode during training (loss zeroed)
            if peak:
                rec["mfu"] = useful / step_s / lay.world_size / peak
            if t.log_sample_ids:
                rec["sample_ids"] = plan.sample_ids
            if not r["update_ok"]:
                rec["skipped"] = True
            history.append(rec)
            writer.write(rec)
            if bar is not None:
                bar.set_postfix(loss=f"{rec['loss']:.4f}", ms_per_sample=f"{rec['time_per_sample_ms']:.1f}")
                bar.update(1)
            if r["nonfinite"] and t.max_consecutive_nonfinite > 0 and consecutive >= t.max_consecutive_nonfinite:
                raise faults.NonFiniteError(
                    f"step {plan.step}: {consecutive} consecutive steps with a NaN/Inf loss or gradient "
                    f"(trainer.max_consecutive_nonfinite={t.max_consecutive_nonfinite}); stopping. The parameters "
                    f"are those before the first of these steps; lower trainer.lr, check the data of these steps "
                    f"(trainer.log_sample_ids=true), or resume from the last checkpoint."
                )
            done = step + 1
            if t.save_interval > 0 and done % t.save_interval == 0:
                save(done)
            signame = preempt.should_stop(lay.device)
            if signame is not None and done < t.max_steps:
                save(done)
                msg = (f"[mmtrain] {signame}: stopped after step {step}, checkpoint saved; "
                       f"exiting with code {t.exit_code_preempted} (requeue)")
                if is_rank0:
                    print(msg, file=sys.stderr, flush=True)
                writer.close()
                raise Preempted(t.exit_code_preempted, done, signame)
        if t.save_interval > 0 and t.max_steps > start:
            save(t.max_steps)
        summary = summarize(cfg, lay, history)
        summary.update(
            skipped_steps=skipped_steps,
            skipped_samples=skipped_samples,
            bad_samples=bad_samples,
            resumed_from_step=start,
        )
        if is_rank0:
            out_dir.mkdir(parents=True, exist_ok=True)
            (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        return summary
    finally:
        if bar is not None:
            bar.close()
        writer.close()


def summarize(cfg: MMTrainConfig, lay: setup.ParallelLayout, history: list[dict], warmup: Optional[int] = None) -> dict:
    warmup = min(len(history) - 1, 1 if warmup is None else warmup) if history else 0
    timed = history[warmup:]
    total_s = sum(h["step_time_s"] for h in timed)
    total_n = sum(h["samples"] for h in timed)
    out = {
        "steps": len(history),
        "warmup_steps_excluded": warmup,
        "time_per_sample_ms": 1000.0 * total_s / max(total_n, 1),
        "losses": [h["loss"] for h in history],
        "final_loss": history[-1]["loss"] if history else None,
        "padding_fraction": (sum(h["padding_fraction"] for h in timed) / len(timed)) if timed else None,
        "packing_enabled": cfg.packing.enabled,
        "seq_length": cfg.packing.seq_length,
        "buffer_size": buffer_size(cfg),
        "algorithm": cfg.packing.algorithm,
        "world_size": lay.world_size,
        "dp": lay.dp,
        "tp": lay.tp,
        "pp": lay.pp,
        "device": str(lay.device),
        "precision": cfg.trainer.precision,
        "model": cfg.model.name,
    }
    if timed and "mfu" in timed[0]:
        out["mfu"] = sum(h["mfu"] for h in timed) / len(timed)
    return out


def main_process_env() -> dict[str, str]:
    return {k: os.environ[k] for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK") if k in os.environ}
