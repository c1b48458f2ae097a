"""The training loop: resume, then per step plan -> forward/backward -> optimizer step -> metrics
line -> checkpoint / preemption checks, then the summary."""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from mmtrain.config import MMTrainConfig
from mmtrain.train import checkpoint as ckpt
from mmtrain.train import faults
from mmtrain.train.build import Built, build
from mmtrain.train.log import RunLog, require_wandb
from mmtrain.train.lr import lr_at
from mmtrain.train.metrics import MetricsWriter, _progress, _read_metrics, peak_flops, summarize, useful_flops
from mmtrain.train.preemption import Preempted, PreemptionHandler
from mmtrain.train.runtime import step_feed
from mmtrain.train.step import run_step


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
    require_wandb(cfg)
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
    runlog = RunLog(cfg, out_dir, is_rank0, start)
    runlog.set_progress_bar(bar)
    attn = getattr(b.model.module, "attention_backends", {})
    runlog.info(
        "run: model=%s packing=%s world=%d (TP%d PP%d DP%d) device=%s %s attention=%s steps %d..%d%s -> %s",
        cfg.model.name, "on" if cfg.packing.enabled else "off", lay.world_size, lay.tp, lay.pp, lay.dp,
        lay.device, t.precision, "/".join(dict.fromkeys(attn.values())) or "-", start + 1, t.max_steps,
        f" (resumed after step {start})" if start else "", out_dir,
    )
    peak = peak_flops(cfg, lay.device)
    skipped_steps = int(counters.get("skipped_steps", 0))
    consecutive = int(counters.get("consecutive_nonfinite", 0))
    bad_samples = int(counters.get("bad_samples", 0))
    skipped_samples = int(getattr(b.data.source, "skipped_samples", 0))
    last_saved = start if start else -1
    # Plans and builds step k+1 on a thread while step k computes; its state_dict() is the data
    # state after the last *consumed* step, which is what a checkpoint must hold.
    feed = step_feed(b, limit=t.max_steps - start)

    def save(done: int) -> None:
        nonlocal last_saved
        if done == last_saved:
            return
        extra = {
            "source_fingerprint": src_fp,
            "counters": {"skipped_steps": skipped_steps, "consecutive_nonfinite": consecutive, "bad_samples": bad_samples},
        }
        ckpt.save(b, done, feed.state_dict(), extra, t.keep_last)
        last_saved = done

    try:
        for step in range(start, t.max_steps):
            t0 = time.perf_counter()
            ready = feed.next()
            plan = ready.plan
            if plan.step != step:
                raise RuntimeError(f"data plan is at step {plan.step}, the trainer at step {step}")
            r = run_step(b, plan, injector, micro_batches=ready.micro_batches)
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
                "data_wait_ms": 1000.0 * ready.wait_s,  # part of step_time_s the loop waited for input
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
            runlog.step(rec)
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
                runlog.to_file(msg)
                writer.close()
                raise Preempted(t.exit_code_preempted, done, signame)
        if (t.save_final or t.save_interval > 0) and t.max_steps > start:
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
        runlog.info(
            "done: %d steps, %.2f ms per sample, final loss %s -> %s",
            summary["steps"], summary["time_per_sample_ms"],
            "-" if summary["final_loss"] is None else f"{summary['final_loss']:.6f}", out_dir / "summary.json",
        )
        return summary
    finally:
        feed.close()
        if bar is not None:
            bar.close()
        writer.close()
        runlog.close()
