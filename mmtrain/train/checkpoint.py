"""Checkpoints on torch.distributed.checkpoint (DCP): sharded by TP/PP/DP, written by all ranks
in parallel, optionally in the background, committed atomically, resumable at any layout.

Layout under `<trainer.output_dir>/checkpoints/`:

    step_00000012/              one committed checkpoint (12 optimizer steps done)
        __<rank>_0.distcp       DCP data files, one per writing rank: chunks of full tensors by
                                layout-independent name (mmtrain/train/ckpt_shards.py)
        .metadata               DCP's index of the chunks
        meta.json               written last: step, data/planner state, config and data
                                fingerprints, parameter table, model.pretrained fingerprint,
                                layout it was saved at, and the size + crc32 of every file above
    step_00000014.tmp/          being written; never resumed from, removed at the next start

Commit: every rank writes its chunks into `step_N.tmp/` (replicated tensors are written once, by
the least loaded replica); DCP's coordinator writes `.metadata` once all ranks are done; the ranks
checksum the files (each a share) and rank 0 writes meta.json with the sizes and checksums, then
renames the folder to `step_N` (atomic) and prunes to `trainer.keep_last`. `trainer.resume=auto`
takes the newest `step_N` whose files all match meta.json (sizes; crc32 with
`trainer.verify_checkpoint`), skipping others with a warning naming them.

`trainer.async_save=true`: the periodic save copies this rank's tensors to host memory (the only
time the step waits) and writes them from a thread on a process group of its own, so training
goes on; the preemption and final saves are always blocking.

Frozen parameters that came from `model.pretrained` are not written (`trainer.save_frozen=false`):
the checkpoint records the source's fingerprint (sha256 of its weight files) and a resume whose
source differs is refused; the run rebuilds them from the source as it starts.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import random
import re
import shutil
import signal
import sys
import threading
import time
import warnings
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.distributed as dist

from mmtrain.models import params
from mmtrain.train import ckpt_shards as shards
from mmtrain.train.ckpt_shards import MODEL, OPTIM, Entry

FORMAT = "mmtrain-dcp"
FORMAT_VERSION = 2
META = "meta.json"
_STEP_DIR = re.compile(r"^step_(\d{8})$")
log = logging.getLogger("mmtrain")


class CheckpointMismatchError(ValueError):
    """A checkpoint that does not fit the current config or data; the message says what differs."""


class CheckpointCorruptError(RuntimeError):
    """A checkpoint whose files are missing, truncated or do not match their recorded checksums."""


# ---- fingerprints ------------------------------------------------------------------------------


def config_fingerprint(cfg) -> dict[str, Any]:
    """The config values that change the data plan or the model/optimizer state shapes, flattened
    to dotted keys. TP, PP, DP, the optimizer sharding, LR, max_steps, logging and balancing are
    free to change on resume."""
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
    t = cfg.trainer
    out.update(
        {
            "trainer.seed": t.seed,
            "trainer.global_batch_size": t.global_batch_size,
            "trainer.micro_batch_size": t.micro_batch_size,
            "trainer.precision": t.precision,
        }
    )
    # A path moving is not a change: the data source and model.pretrained fingerprints catch real ones.
    for k in ("data.source", "data.image_root", "model.pretrained"):
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


_WEIGHT_FILES = (".safetensors", ".bin", ".pt", ".pth")
_HASH_RANGE = 256 << 20


def pretrained_fingerprint(path: str, group=None) -> dict:
    """sha256 over the weight files (and config.json) of a model.pretrained folder, their contents
    included: 256 MiB ranges hashed by the ranks in turn, so a big source costs 1/world each."""
    root = Path(path)
    files = sorted(p for p in root.iterdir() if p.is_file() and (p.suffix in _WEIGHT_FILES or p.name.endswith(".index.json") or p.name == "config.json"))
    tasks = [(p.name, off, min(_HASH_RANGE, p.stat().st_size - off)) for p in files for off in range(0, max(p.stat().st_size, 1), _HASH_RANGE)]
    rank, world = _rank_world(group)
    mine = {}
    for i, (name, off, n) in enumerate(tasks):
        if i % world == rank:
            h = hashlib.sha256()
            with open(root / name, "rb") as f:
                f.seek(off)
                left = n
                while left > 0:
                    buf = f.read(min(left, 8 << 20))
                    if not buf:
                        break
                    h.update(buf)
                    left -= len(buf)
            mine[i] = h.hexdigest()
    parts = _all_gather_object(mine, group)
    merged: dict[int, str] = {}
    for p in parts:
        merged.update(p)
    h = hashlib.sha256()
    for i, (name, off, n) in enumerate(tasks):
        h.update(f"{name}:{off}:{n}:{merged[i]}\n".encode())
    return {"path": str(root.resolve()), "sha256": h.hexdigest(), "files": {p.name: p.stat().st_size for p in files}}


# ---- small collective helpers ------------------------------------------------------------------


def _dist_on() -> bool:
    return dist.is_available() and dist.is_initialized()


def _rank_world(group=None) -> tuple[int, int]:
    if not _dist_on():
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def _all_gather_object(obj, group=None) -> list:
    if not _dist_on() or dist.get_world_size(group) == 1:
        return [obj]
    out: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, obj, group=group)
    return out


def _broadcast_object(obj, group=None):
    if not _dist_on() or dist.get_world_size(group) == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0, group=group)
    return box[0]


def _barrier(group=None) -> None:
    if _dist_on() and dist.get_world_size(group) > 1:
        dist.barrier(group=group)


def _jsonable(x):
    """numpy scalars / arrays in the data state become plain JSON numbers / lists."""
    if isinstance(x, (np.generic, np.ndarray)):
        return x.tolist()
    raise TypeError(f"checkpoint meta: {type(x).__name__} is not JSON serialisable")


# ---- discovery and validation ------------------------------------------------------------------


def checkpoint_root(output_dir) -> Path:
    return Path(output_dir) / "checkpoints"


def step_of(path: Path) -> int:
    m = _STEP_DIR.match(Path(path).name)
    if not m:
        raise ValueError(f"{path}: not a checkpoint folder (step_NNNNNNNN)")
    return int(m.group(1))


def is_complete(path: Path) -> bool:
    """A committed checkpoint folder (named step_N, meta.json present); its files are checked by `validate`."""
    path = Path(path)
    return path.is_dir() and _STEP_DIR.match(path.name) is not None and (path / META).is_file()


def list_checkpoints(output_dir) -> list[Path]:
    """Committed checkpoints, oldest first."""
    root = checkpoint_root(output_dir)
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if is_complete(p)), key=step_of)


def find_latest(output_dir) -> Optional[Path]:
    cks = list_checkpoints(output_dir)
    return cks[-1] if cks else None


def read_meta(path: Path) -> dict:
    return json.loads((Path(path) / META).read_text())


def validate(path: Path) -> Optional[str]:
    """Why `path` is not a usable checkpoint (None if its meta.json is readable and every file it
    lists is there with its recorded size)."""
    path = Path(path)
    if not path.is_dir():
        return "no such folder"
    if _STEP_DIR.match(path.name) is None:
        return "not named step_NNNNNNNN (a checkpoint never committed)"
    try:
        meta = read_meta(path)
    except FileNotFoundError:
        return f"no {META} (never committed)"
    except (OSError, ValueError) as e:
        return f"unreadable {META} ({type(e).__name__}: {e})"
    if meta.get("format") != FORMAT:
        return f"{META} is not an {FORMAT} checkpoint (format {meta.get('format')!r}, version {meta.get('version')!r})"
    if int(meta.get("step", -1)) != step_of(path):
        return f"{META} says step {meta.get('step')}, the folder step {step_of(path)}"
    files = meta.get("files") or {}
    if ".metadata" not in files:
        return f"{META} lists no DCP .metadata"
    for name, rec in sorted(files.items()):
        f = path / name
        if not f.is_file():
            return f"{name} is missing"
        size = f.stat().st_size
        if size != rec["bytes"]:
            return f"{name} has {size} bytes, {rec['bytes']} were written"
    return None


def _crc32(path: Path) -> int:
    crc = 0
    with open(path, "rb") as f:
        while True:
            buf = f.read(16 << 20)
            if not buf:
                return crc
            crc = zlib.crc32(buf, crc)


def verify_checksums(path: Path, meta: dict, group=None) -> Optional[str]:
    """Collective: each rank checksums a share of the files; the first mismatch found, or None."""
    rank, world = _rank_world(group)
    bad = []
    for i, (name, rec) in enumerate(sorted((meta.get("files") or {}).items())):
        if i % world == rank and _crc32(Path(path) / name) != rec["crc32"]:
            bad.append(name)
    found = sorted(n for part in _all_gather_object(bad, group) for n in part)
    return f"{', '.join(found)} do(es) not match the checksum written at save time (corrupt)" if found else None


def choose_checkpoint(resume: str, output_dir, verify: bool = True) -> Optional[Path]:
    """Collective: the checkpoint trainer.resume selects, or None to start fresh.

    `auto`: the newest valid checkpoint in `<output_dir>/checkpoints`; invalid ones (missing or
    truncated files, checksum mismatch, no meta.json) are skipped with a warning naming them.
    A path: a step_N folder (used only if valid, else an error), or a run folder / its
    checkpoints/ (its newest valid checkpoint). `never`: None.
    """
    if resume in ("never", "", None):
        return None
    rank, _ = _rank_world()
    candidates: list[str] = []
    error = None
    strict = False
    if rank == 0:
        if resume == "auto":
            candidates = [str(p) for p in reversed(list_checkpoints(output_dir))]
        else:
            p = Path(resume)
            if _STEP_DIR.match(p.name) and p.is_dir():
                candidates, strict = [str(p)], True
            elif p.is_dir():
                candidates = [str(c) for c in reversed(list_checkpoints(p.parent if p.name == "checkpoints" else p))]
                if not candidates:
                    error = f"trainer.resume={resume}: not a checkpoint (step_N with {META}) and holds none"
            else:
                error = f"trainer.resume={resume}: no such checkpoint"
    candidates, strict, error = _broadcast_object((candidates, strict, error))
    if error:
        raise FileNotFoundError(error)
    skipped = []
    for cand in candidates:
        reason = validate(Path(cand)) if rank == 0 else None
        reason = _broadcast_object(reason)
        if reason is None and verify:
            reason = verify_checksums(Path(cand), read_meta(Path(cand)))
        if reason is None:
            if skipped and rank == 0:
                log.warning("resuming from %s (newer checkpoints skipped: %s)", cand, ", ".join(skipped))
            return Path(cand)
        msg = f"skipping checkpoint {cand}: {reason}"
        if strict:
            raise CheckpointCorruptError(f"trainer.resume={resume}: {reason}")
        if rank == 0:
            log.warning(msg)
            print(f"[mmtrain] warning: {msg}", file=sys.stderr, flush=True)
        skipped.append(cand)
    if resume != "auto":
        raise CheckpointCorruptError(f"trainer.resume={resume}: no valid checkpoint there (skipped: {', '.join(skipped)})")
    if skipped and rank == 0:
        print(f"[mmtrain] warning: no valid checkpoint in {checkpoint_root(output_dir)}; starting from step 0", file=sys.stderr, flush=True)
    return None


def clean_partial(output_dir) -> None:
    """Remove what a killed run left behind (rank 0, before training starts): folders never
    committed (`.tmp`), prunes cut short (`.del`); a committed checkpoint displaced by a re-save
    that did not finish (`.old`) is put back."""
    root = checkpoint_root(output_dir)
    if not root.is_dir():
        return
    for p in root.iterdir():
        if not p.is_dir():
            continue
        if p.name.endswith(".old"):
            orig = root / p.name[: -len(".old")]
            if not orig.exists() and (p / META).is_file():
                os.replace(p, orig)
            else:
                shutil.rmtree(p, ignore_errors=True)
        elif p.name.endswith((".tmp", ".del")):
            shutil.rmtree(p, ignore_errors=True)


def prune(output_dir, keep_last: int) -> None:
    """Delete all but the newest `keep_last` committed checkpoints (0 = keep all); renamed first,
    so a kill midway never leaves a half-deleted folder under a checkpoint's name."""
    if keep_last <= 0:
        return
    for p in list_checkpoints(output_dir)[:-keep_last]:
        gone = p.with_name(p.name + ".del")
        os.replace(p, gone)
        shutil.rmtree(gone, ignore_errors=True)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# ---- what a rank holds: parameters and optimizer state by global name -------------------------


@dataclass
class ParamInfo:
    name: str
    param: torch.nn.Parameter
    pieces: list
    full_shape: tuple[int, ...]
    saved: bool


def _inner_optimizers(optimizer) -> list:
    return list(getattr(optimizer, "chained_optimizers", [optimizer]))


def _is_dist_opt(o) -> bool:
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    return isinstance(o, DistributedOptimizer)


def uses_distributed_optimizer(optimizer) -> bool:
    return any(_is_dist_opt(o) for o in _inner_optimizers(optimizer))


@dataclass
class StateView:
    """Optimizer state of one model parameter held by this rank: the flat range [start, stop) of
    the local shard it covers and its tensors (1-D over that range; 0-d for scalars like `step`)."""

    param: torch.nn.Parameter
    start: int
    stop: int
    tensors: dict[str, torch.Tensor]


def _flat_states(state: dict, main: torch.Tensor, model_param: torch.nn.Parameter) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in state.items():
        if torch.is_tensor(v):
            out[k] = v.view(()) if v.dim() == 0 else v.view(-1)
    if main is not model_param and main.dtype != model_param.dtype:
        out["fp32_param"] = main.detach().view(-1)
    return out


def optimizer_state_views(optimizer) -> list[StateView]:
    """Every optimizer state this rank holds, keyed by model parameter (megatron's FP32Optimizer,
    Float16OptimizerWithFloat16Params and DistributedOptimizer; torch Adam underneath)."""
    from megatron.core.optimizer.optimizer import Float16OptimizerWithFloat16Params

    views = []
    for o in _inner_optimizers(optimizer):
        if _is_dist_opt(o):
            for gbuf_range_maps in o.gbuf_ranges:
                for per_bucket in gbuf_range_maps.values():
                    for gbuf_range_map in per_bucket:
                        for model_param, ranges in gbuf_range_map["param_map"].items():
                            r = ranges["param"]
                            t = o._get_main_param_and_optimizer_states(model_param)
                            main = t.pop("param")
                            flat = {k: (v.view(()) if v.dim() == 0 else v.view(-1)) for k, v in t.items() if torch.is_tensor(v)}
                            if main.dtype != model_param.dtype:
                                flat["fp32_param"] = main.detach().view(-1)
                            views.append(StateView(model_param, r.start, r.end, flat))
        elif isinstance(o, Float16OptimizerWithFloat16Params):
            inner = o.optimizer
            for model_group, main_group in zip(o.float16_groups, o.fp32_from_float16_groups):
                for mp, main in zip(model_group, main_group):
                    views.append(StateView(mp, 0, mp.numel(), _flat_states(inner.state[main], main, mp)))
            for group in o.fp32_from_fp32_groups:
                for p in group:
                    views.append(StateView(p, 0, p.numel(), _flat_states(inner.state[p], p, p)))
        else:  # FP32Optimizer: the torch optimizer steps the model parameters themselves
            inner = o.optimizer
            for group in inner.param_groups:
                for p in group["params"]:
                    views.append(StateView(p, 0, p.numel(), _flat_states(inner.state[p], p, p)))
    return views


def ensure_optimizer_state(optimizer) -> None:
    """Give every parameter its optimizer state tensors (torch Adam creates them lazily at the first
    step) so a checkpoint can be loaded into them; values are overwritten by the load."""
    for o in _inner_optimizers(optimizer):
        inner = o.optimizer
        if isinstance(inner, torch.optim.Adam):
            for group in inner.param_groups:
                for p in group["params"]:
                    st = inner.state[p]
                    if st:
                        continue
                    if group.get("fused") or group.get("capturable"):
                        st["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
                    else:
                        st["step"] = torch.tensor(0.0, dtype=torch.float32)
                    st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    if group.get("amsgrad"):
                        st["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        elif _is_dist_opt(o):
            o._init_optimizer_states_with_dummy_values()
        else:
            raise NotImplementedError(f"checkpoint load: optimizer {type(inner).__name__} is not supported")


def _rng_blob() -> dict[str, torch.Tensor]:
    st = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        st["cuda"] = torch.cuda.get_rng_state()
    py = pickle.dumps((np.random.get_state(), random.getstate()))
    st["host"] = torch.frombuffer(bytearray(py), dtype=torch.uint8)
    return st


def _set_rng(st: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(st["torch"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state(st["cuda"])
    npst, pyst = pickle.loads(st["host"].numpy().tobytes())
    np.random.set_state(npst)
    random.setstate(pyst)


# ---- the checkpointer --------------------------------------------------------------------------


@dataclass
class _Job:
    step: int
    reason: str
    t0: float
    meta: dict
    entries: list
    blocking_s: float = 0.0
    done: threading.Event = field(default_factory=threading.Event)
    error: Optional[BaseException] = None
    stats: Optional[dict] = None
    thread: Optional[threading.Thread] = None


class Checkpointer:
    """Saves and loads the checkpoints of one run. Collective: every rank constructs it and calls
    `save`, `load`, `wait` at the same points."""

    def __init__(self, b, src_fp: str, injector=None, keep_last: Optional[int] = None) -> None:
        self.b = b
        self.cfg = b.cfg
        t = self.cfg.trainer
        self.src_fp = src_fp
        self.injector = injector
        self.async_save = bool(t.async_save)
        self.keep_last = t.keep_last if keep_last is None else keep_last
        self.pending: Optional[_Job] = None
        self.last_committed: Optional[int] = None
        self.unreported: list[dict] = []
        lay = b.layout
        self.rank, self.world = lay.rank, lay.world_size
        vlm = b.model.module
        pretrained = bool(self.cfg.model.pretrained)
        self.params: list[ParamInfo] = []
        for rp in params.rank_params(vlm, lay.tp):
            frozen_from_source = pretrained and not rp.param.requires_grad
            self.params.append(
                ParamInfo(rp.name, rp.param, shards.shard_pieces(rp.param.shape, rp.spec, rp.full_shape, lay.tp_rank),
                          tuple(rp.full_shape), saved=bool(t.save_frozen) or not frozen_from_source)
            )
        self.by_param = {id(p.param): p for p in self.params}
        table = {p.name: {"shape": list(p.full_shape), "dtype": str(p.param.dtype).removeprefix("torch."),
                          "trainable": bool(p.param.requires_grad), "saved": p.saved} for p in self.params}
        self.table: dict[str, dict] = {}
        for part in _all_gather_object(table):
            self.table.update(part)
        self.pretrained: Optional[dict] = None
        if pretrained:
            t0 = time.perf_counter()
            self.pretrained = pretrained_fingerprint(self.cfg.model.pretrained)
            self.pretrained["hash_s"] = round(time.perf_counter() - t0, 3)
        # A background save runs its collectives on a group of its own: never interleaved with training's.
        self.group = dist.new_group(backend="gloo") if (self.async_save and _dist_on()) else None

    # ---- entries ---------------------------------------------------------------------------
    def model_entries(self) -> list[Entry]:
        out = []
        for p in self.params:
            if not p.saved:
                continue
            out += shards.param_entries(MODEL + p.name, p.param.data, p.pieces, p.full_shape)
        return out

    def optimizer_entries(self) -> list[Entry]:
        out = []
        for v in optimizer_state_views(self.b.optimizer):
            info = self.by_param.get(id(v.param))
            if info is None:
                raise shards.LayoutError("an optimizer parameter is not a parameter of the model")
            local_shape = tuple(v.param.shape)
            for key, t in sorted(v.tensors.items()):
                fqn = f"{OPTIM}{info.name}/{key}"
                if t.dim() == 0:
                    out.append(Entry(fqn, (), (), t))
                else:
                    out += shards.flat_entries(fqn, t, v.start, info.pieces, local_shape, info.full_shape)
        return out

    def rng_entries(self, blob: Optional[dict] = None) -> list[Entry]:
        blob = blob if blob is not None else _rng_blob()
        return [Entry(f"rng/rank{self.rank}/{k}", tuple(v.shape), (0,) * v.dim(), v) for k, v in blob.items()]

    # ---- save ------------------------------------------------------------------------------
    def save(self, step: int, data_state: dict, extra: dict, reason: str = "interval") -> Optional[dict]:
        """Write checkpoint `step_<step>` (collective). Blocking unless trainer.async_save and
        reason == "interval"; returns the save's stats on rank 0 once committed (None while a
        background save runs: `poll` / `wait` return them)."""
        self.wait()
        if self.last_committed == step:
            return None
        t0 = time.perf_counter()
        lay = self.b.layout
        meta = {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "step": step,
            "reason": reason,
            "time": time.time(),
            "config": config_fingerprint(self.cfg),
            "source_fingerprint": extra.get("source_fingerprint", self.src_fp),
            "layout": {"tp": lay.tp, "pp": lay.pp, "dp": lay.dp, "world_size": lay.world_size},
            "distributed_optimizer": uses_distributed_optimizer(self.b.optimizer),
            "precision": self.cfg.trainer.precision,
            "data": data_state,
            "counters": extra.get("counters", {}),
            "params": self.table,
            "pretrained": self.pretrained,
        }
        # A snapshot (and a JSON check) now: the data module moves on while a background save runs.
        meta = json.loads(json.dumps(meta, default=_jsonable))
        entries = self.model_entries() + self.optimizer_entries() + self.rng_entries()
        background = self.async_save and reason == "interval"
        if background:  # a host copy: training may change the tensors while the thread writes them
            entries = [Entry(e.fqn, e.global_shape, e.offsets, e.tensor.detach().to("cpu", copy=True)) for e in entries]
        job = _Job(step, reason, t0, meta, entries)
        if background:
            job.blocking_s = time.perf_counter() - t0
            job.thread = threading.Thread(target=self._run, args=(job, self.group), name=f"mmtrain-ckpt-{step}", daemon=True)
            job.thread.start()
            self.pending = job
            return None
        self._run(job, None)
        job.blocking_s = time.perf_counter() - t0
        return self._finish(job)

    def _on_write(self, step: int):
        inj = self.injector
        if inj is None or not inj.kill_during_save(step):
            return None

        def hook(i: int, total: int) -> None:
            if i == min(1, total - 1):  # after the first tensor of this rank is in its file
                os.kill(os.getpid(), signal.SIGKILL)

        return hook

    def _run(self, job: _Job, group) -> None:
        from torch.distributed.checkpoint import FileSystemWriter
        from torch.distributed.checkpoint import save as dcp_save

        try:
            root = checkpoint_root(self.cfg.trainer.output_dir)
            name = f"step_{job.step:08d}"
            tmp, final = root / f"{name}.tmp", root / name
            rank, world = _rank_world(group)
            if rank == 0:
                root.mkdir(parents=True, exist_ok=True)
                if tmp.exists():
                    shutil.rmtree(tmp)
                tmp.mkdir()
            _barrier(group)
            planner = shards.EntrySavePlanner(job.entries, on_write=self._on_write(job.step))
            writer = FileSystemWriter(str(tmp), single_file_per_rank=True, sync_files=True, thread_count=1)
            shards.dcp_call(dcp_save, {}, storage_writer=writer, planner=planner, process_group=group)
            written = planner.planned_bytes()
            files = _broadcast_object(sorted(os.listdir(tmp)) if rank == 0 else None, group)  # one view of a shared folder
            mine = {f: {"bytes": (tmp / f).stat().st_size, "crc32": _crc32(tmp / f)} for i, f in enumerate(files) if i % world == rank}
            gathered = _all_gather_object((mine, written), group)
            if rank == 0:
                manifest: dict[str, dict] = {}
                for part, _ in gathered:
                    manifest.update(part)
                meta = dict(job.meta)
                meta["files"] = manifest
                meta["bytes"] = sum(r["bytes"] for r in manifest.values())
                meta["tensor_bytes_by_rank"] = [w for _, w in gathered]
                meta["save"] = {"async": job.thread is not None, "write_s": round(time.perf_counter() - job.t0, 4)}
                with open(tmp / META, "w") as f:
                    json.dump(meta, f, indent=1, default=_jsonable)
                    f.flush()
                    os.fsync(f.fileno())
                _fsync_dir(tmp)
                if final.exists():  # re-saving a step (a resumed run reaching a step saved before)
                    old = final.with_name(final.name + ".old")
                    os.replace(final, old)
                    os.replace(tmp, final)
                    shutil.rmtree(old, ignore_errors=True)
                else:
                    os.replace(tmp, final)
                _fsync_dir(root)
                prune(self.cfg.trainer.output_dir, self.keep_last)
                job.stats = {"step": job.step, "reason": job.reason, "bytes": meta["bytes"], "path": str(final),
                             "save_s": round(time.perf_counter() - job.t0, 4), "async": job.thread is not None}
        except BaseException as e:  # noqa: BLE001 - reported by wait()/poll() in the training thread
            job.error = e
            if job.thread is None:
                raise
        finally:
            job.done.set()

    def _finish(self, job: _Job) -> Optional[dict]:
        self.last_committed = job.step
        if job.stats is None:
            return None
        job.stats["blocking_s"] = round(job.blocking_s, 4)
        self.unreported.append(job.stats)
        return job.stats

    def drain(self) -> list[dict]:
        """Stats of the saves committed since the last call (rank 0; empty elsewhere)."""
        out, self.unreported = self.unreported, []
        return out

    def poll(self) -> Optional[dict]:
        """Stats of a background save that has committed since the last call (None otherwise);
        raises if it failed. Not collective."""
        job = self.pending
        if job is None or not job.done.is_set():
            return None
        return self.wait()

    def wait(self) -> Optional[dict]:
        """Block until the background save (if any) is committed; its stats (rank 0)."""
        job = self.pending
        if job is None:
            return None
        job.done.wait()
        if job.thread is not None:
            job.thread.join()
        self.pending = None
        if job.error is not None:
            raise RuntimeError(f"checkpoint step_{job.step:08d} failed in the background: {type(job.error).__name__}: {job.error}") from job.error
        return self._finish(job)

    # ---- load ------------------------------------------------------------------------------
    def check_pretrained(self, meta: dict, path: Path) -> None:
        """The frozen weights a checkpoint did not store must come from the same model.pretrained."""
        missing = sorted(n for n, r in (meta.get("params") or {}).items() if not r.get("saved", True))
        if not missing:
            return
        saved = meta.get("pretrained") or {}
        if self.pretrained is None:
            raise CheckpointMismatchError(
                f"refusing to resume from {path}: its {len(missing)} frozen tensors (e.g. {missing[0]}) were not written "
                f"(trainer.save_frozen=false) and come from model.pretrained={saved.get('path')}, which this run does not set"
            )
        if saved.get("sha256") != self.pretrained["sha256"]:
            changed = sorted(k for k in set(saved.get("files", {})) | set(self.pretrained["files"])
                             if saved.get("files", {}).get(k) != self.pretrained["files"].get(k))
            raise CheckpointMismatchError(
                f"refusing to resume from {path}: its {len(missing)} frozen tensors (e.g. {missing[0]}) were not written "
                f"(trainer.save_frozen=false) and must come from model.pretrained, but the source changed: the "
                f"checkpoint recorded {saved.get('path')} with sha256 {saved.get('sha256')}, this run's "
                f"{self.pretrained['path']} has sha256 {self.pretrained['sha256']}"
                + (f" (files differing in size or presence: {', '.join(changed)})" if changed else " (same file sizes, different contents)")
                + ". Restore the original source, or resume from a checkpoint saved with trainer.save_frozen=true."
            )

    def load(self, path: Path, meta: dict) -> None:
        """Collective: model, optimizer and (same layout only) RNG state from `path`, resharded to
        this run's TP / PP / DP and optimizer."""
        from torch.distributed.checkpoint import FileSystemReader
        from torch.distributed.checkpoint import load as dcp_load

        self.check_pretrained(meta, path)
        saved = meta.get("params") or {}
        absent = [p.name for p in self.params if p.name not in saved]
        if absent:
            raise CheckpointMismatchError(f"refusing to resume from {path}: it has no parameter {', '.join(absent[:8])}")
        ensure_optimizer_state(self.b.optimizer)
        entries = [e for p in self.params if saved[p.name].get("saved", True)
                   for e in shards.param_entries(MODEL + p.name, p.param.data, p.pieces, p.full_shape)]
        entries += self.optimizer_entries()
        lay = self.b.layout
        same_layout = meta.get("layout") == {"tp": lay.tp, "pp": lay.pp, "dp": lay.dp, "world_size": lay.world_size}
        rng = None
        reader = FileSystemReader(str(path))
        if same_layout:
            stored = reader.read_metadata().state_dict_metadata
            prefix = f"rng/rank{self.rank}/"
            rng = {k[len(prefix):]: torch.empty(tuple(md.size), dtype=md.properties.dtype) for k, md in stored.items() if k.startswith(prefix)}
            entries += self.rng_entries(rng)
        planner = shards.EntryLoadPlanner(entries)
        lacking = [m for part in _all_gather_object(planner.plan_reads(reader.read_metadata())) for m in part]
        if lacking:
            raise CheckpointMismatchError(
                f"refusing to resume from {path}: it does not hold what this model needs:\n  - "
                + "\n  - ".join(sorted(set(lacking))[:20])
            )
        with torch.no_grad():
            shards.dcp_call(dcp_load, {}, storage_reader=reader, planner=planner)
        if rng:
            _set_rng(rng)
        self.last_committed = int(meta["step"])


# ---- convenience: a blocking save (tests, tools) -------------------------------------------------


def save(b, step: int, data_state: dict, extra: dict, keep_last: int) -> Path:
    """Write checkpoint `step_<step>` and wait for it (collective). Returns its path."""
    ck = Checkpointer(b, extra.get("source_fingerprint", ""), keep_last=keep_last)
    ck.save(step, data_state, extra, reason="final")
    return checkpoint_root(b.cfg.trainer.output_dir) / f"step_{step:08d}"


# ---- offline reading (export, tests) -----------------------------------------------------------


def stored_tensors(path: Path) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """fqn -> (full shape, dtype) of every tensor in a checkpoint."""
    from torch.distributed.checkpoint import FileSystemReader

    md = FileSystemReader(str(path)).read_metadata().state_dict_metadata
    return {k: (tuple(v.size), v.properties.dtype) for k, v in md.items() if hasattr(v, "size")}


def read_full(path: Path, fqns: Optional[list[str]] = None) -> dict[str, torch.Tensor]:
    """Full tensors of a checkpoint in this process (no process group needed)."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint import load as dcp_load

    stored = stored_tensors(path)
    want = sorted(stored) if fqns is None else list(fqns)
    out = {k: torch.empty(stored[k][0], dtype=stored[k][1]) for k in want}
    entries = [Entry(k, tuple(t.shape), (0,) * t.dim(), t) for k, t in out.items()]
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
        warnings.simplefilter("ignore", UserWarning)
        shards.dcp_call(dcp_load, {}, storage_reader=FileSystemReader(str(path)), planner=shards.EntryLoadPlanner(entries), no_dist=True)
    return out


def digests(path: Path, prefixes: tuple[str, ...] = (MODEL, OPTIM)) -> dict[str, str]:
    """sha256 of every stored model / optimizer tensor by name: equal digests, equal state."""
    full = read_full(path, [k for k in stored_tensors(path) if k.startswith(prefixes)])
    return {k: hashlib.sha256(t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()).hexdigest() for k, t in full.items()}


def total_bytes(path: Path) -> int:
    return int(read_meta(path).get("bytes", 0))

