"""What a user watches during a run: a line every `trainer.log_interval` steps on stdout and in
<output_dir>/train.log, TensorBoard event files in the run folder, W&B when asked for.

Why `logging` with explicit handlers on rank 0 (instead of print or the progress bar): a Slurm log
or a redirected stdout has no terminal, so a bar shows nothing there; a handler writes and flushes
every line whatever stdout is, and the file handler keeps the same lines in the run folder. Only
rank 0 reports (every rank computes the same gathered metrics).

Fields are read defensively: a line shows what the metrics record holds (fields added later, e.g.
memory or straggler figures, show up without changes here), and TensorBoard gets every numeric
field of the record.
"""

from __future__ import annotations

import logging
import math
import sys
from pathlib import Path
from typing import Any, Optional

LOGGER = "mmtrain"
LOG_FILE = "train.log"
_FORMAT = "[%(asctime)s] %(message)s"
_DATEFMT = "%Y-%m-%d %H:%M:%S"

# Record fields and their TensorBoard tags; any other numeric field goes to "other/<name>".
_TB_TAGS = {
    "loss": "train/loss",
    "lr": "train/lr",
    "grad_norm": "train/grad_norm",
    "samples": "train/samples_per_step",
    "loss_tokens": "train/loss_tokens",
    "time_per_sample_ms": "throughput/time_per_sample_ms",
    "step_time_s": "throughput/step_time_s",
    "tokens_per_s": "throughput/tokens_per_s",
    "useful_tflops": "throughput/useful_tflops_per_device",
    "mfu": "throughput/mfu",
    "padding_fraction": "data/padding_fraction",
    "packs": "data/packs",
    "data_wait_ms": "data/data_wait_ms",
    "straggler_predicted": "balance/straggler_predicted",
    "straggler_measured": "balance/straggler_measured",
    "predicted_bubble": "balance/predicted_bubble",
    "skipped_steps": "train/skipped_steps",
    "skipped_samples": "data/skipped_samples",
    "bad_samples": "data/bad_samples",
    "dropped_samples": "data/dropped_samples",
    "truncated_samples": "data/truncated_samples",
    "val_loss": "val/loss",
}
_TB_SKIP = {"step", "epoch", "skipped"}
_TB_MAX_RANKS = 64  # per-rank series beyond this are summarised by max and mean only


class _ConsoleHandler(logging.StreamHandler):
    """stdout; while a progress bar is drawn, lines go through it so they do not tear the bar."""

    def __init__(self) -> None:
        super().__init__(sys.stdout)
        self.bar = None

    def emit(self, record: logging.LogRecord) -> None:
        if self.bar is None:
            super().emit(record)
            return
        try:
            self.bar.write(self.format(record), file=self.stream)
        except Exception:  # noqa: BLE001 - logging must never stop training
            self.handleError(record)


def _num(rec: dict, key: str) -> Optional[float]:
    v = rec.get(key)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        return None
    return float(v)


def _mean(recs: list[dict], key: str) -> Optional[float]:
    vals = [v for v in (_num(r, key) for r in recs) if v is not None]
    return sum(vals) / len(vals) if vals else None


def _si(x: float) -> str:
    for div, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= div:
            return f"{x / div:.2f}{suffix}"
    return f"{x:.1f}"


def _duration(seconds: float) -> str:
    s = int(round(seconds))
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}"


def _memory(rec: dict) -> list[str]:
    """Memory fields, whatever their names: '<name> <value> <unit>' from the _gb/_mb/_bytes suffix."""
    out = []
    for key in sorted(rec):
        v = _num(rec, key)
        if v is None or "mem" not in key:
            continue
        if key.endswith("_bytes"):
            out.append(f"{key[:-6]} {v / 2**30:.2f} GiB")
        elif key.endswith("_gb"):
            out.append(f"{key[:-3]} {v:.2f} GB")
        elif key.endswith("_mb"):
            out.append(f"{key[:-3]} {v:.0f} MB")
        else:
            out.append(f"{key} {v:g}")
    return out


def format_line(recs: list[dict], max_steps: int, eta_s: Optional[float] = None) -> str:
    """One line for the steps `recs` (the last log interval): loss, samples/s, tokens/s, padding,
    stragglers and MFU are the interval's means (rates: totals over total time); lr, grad norm and
    the step are the last step's; memory is the interval's maximum."""
    last = recs[-1]
    parts = [f"step {int(last['step']) + 1}/{max_steps}"]
    loss = _mean(recs, "loss")
    if loss is not None:
        parts.append(f"loss {loss:.4f}")
    if _num(last, "val_loss") is not None:
        parts.append(f"val loss {last['val_loss']:.4f}")
    if _num(last, "lr") is not None:
        parts.append(f"lr {last['lr']:.3e}")
    if _num(last, "grad_norm") is not None:
        parts.append(f"grad norm {last['grad_norm']:.3f}")
    secs = sum(_num(r, "step_time_s") or 0.0 for r in recs)
    if secs > 0:
        samples = sum(_num(r, "samples") or 0.0 for r in recs)
        tokens = sum((_num(r, "tokens_per_s") or 0.0) * (_num(r, "step_time_s") or 0.0) for r in recs)
        if samples:
            parts.append(f"{samples / secs:.2f} samples/s")
        if tokens:
            parts.append(f"{_si(tokens / secs)} tokens/s")
    pad = _mean(recs, "padding_fraction")
    if pad is not None:
        parts.append(f"padding {100 * pad:.1f}%")
    pred, meas = _mean(recs, "straggler_predicted"), _mean(recs, "straggler_measured")
    if pred is not None or meas is not None:
        both = [f"predicted {pred:.3f}" if pred is not None else None, f"measured {meas:.3f}" if meas is not None else None]
        parts.append("straggler " + " ".join(p for p in both if p))
    bubble = _mean(recs, "predicted_bubble")
    if bubble is not None:
        parts.append(f"bubble {100 * bubble:.1f}%")
    mfu = _mean(recs, "mfu")
    if mfu is not None:
        parts.append(f"MFU {100 * mfu:.1f}%")
    wait = _mean(recs, "data_wait_ms")
    if wait is not None:
        parts.append(f"data wait {wait:.1f} ms")
    peak = {k: max(_num(r, k) or 0.0 for r in recs) for k in last if "mem" in k and _num(last, k) is not None}
    mem = _memory(peak)
    if mem:
        parts.append("memory " + ", ".join(mem))
    if last.get("skipped"):
        parts.append("update skipped (non-finite)")
    if eta_s is not None:
        parts.append(f"ETA {_duration(eta_s)}")
    return " | ".join(parts)


def _scalars(rec: dict) -> dict[str, float]:
    """TensorBoard tag -> value for every numeric field (per-rank lists as one series per rank)."""
    out: dict[str, float] = {}
    for key, v in rec.items():
        if key in _TB_SKIP:
            continue
        if isinstance(v, list) and v and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v):
            if len(v) <= _TB_MAX_RANKS:
                out.update({f"{key}/rank{i}": float(x) for i, x in enumerate(v)})
            out[f"{key}/max"] = float(max(v))
            out[f"{key}/mean"] = float(sum(v) / len(v))
            continue
        x = _num(rec, key)
        if x is not None:
            out[_TB_TAGS.get(key, f"other/{key}")] = x
    secs = _num(rec, "step_time_s")
    if secs and _num(rec, "samples"):
        out["throughput/samples_per_s"] = rec["samples"] / secs
    return out


def require_wandb(cfg):
    """The wandb module when trainer.wandb asks for it (None otherwise); asked for and not installed
    is a configuration error, raised before the (slow) build."""
    if not cfg.trainer.wandb:
        return None
    try:
        import wandb
    except ImportError:
        raise ValueError(
            f"trainer.wandb={cfg.trainer.wandb!r} needs the wandb package (pip install wandb); "
            "or leave trainer.wandb unset (TensorBoard events are written anyway)"
        ) from None
    return wandb


class RunLog:
    """Rank 0's reporter for one run: the step lines, TensorBoard and W&B. On other ranks every
    method is a no-op. Use as a context manager: handlers and writers are removed / closed at exit."""

    def __init__(self, cfg, out_dir: Path, is_rank0: bool, start_step: int = 0) -> None:
        t = cfg.trainer
        self.enabled = is_rank0
        self.interval = max(int(t.log_interval), 0)
        self.max_steps = int(t.max_steps)
        self.start_step = start_step
        self.pending: list[dict] = []
        self.step_times: list[float] = []
        self.tb = None
        self.wandb = None
        self.logger = logging.getLogger(LOGGER)
        self._handlers: list[logging.Handler] = []
        self._level = self.logger.level
        self._propagate = self.logger.propagate
        self.console: Optional[_ConsoleHandler] = None
        self.file: Optional[logging.FileHandler] = None
        if not self.enabled:
            return
        wandb = require_wandb(cfg)
        out_dir.mkdir(parents=True, exist_ok=True)
        fmt = logging.Formatter(_FORMAT, _DATEFMT)
        self.console = _ConsoleHandler()
        self.file = logging.FileHandler(out_dir / LOG_FILE, mode="a", encoding="utf-8")
        for h in (self.console, self.file):
            h.setFormatter(fmt)
            self.logger.addHandler(h)
            self._handlers.append(h)
        self.logger.setLevel(logging.INFO)
        self.logger.propagate = False  # a host application's root handlers would print each line twice
        if t.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step drops events the interrupted run wrote after the checkpoint it resumes from
            self.tb = SummaryWriter(log_dir=str(out_dir), purge_step=start_step + 1 if start_step else None)
        if wandb is not None:
            import dataclasses

            self.wandb = wandb.init(project=t.wandb, dir=str(out_dir), name=out_dir.name,
                                    config=dataclasses.asdict(cfg), resume="allow")

    def __enter__(self) -> "RunLog":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def set_progress_bar(self, bar) -> None:
        if self.console is not None:
            self.console.bar = bar

    def info(self, msg: str, *args: Any) -> None:
        if self.enabled:
            self.logger.info(msg, *args)

    def to_file(self, msg: str) -> None:
        """Into train.log only: for messages the caller already printed."""
        if self.file is not None:
            self.file.handle(self.logger.makeRecord(LOGGER, logging.INFO, __file__, 0, msg, (), None))

    def step(self, rec: dict) -> None:
        """Record one step's metrics; prints a line at every log_interval-th step, the first and the last."""
        if not self.enabled:
            return
        done = int(rec["step"]) + 1
        if _num(rec, "step_time_s") is not None:
            self.step_times.append(float(rec["step_time_s"]))
        self.pending.append(rec)
        if self.tb is not None:
            for tag, v in _scalars(rec).items():
                self.tb.add_scalar(tag, v, global_step=done)
        if self.wandb is not None:
            self.wandb.log(_scalars(rec), step=done)
        first = done == self.start_step + 1
        if self.interval and (first or done % self.interval == 0 or done == self.max_steps):
            self.logger.info(format_line(self.pending, self.max_steps, self.eta(done)))
            self.pending = []

    def eta(self, done: int) -> Optional[float]:
        """Remaining steps x the mean step time so far (the first step, a warm-up, left out when possible)."""
        times = self.step_times[1:] or self.step_times
        if not times:
            return None
        return max(self.max_steps - done, 0) * sum(times) / len(times)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
            self.tb = None
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None
        for h in self._handlers:
            self.logger.removeHandler(h)
            h.close()
        self._handlers = []
        if self.enabled:
            self.logger.setLevel(self._level)
            self.logger.propagate = self._propagate
