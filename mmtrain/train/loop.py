"""The training loop: resume, then per step: its packs and ranks -> forward/backward -> optimizer step -> metrics
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
from mmtrain.train import evaluate
from mmtrain.train import faults
from mmtrain.train.build import Built, build
from mmtrain.train.log import RunLog, require_wandb
from mmtrain.train.lr import lr_at
from mmtrain.train.metrics import MetricsWriter, _progress, _read_metrics, peak_flops, step_ratio, summarize
from mmtrain.train.preemption import Preempted, PreemptionHandler
from mmtrain.train.runtime import step_feed
from mmtrain.train.step import run_step


def _resume(b: Built, ck: ckpt.Checkpointer) -> tuple[int, dict]:
    """Load the checkpoint trainer.resume selects, resharded to this run's layout; (first step to
    run, saved counters)."""
    cfg, lay = b.cfg, b.layout
    if lay.rank == 0:
        ckpt.clean_partial(cfg.trainer.output_dir)
    dist.barrier()
    path = ckpt.choose_checkpoint(cfg.trainer.resume, cfg.trainer.output_dir, cfg.trainer.verify_checkpoint)
    if path is None:
        return 0, {}
    meta = ckpt.read_meta(path)
    ckpt.check_compatible(meta, cfg, ck.src_fp, path)
    t0 = time.perf_counter()
    ck.load(path, meta)
    b.data.load_state_dict(meta["data"])
    if lay.rank == 0:
        saved = meta["layout"]
        logging.getLogger("mmtrain").warning(
            "resumed from %s at step %d in %.2f s (saved at TP%d PP%d DP%d, now TP%d PP%d DP%d)", path, meta["step"],
            time.perf_counter() - t0, saved["tp"], saved["pp"], saved["dp"], lay.tp, lay.pp, lay.dp,
        )
        print(f"[mmtrain] resumed from {path} at step {meta['step']}", file=sys.stderr, flush=True)
    return int(meta["step"]), meta.get("counters", {})


def _attach_data_reports(b: Built, val, out_dir: Path) -> None:
    """<output_dir>/data_report.jsonl: what the sources left out or changed when opened (rank 0),
    then images that fail to decode as they are met (the ranks that decode them)."""
    lay = b.layout
    sources = [b.data.source] + ([val.source] if val is not None else [])
    for k, src in enumerate(sources):
        report = getattr(src, "report", None)
        if report is not None:
            report.attach(out_dir / "data_report.jsonl", write_now=lay.rank == 0, append=k > 0,
                          append_later=lay.tp_rank == 0 and lay.is_first_stage)


def _checkpoint_summary(saves: list[dict]) -> dict:
    """Count, sizes and times of the checkpoints this run committed (rank 0's view)."""
    if not saves:
        return {"saves": 0}
    return {
        "saves": len(saves),
        "last": saves[-1],
        "max_save_s": max(c["save_s"] for c in saves),
        "max_blocking_s": max(c["blocking_s"] for c in saves),
        "bytes_written": sum(c["bytes"] for c in saves),
    }


def _ran(b: Built, local: list[int]) -> list[list[str]]:
    """The record ids each DP rank ran this step (its first-stage, TP-rank-0 process's micro-batches),
    gathered from the ranks themselves."""
    lay = b.layout
    got: list = [None] * lay.world_size
    dist.all_gather_object(got, (lay.dp_rank, lay.tp_rank == 0 and lay.is_first_stage, local))
    by_rank = {d: ids for d, first, ids in got if first}
    return [[b.data.record_id(i) for i in by_rank[d]] for d in range(lay.dp)]


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
    injector = faults.FaultInjector(lay.rank, lay.world_size)
    checkpointer = ckpt.Checkpointer(b, src_fp, injector)
    val = evaluate.validator(b)  # data.validation_source (every trainer.eval_interval steps, and last), or None
    _attach_data_reports(b, val, out_dir)
    start, counters = _resume(b, checkpointer)
    metrics_path = out_dir / "metrics.jsonl"
    history: list[dict] = _read_metrics(metrics_path, start) if (is_rank0 and start) else []
    if is_rank0 and start:  # one line per step: drop what the interrupted run logged after the checkpoint
        out_dir.mkdir(parents=True, exist_ok=True)
        metrics_path.write_text("".join(json.dumps(r) + "\n" for r in history))
    writer = MetricsWriter(metrics_path, is_rank0, append=bool(start))
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
    data_counts = getattr(b.data.source, "data_counts", dict)()  # dropped / truncated when opened
    saves: list[dict] = []
    # Plans and builds step k+1 on a thread while step k computes; its state_dict() is the data
    # state after the last *consumed* step, which is what a checkpoint must hold.
    feed = step_feed(b, limit=t.max_steps - start)

    def save(done: int, reason: str) -> None:
        extra = {
            "source_fingerprint": src_fp,
            "counters": {"skipped_steps": skipped_steps, "consecutive_nonfinite": consecutive, "bad_samples": bad_samples},
        }
        stats = checkpointer.save(done, feed.state_dict(), extra, reason)
        if stats is not None and reason != "preempt" and stats["blocking_s"] > t.preempt_save_budget_s and is_rank0:
            runlog.info(
                "warning: a blocking checkpoint save took %.1f s, more than trainer.preempt_save_budget_s=%.0f s: a "
                "preemption save would likely be cut short (keep trainer.save_frozen=false, write to faster storage)",
                stats["blocking_s"], t.preempt_save_budget_s,
            )

    try:
        for step in range(start, t.max_steps):
            t0 = time.perf_counter()
            ready = feed.next()
            st = ready.plan
            if st.step != step:
                raise RuntimeError(f"the data stream is at step {st.step}, the trainer at step {step}")
            r = run_step(b, st, injector, micro_batches=ready.micro_batches)
            step_s = time.perf_counter() - t0
            # Measured per-rank compute time next to the balancer's prediction, each rank's DP rank,
            # and in the last slot the samples whose image failed to decode (counted once: TP rank 0
            # of the first stage).
            ws = lay.world_size
            times = torch.zeros(2 * ws + 1, dtype=torch.float64, device=lay.device)
            times[lay.rank] = r["compute_s"]
            times[ws + lay.rank] = lay.dp_rank
            if lay.tp_rank == 0 and lay.is_first_stage:
                times[-1] = r["bad_samples_local"]
            dist.all_reduce(times)
            step_bad = int(times[-1])
            bad_samples += step_bad
            rank_s = [float(x) for x in times[:ws].tolist()]
            dp_s = [0.0] * lay.dp  # a DP rank's time: its slowest model-parallel rank
            for g, d in enumerate(times[ws:2 * ws].tolist()):
                dp_s[int(d)] = max(dp_s[int(d)], rank_s[g])
            if r["nonfinite"]:
                skipped_steps += 1
                consecutive += 1
            else:
                consecutive = 0
            samples = st.num_samples
            real_tokens = sum(st.row_tokens)
            padded = b.data.padded_tokens(st)
            useful = b.data.useful_flops(st)
            rec = {
                "step": st.step,
                "loss": r["loss_sum"] / max(r["loss_tokens"], 1),
                "grad_norm": r["grad_norm"],
                "lr": lr_at(cfg, st.step),
                "samples": samples,
                "loss_tokens": r["loss_tokens"],
                "time_per_sample_ms": 1000.0 * step_s / samples,
                "step_time_s": step_s,
                "data_wait_ms": 1000.0 * ready.wait_s,  # part of step_time_s the loop waited for input
                "tokens_per_s": real_tokens / step_s,
                "padding_fraction": 1.0 - real_tokens / max(padded, 1),
                "packs": len(st.rows),
                "useful_tflops": useful / step_s / 1e12 / lay.world_size,
                "rank_compute_ms": [1000.0 * x for x in rank_s],
                "predicted_rank_cost": st.predicted_rank_cost,
                "straggler_predicted": step_ratio(st.predicted_rank_cost),
                "straggler_measured": step_ratio(dp_s),
                "epoch": st.epoch,
                "skipped_steps": skipped_steps,
            }
            if st.predicted_bubble is not None:
                rec["predicted_bubble"] = st.predicted_bubble
            if skipped_samples or bad_samples:
                rec["skipped_samples"] = skipped_samples  # excluded when the source was opened
                rec["bad_samples"] = bad_samples  # failed to decode during training (loss zeroed)
            rec.update({k: v for k, v in data_counts.items() if v and k != "skipped_samples"})
            if val is not None and (step + 1 == t.max_steps or (t.eval_interval > 0 and (step + 1) % t.eval_interval == 0)):
                val_sum, val_tokens = val.loss(b.model, b.dtype)
                rec["val_loss"] = val_sum / max(val_tokens, 1)
            if peak:
                rec["mfu"] = useful / step_s / lay.world_size / peak
            if t.log_sample_ids:
                rec["sample_ids"] = [b.data.record_id(i) for i in st.sample_ids]  # record ids
                rec["rank_sample_ids"] = _ran(b, r["sample_ids_local"])
            fit = b.data.observe(st, dp_s)
            if cfg.balancing.calibrate_steps > 0:
                feed.refresh()  # the observations (and a fit) are data state a checkpoint must hold
            if fit is not None:
                rec["calibrated_cost_model"] = fit["cost_model"]
                runlog.info(
                    "step %d: cost model calibrated on %d rank-steps (relative residual %.3f): %s",
                    st.step + 1, fit["observations"], fit["relative_residual"],
                    ", ".join(f"{k}={v:.3e}" for k, v in fit["cost_model"].items() if isinstance(v, float)),
                )
            if not r["update_ok"]:
                rec["skipped"] = True
            done = step + 1
            fatal = r["nonfinite"] and t.max_consecutive_nonfinite > 0 and consecutive >= t.max_consecutive_nonfinite
            signame = preempt.should_stop(lay.device)
            stop = signame is not None and done < t.max_steps
            reason = None
            if fatal:
                pass  # no checkpoint of a run that stops on NaN/Inf: resume from the last good one
            elif stop:
                reason = "preempt"
            elif done == t.max_steps and (t.save_final or t.save_interval > 0):
                reason = "final"
            elif t.save_interval > 0 and done % t.save_interval == 0:
                reason = "interval"
            if reason:
                save(done, reason)
            checkpointer.poll()
            committed = checkpointer.drain()
            saves += committed
            if committed:
                rec["checkpoint"] = committed[-1] if len(committed) == 1 else committed
            if stop and committed:
                c = committed[-1]
                c["budget_s"] = t.preempt_save_budget_s
                c["within_budget"] = c["save_s"] <= t.preempt_save_budget_s
            history.append(rec)
            writer.write(rec)
            runlog.step(rec)
            if bar is not None:
                bar.set_postfix(loss=f"{rec['loss']:.4f}", ms_per_sample=f"{rec['time_per_sample_ms']:.1f}")
                bar.update(1)
            if fatal:
                raise faults.NonFiniteError(
                    f"step {st.step}: {consecutive} consecutive steps with a NaN/Inf loss or gradient "
                    f"(trainer.max_consecutive_nonfinite={t.max_consecutive_nonfinite}); stopping. The parameters "
                    f"are those before the first of these steps; lower trainer.lr, check the data of these steps "
                    f"(trainer.log_sample_ids=true), or resume from the last checkpoint."
                )
            if stop:
                c = rec.get("checkpoint") or {}
                if isinstance(c, list):
                    c = c[-1]
                took = (f"checkpoint step_{done:08d} saved in {c['save_s']:.2f} s ({c['bytes']} bytes; budget "
                        f"{t.preempt_save_budget_s:g} s{'' if c['within_budget'] else ', EXCEEDED'})") if c else "checkpoint saved"
                msg = (f"[mmtrain] {signame}: stopped after step {step}, {took}; "
                       f"exiting with code {t.exit_code_preempted} (requeue)")
                if is_rank0:
                    print(msg, file=sys.stderr, flush=True)
                runlog.to_file(msg)
                writer.close()
                raise Preempted(t.exit_code_preempted, done, signame)
        checkpointer.wait()
        saves += checkpointer.drain()
        summary = summarize(cfg, lay, history)
        summary.update(
            skipped_steps=skipped_steps,
            skipped_samples=skipped_samples,
            bad_samples=bad_samples,
            resumed_from_step=start,
            **{k: v for k, v in data_counts.items() if k != "skipped_samples"},
            checkpoints=_checkpoint_summary(saves),
        )
        vals = [h["val_loss"] for h in history if "val_loss" in h]
        if vals:
            summary["final_val_loss"] = vals[-1]
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
