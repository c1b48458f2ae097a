"""Checkpoints: model, optimizer, LR position, RNG states and the data pipeline state.

Layout under `<trainer.output_dir>/checkpoints/`:

    step_00000012/                  one complete checkpoint (12 optimizer steps done)
        model_tp0_pp0.pt            model + optimizer state of model-parallel rank (tp 0, pp 0),
                                    written by its DP-rank-0 process (state is replicated over DP)
        meta.json                   step, data state (plan position, online packer buffer), config
                                    fingerprint, source fingerprint, world layout, fault counters
    step_00000014.tmp/              a checkpoint being written: never picked by resume

Atomicity: every file goes into `step_N.tmp/` first; after a barrier (all model-parallel files
written) rank 0 writes meta.json and renames the directory to `step_N`. A directory without
meta.json, or with a `.tmp` suffix, is incomplete and ignored by `trainer.resume=auto`.

Resume on another DP size works because model and optimizer state are replicated over DP (the
distributed optimizer, where used, is gathered to DP rank 0 on save and scattered on load) and
the data plan is recomputed for the new DP size from the same position. TP and PP must match.
The LR schedule is a pure function of the step (`mmtrain.train.lr.lr_at`), so the step restores it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import re
import shutil
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.distributed as dist

FORMAT_VERSION = 1
_STEP_DIR = re.compile(r"^step_(\d{8})$")


class CheckpointMismatchError(ValueError):
    """A checkpoint that does not fit the current config or data; the message says what differs."""


# ---- fingerprints ------------------------------------------------------------------------------


def config_fingerprint(cfg) -> dict[str, Any]:
    """The config values that change the data plan or the model/optimizer state shapes, flattened
    to dotted keys. DP size, LR, max_steps, logging and balancing are free to change on resume."""
    out: dict[str, Any] = {}

    def flat(prefix: str, obj: Any) -> None:
        if isinstance(obj, dict):
            for k, v in obj.items():
                flat(f"{prefix}.{k}", v)
        else:
            out[prefix] = obj

    flat("model", asdict(cfg.model))
    flat("data", asdict(cfg.data))
    flat("packing", asdict(cfg.packing))
    t, p = cfg.trainer, cfg.parallel
    out.update(
        {
            "trainer.seed": t.seed,
            "trainer.global_batch_size": t.global_batch_size,
            "trainer.micro_batch_size": t.micro_batch_size,
            "trainer.precision": t.precision,
            "parallel.tensor_model_parallel_size": p.tensor_model_parallel_size,
            "parallel.pipeline_model_parallel_size": p.pipeline_model_parallel_size,
        }
    )
    # A file path moving is not a data change; the source fingerprint below catches real changes.
    for k in ("data.source", "data.image_root"):
        out.pop(k, None)
    return out


def compare(saved: dict, current: dict) -> list[str]:
    """Human-readable differences between two config fingerprints."""
    diffs = []
    for k in sorted(set(saved) | set(current)):
        a, b = saved.get(k, "<absent>"), current.get(k, "<absent>")
        if a != b:
            diffs.append(f"{k}: checkpoint has {a!r}, config has {b!r}")
    return diffs


def check_compatible(meta: dict, cfg, src_fp: str, path: Path) -> None:
    diffs = compare(meta.get("config", {}), config_fingerprint(cfg))
    if meta.get("source_fingerprint") != src_fp:
        diffs.append(
            f"data: the training source's length table differs (checkpoint {meta.get('source_fingerprint')}, "
            f"data now {src_fp}); the samples or their sizes changed"
        )
    if diffs:
        raise CheckpointMismatchError(
            f"refusing to resume from {path}: it does not match this run's config/data:\n  - "
            + "\n  - ".join(diffs)
            + "\nUse the original config, another trainer.output_dir, or trainer.resume=never to start over."
        )


# ---- discovery ---------------------------------------------------------------------------------


def checkpoint_root(output_dir) -> Path:
    return Path(output_dir) / "checkpoints"


def is_complete(path: Path) -> bool:
    return path.is_dir() and _STEP_DIR.match(path.name) is not None and (path / "meta.json").is_file()


def list_checkpoints(output_dir) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = checkpoint_root(output_dir)
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if is_complete(p)), key=lambda p: int(p.name[5:]))


def find_latest(output_dir) -> Optional[Path]:
    cks = list_checkpoints(output_dir)
    return cks[-1] if cks else None


def resolve_resume(resume: str, output_dir) -> Optional[Path]:
    """trainer.resume -> the checkpoint directory to load, or None to start fresh."""
    if resume in ("never", "", None):
        return None
    if resume == "auto":
        return find_latest(output_dir)
    p = Path(resume)
    if is_complete(p):
        return p
    if p.is_dir():  # an output_dir or its checkpoints/ folder: its newest complete checkpoint
        latest = find_latest(p.parent if p.name == "checkpoints" else p)
        if latest is not None:
            return latest
        raise FileNotFoundError(f"trainer.resume={resume}: not a complete checkpoint (no meta.json) and holds none")
    raise FileNotFoundError(f"trainer.resume={resume}: no such checkpoint")


# ---- save / load -------------------------------------------------------------------------------


def _rng_state() -> dict:
    st = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        st["cuda"] = torch.cuda.get_rng_state()
    return st


def _set_rng_state(st: dict) -> None:
    torch.set_rng_state(st["torch"])
    np.random.set_state(st["numpy"])
    random.setstate(st["python"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state(st["cuda"])


def _uses_dist_opt(optimizer) -> bool:
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    opts = getattr(optimizer, "chained_optimizers", [optimizer])
    return any(isinstance(o, DistributedOptimizer) for o in opts)


def _model_file(layout) -> str:
    return f"model_tp{layout.tp_rank}_pp{layout.pp_rank}.pt"


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def save(b, step: int, data_state: dict, extra: dict, keep_last: int) -> Path:
    """Write checkpoint `step_<step>` (collective: every rank calls it). Returns its path."""
    lay = b.layout
    root = checkpoint_root(b.cfg.trainer.output_dir)
    final = root / f"step_{step:08d}"
    tmp = root / f"step_{step:08d}.tmp"
    if lay.rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    _barrier()
    dist_opt = _uses_dist_opt(b.optimizer)
    param_state = None
    if dist_opt:  # collective over DP: gathers the sharded optimizer state to DP rank 0
        param_state = [o.get_parameter_state_dp_zero() for o in getattr(b.optimizer, "chained_optimizers", [b.optimizer])]
    if lay.dp_rank == 0:
        payload = {
            "model": b.model.state_dict(),
            "optimizer": b.optimizer.state_dict(),
            "optimizer_param_state": param_state,
            "rng": _rng_state(),
            "step": step,
        }
        torch.save(payload, tmp / _model_file(lay))
    _barrier()
    if lay.rank == 0:
        meta = {
            "format": FORMAT_VERSION,
            "step": step,
            "time": time.time(),
            "config": config_fingerprint(b.cfg),
            "source_fingerprint": extra.pop("source_fingerprint"),
            "layout": {"tp": lay.tp, "pp": lay.pp, "dp": lay.dp, "world_size": lay.world_size},
            "distributed_optimizer": dist_opt,
            "data": data_state,
            **extra,
        }
        with open(tmp / "meta.json", "w") as f:
            json.dump(meta, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        if final.exists():  # re-saving a step (e.g. preempted right after a periodic save)
            old = root / f"step_{step:08d}.old"
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        prune(b.cfg.trainer.output_dir, keep_last)
    _barrier()
    return final


def prune(output_dir, keep_last: int) -> None:
    """Delete all but the newest `keep_last` complete checkpoints, and stale `.tmp`/`.old` dirs."""
    root = checkpoint_root(output_dir)
    if keep_last > 0:
        for p in list_checkpoints(output_dir)[:-keep_last]:
            shutil.rmtree(p, ignore_errors=True)
    for p in root.glob("step_*.old"):
        shutil.rmtree(p, ignore_errors=True)


def clean_partial(output_dir) -> None:
    """Remove checkpoints a killed run left half-written (rank 0, before training starts)."""
    root = checkpoint_root(output_dir)
    if root.is_dir():
        for p in root.iterdir():
            if p.is_dir() and (p.name.endswith(".tmp") or p.name.endswith(".old") or (_STEP_DIR.match(p.name) and not is_complete(p))):
                shutil.rmtree(p, ignore_errors=True)


def read_meta(path: Path) -> dict:
    return json.loads((Path(path) / "meta.json").read_text())


@contextlib.contextmanager
def _step_state_set_aside(opts):
    held = []
    for o in opts:
        inner = getattr(o, "optimizer", None)
        for state in getattr(inner, "state", {}).values():
            if isinstance(state, dict) and torch.is_tensor(state.get("step")):
                held.append((state, state.pop("step")))
    try:
        yield
    finally:
        for state, step in held:
            # megatron's load_state_dict gives every param the *same* step tensor, which torch's
            # Adam then increments once per param per step; each param needs its own copy.
            state["step"] = step.detach().clone()


def load(b, path: Path, src_fp: str) -> dict:
    """Restore model, optimizer and RNG state from `path` after checking it fits; returns meta."""
    path = Path(path)
    meta = read_meta(path)
    check_compatible(meta, b.cfg, src_fp, path)
    lay = b.layout
    saved = meta["layout"]
    if (saved["tp"], saved["pp"]) != (lay.tp, lay.pp):  # covered by the fingerprint; belt and braces
        raise CheckpointMismatchError(f"{path}: saved with TP={saved['tp']} PP={saved['pp']}, this run has TP={lay.tp} PP={lay.pp}")
    f = path / _model_file(lay)
    if not f.is_file():
        raise FileNotFoundError(f"{path}: {f.name} is missing (incomplete or foreign checkpoint)")
    payload = torch.load(f, map_location="cpu", weights_only=False)
    b.model.load_state_dict(payload["model"])
    b.optimizer.load_state_dict(payload["optimizer"])
    if _uses_dist_opt(b.optimizer):
        states = payload.get("optimizer_param_state") or []
        opts = getattr(b.optimizer, "chained_optimizers", [b.optimizer])
        if len(states) != len(opts):
            raise CheckpointMismatchError(f"{path}: saved without the distributed optimizer's parameter state")
        # no_grad: with fp32 params the distributed optimizer's main params are views of the
        # (grad-requiring) model params, and megatron copies into them in place.
        # torch's Adam (megatron's fallback without TE/Apex) keeps a per-param tensor "step" that the
        # dp-zero parameter state does not carry; set it aside while megatron fills the rest.
        with torch.no_grad(), _step_state_set_aside(opts):
            for o, st in zip(opts, states):
                o.load_parameter_state_from_dp_zero(st if lay.dp_rank == 0 else None)
    _set_rng_state(payload["rng"])
    return meta


def digest(path: Path) -> str:
    """sha256 of a checkpoint's files (tests / debugging)."""
    h = hashlib.sha256()
    for p in sorted(Path(path).iterdir()):
        if p.suffix == ".pt":
            h.update(p.read_bytes())
    return h.hexdigest()
