"""Per-step metrics: the metrics.jsonl writer, useful FLOPs and MFU, the progress bar, the summary."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import torch

from mmtrain.config import MMTrainConfig
from mmtrain.parallel import setup
from mmtrain.steps.from_config import buffer_size


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


def step_ratio(values) -> Optional[float]:
    """max / mean (a straggler ratio); None when there is nothing to compare."""
    vals = [float(v) for v in values]
    if not vals:
        return None
    mean = sum(vals) / len(vals)
    return max(vals) / mean if mean > 0 else 1.0


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
