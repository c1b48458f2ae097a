"""`mmtrain export-hf RUN_DIR_OR_CHECKPOINT --out DIR`: a transformers folder from a training checkpoint.

DIR gets config.json (the source checkpoint's, architecture keys set from the run's model config),
the weights as safetensors shards, and the source's tokenizer / processor / chat template files, so
`AutoModelForImageTextToText.from_pretrained(DIR)` and `AutoProcessor.from_pretrained(DIR)` load it.
Every tensor is written under the source's own name and dtype (`--dtype auto`), so importing a
checkpoint and exporting it again is bit-exact; TP padding rows of the vocabulary are dropped.

The checkpoint is read through `checkpoint_tensors` (full tensors by layout-independent name), the
one place here that knows the checkpoint file format (mmtrain/train/checkpoint.py).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import torch

from mmtrain.models import params
from mmtrain.models.config import ModelConfig
from mmtrain.models.hf import adapter_for_model
from mmtrain.models.hf.common import PretrainedError, SafetensorsFolder, copy_side_files, torch_dtype, write_safetensors
from mmtrain.train import checkpoint as ckpt


@dataclass
class CheckpointTensors:
    """A checkpoint seen as full tensors: `model` is the run's (resolved) model config, `names` the
    layout-independent parameter names (mmtrain.models.params), `get(name)` the full tensor."""

    path: Path
    model: ModelConfig
    step: int
    names: list[str]
    table: dict  # name -> {"shape", "dtype", "saved"} (meta.json's parameter table)

    @property
    def dtype(self) -> torch.dtype:
        return getattr(torch, next(iter(self.table.values()))["dtype"])

    def get(self, name: str) -> torch.Tensor:
        rec = self.table[name]
        if rec.get("saved", True):
            return ckpt.read_full(self.path, [ckpt.MODEL + name])[ckpt.MODEL + name]
        return self._from_source(name, rec)

    def _from_source(self, name: str, rec: dict) -> torch.Tensor:
        """A frozen tensor the checkpoint did not store (trainer.save_frozen=false): read from
        model.pretrained, which must still be the source the run trained with."""
        from mmtrain.models.hf import adapter_for, load_hf_config
        from mmtrain.models.hf.common import read_shard

        meta = ckpt.read_meta(self.path)
        saved = meta.get("pretrained") or {}
        src_dir = self.model.pretrained or saved.get("path")
        if not src_dir or not Path(src_dir).is_dir():
            raise PretrainedError(f"{self.path}: {name} is frozen and not stored; it comes from model.pretrained={src_dir}, which is not there")
        now = ckpt.pretrained_fingerprint(src_dir)
        if now["sha256"] != saved.get("sha256"):
            raise PretrainedError(f"{self.path}: {name} is frozen and not stored, and model.pretrained={src_dir} changed since "
                                  f"the run (sha256 {now['sha256']}, recorded {saved.get('sha256')})")
        adapter = adapter_for(load_hf_config(src_dir).model_type)
        with SafetensorsFolder(src_dir, adapter.normalize) as src:
            full = read_shard(adapter.recipe(name, self.model), src, params.ShardSpec(None), 0, 1, tuple(rec["shape"]))
        return full.to(getattr(torch, rec["dtype"]))


def _model_config_from_fingerprint(flat: dict, pretrained: Optional[str]) -> ModelConfig:
    from omegaconf import OmegaConf

    nested: dict = {}
    for key, value in flat.items():
        if not key.startswith("model."):
            continue
        node = nested
        parts = key.split(".")[1:]
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    nested["pretrained"] = pretrained
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ModelConfig), nested))  # type: ignore[return-value]


def checkpoint_tensors(path) -> CheckpointTensors:
    """Full tensors of a training checkpoint by layout-independent name (mmtrain/train/checkpoint.py
    stores them so: any TP/PP it was saved at reads the same)."""
    path = Path(path)
    meta = ckpt.read_meta(path)
    model = _model_config_from_fingerprint(meta["config"], (meta.get("pretrained") or {}).get("path"))
    table = meta["params"]
    return CheckpointTensors(path, model, int(meta["step"]), sorted(table), table)


def resolve_checkpoint(path) -> Path:
    p = Path(path)
    if ckpt.is_complete(p):
        reason = ckpt.validate(p)
        if reason:
            raise FileNotFoundError(f"{path}: {reason}")
        return p
    if p.is_dir():
        latest = ckpt.find_latest(p.parent if p.name == "checkpoints" else p)
        if latest is not None:
            return latest
    raise FileNotFoundError(f"{path}: not a complete checkpoint (step_N with meta.json), nor a run directory holding one")


def export(ckpt_path, out, dtype: str = "auto", processor_from: Optional[str] = None, max_shard_bytes: int = 5 * 2**30) -> dict:
    ct = checkpoint_tensors(resolve_checkpoint(ckpt_path))
    cfg = ct.model
    out = Path(out)
    source_dir = Path(cfg.pretrained) if cfg.pretrained else None
    if source_dir is not None and not (source_dir / "config.json").is_file():
        print(f"[export-hf] warning: model.pretrained={cfg.pretrained} is not there any more; config and names from the run only", file=sys.stderr)
        source_dir = None
    source_cfg = json.loads((source_dir / "config.json").read_text()) if source_dir else None
    adapter = adapter_for_model(cfg, source_cfg)
    src = SafetensorsFolder(source_dir, adapter.normalize) if source_dir else None
    hf_cfg = adapter.hf_config_dict(cfg, source_cfg)
    fixed = None if dtype == "auto" else torch_dtype(dtype)

    def cast(key: str, t: torch.Tensor) -> torch.Tensor:
        if fixed is not None:
            return t.to(fixed)
        if src is not None and key in src:
            return t.to(torch_dtype(src.dtype(key)))
        return t

    written: list[str] = []

    def tensors() -> Iterator[tuple[str, torch.Tensor]]:
        for name in ct.names:
            r = adapter.recipe(name, cfg)
            if r is None:
                raise PretrainedError(f"{name}: no {hf_cfg['model_type']} tensor corresponds (adapter incomplete)")
            for key, t in r.to_hf(ct.get(name)).items():
                written.append(key)
                yield (src.raw_names.get(key) if src and key in src else adapter.save_name(key)), cast(key, t)
        if src is not None:
            for key in src.keys():
                if adapter.passthrough(key):
                    written.append(key)
                    yield src.raw_names[key], src.read(key)

    try:
        out.mkdir(parents=True, exist_ok=True)
        files = write_safetensors(out, tensors(), max_shard_bytes)
        lost = sorted(set(src.keys()) - set(written)) if src is not None else []
        if lost:
            msg = f"{len(lost)} tensors of {source_dir} are not in the export: {', '.join(lost[:12])}"
            if cfg.architecture == "pretrained":  # same architecture as the source: every tensor must come back
                raise PretrainedError(msg)
            print(f"[export-hf] warning: {msg} (the run's explicit model config differs from the source)", file=sys.stderr)
    finally:
        if src is not None:
            src.close()
    if fixed is not None or "dtype" not in hf_cfg:
        hf_cfg["dtype"] = str(fixed or ct.dtype).removeprefix("torch.")
    (out / "config.json").write_text(json.dumps(hf_cfg, indent=2) + "\n")
    side = Path(processor_from) if processor_from else source_dir
    copied = copy_side_files(side, out) if side is not None else []
    if not copied:
        print("[export-hf] warning: no tokenizer/processor files copied (pass --processor-from DIR)", file=sys.stderr)
    return {"out": str(out), "checkpoint": str(ct.path), "step": ct.step, "tensors": len(written), "files": files, "copied": copied}


def _bytes(s: str) -> int:
    units = {"KB": 2**10, "MB": 2**20, "GB": 2**30}
    for u, m in units.items():
        if s.upper().endswith(u):
            return int(float(s[: -len(u)]) * m)
    return int(s)


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="mmtrain export-hf", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint", help="a run's output_dir (its newest checkpoint) or a checkpoint folder step_N")
    ap.add_argument("--out", required=True, help="folder to write (created)")
    ap.add_argument("--dtype", default="auto", help="auto (each tensor as in the source checkpoint) | fp32 | bf16 | fp16")
    ap.add_argument("--processor-from", default=None, help="copy tokenizer/processor files from here instead of model.pretrained")
    ap.add_argument("--max-shard-size", default="5GB")
    a = ap.parse_args(argv)
    summary = export(a.checkpoint, a.out, a.dtype, a.processor_from, _bytes(a.max_shard_size))
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
