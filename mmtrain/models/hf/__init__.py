"""transformers checkpoints in and out: one adapter per model family (`llava`; `qwen2_vl` for
model_type qwen2_vl and qwen2_5_vl), family-independent loading into this rank's TP/PP shards and
export of full tensors.

* `resolve(model_cfg)`: under `model.architecture=pretrained`, the architecture keys come from
  `<model.pretrained>/config.json` (transformers' config classes, local files only).
* `load_pretrained(vlm, model_cfg, tp_rank, tp)`: every parameter of this rank read from the
  checkpoint's safetensors, memory-mapped, only this rank's slice of each tensor; every tensor
  whose shape differs is named in one error.
* `mmtrain.train.export_hf`: `mmtrain export-hf`.
"""

from __future__ import annotations

import dataclasses
import logging
from types import ModuleType
from typing import Any

import torch

from mmtrain.models.config import DecoderConfig, ModelConfig, ProjectorConfig, VisionConfig, validate
from mmtrain.models.hf import llava, qwen2_vl
from mmtrain.models.hf.common import PretrainedError, SafetensorsFolder, load_hf_config

ADAPTERS: dict[str, ModuleType] = {llava.MODEL_TYPE: llava, **{t: qwen2_vl for t in qwen2_vl.MODEL_TYPES}}
log = logging.getLogger("mmtrain")

__all__ = ["ADAPTERS", "PretrainedError", "adapter_for", "adapter_for_model", "load_pretrained", "resolve"]


def adapter_for(model_type: str) -> ModuleType:
    if model_type not in ADAPTERS:
        raise PretrainedError(f"config.json model_type={model_type!r}: mmtrain supports {', '.join(ADAPTERS)}")
    return ADAPTERS[model_type]


def adapter_for_model(cfg: ModelConfig, source: dict | None = None) -> ModuleType:
    """The family that exports `cfg`: the source checkpoint's, else native-resolution models are
    Qwen2-VL-shaped and tile models LLaVA."""
    if source and source.get("model_type"):
        return adapter_for(source["model_type"])
    return qwen2_vl if cfg.vision.type == "native" else llava


_SECTIONS = {"decoder": DecoderConfig, "vision": VisionConfig, "projector": ProjectorConfig}


def resolve(cfg: ModelConfig) -> ModelConfig:
    """The model config with its architecture read from the checkpoint when
    `architecture=pretrained`; explicit configs are returned as they are.

    A key set to something other than its schema default *and* other than the checkpoint's value is
    a conflict (an error naming both): under model=hf the checkpoint decides the architecture.
    """
    if cfg.architecture != "pretrained":
        return cfg
    if not cfg.pretrained:
        raise ValueError("model.architecture=pretrained (model=hf) needs model.pretrained=<transformers checkpoint folder>")
    hf = load_hf_config(cfg.pretrained)
    fields = adapter_for(hf.model_type).model_fields(hf)
    conflicts = []
    sections = {}
    for sec, schema in _SECTIONS.items():
        cur, default = getattr(cfg, sec), schema()
        for k, new in fields[sec].items():
            old = getattr(cur, k)
            if old != getattr(default, k) and old != new:
                conflicts.append(f"model.{sec}.{k}={old!r} but {cfg.pretrained}/config.json gives {new!r}")
        sections[sec] = dataclasses.replace(cur, **fields[sec])
    if conflicts:
        raise ValueError(
            "the architecture comes from the checkpoint under model=hf:\n  - " + "\n  - ".join(conflicts)
            + "\nDrop these overrides, or use an explicit model config (model.architecture=explicit)."
        )
    out = dataclasses.replace(cfg, image_token_id=fields["image_token_id"], **sections)
    validate(out)
    return out


def _warn_architecture_differences(cfg: ModelConfig, hf) -> None:
    """An explicit config loading a checkpoint: say where its non-shape keys differ from config.json."""
    try:
        fields = adapter_for(hf.model_type).model_fields(hf)
    except PretrainedError as e:
        log.warning("model.pretrained=%s: %s", cfg.pretrained, e)
        return
    diffs = []
    for sec in _SECTIONS:
        cur = getattr(cfg, sec)
        for k, v in fields[sec].items():
            if getattr(cur, k) != v:
                diffs.append(f"model.{sec}.{k}={getattr(cur, k)!r} (config.json: {v!r})")
    if diffs:
        log.warning("model.pretrained=%s loads into an explicit config that differs from its config.json: %s", cfg.pretrained, "; ".join(diffs))


@torch.no_grad()
def load_pretrained(vlm, cfg: ModelConfig, tp_rank: int, tp: int) -> dict[str, Any]:
    """Copy the checkpoint `cfg.pretrained` into this rank's parameters (their TP shards, this PP
    stage's layers). Returns {"tensors": n read, "unused": checkpoint tensors nobody reads}."""
    from mmtrain.models import params

    hf = load_hf_config(cfg.pretrained)
    adapter = adapter_for(hf.model_type)
    if cfg.architecture != "pretrained":
        _warn_architecture_differences(cfg, hf)
    missing, mismatched, plan = [], [], []
    with SafetensorsFolder(cfg.pretrained, adapter.normalize) as src:
        for rp in params.rank_params(vlm, tp):
            r = adapter.recipe(rp.name, cfg)
            if r is None:
                raise PretrainedError(f"{rp.name}: no {hf.model_type} checkpoint tensor maps to it (adapter incomplete)")
            for hf_name, want in r.hf_shapes(rp.full_shape).items():
                if hf_name not in src:
                    missing.append(hf_name)
                elif src.shape(hf_name) != tuple(want):
                    mismatched.append(f"{hf_name}: checkpoint {list(src.shape(hf_name))}, model {list(want)} (ours: {rp.name})")
            plan.append((rp, r))
        if missing or mismatched:
            lines = [f"missing {m}" for m in missing] + mismatched
            raise PretrainedError(
                f"model.pretrained={cfg.pretrained} does not fit this model config ({len(lines)} tensors):\n  - "
                + "\n  - ".join(lines)
                + "\nUse model=hf (architecture from the checkpoint's config.json) or fix the model keys."
            )
        used = set()
        for rp, r in plan:
            r.load_into(rp.param.data, src, rp.spec, tp_rank, tp)
            used.update(r.hf_names())
    return {"tensors": len(used), "unused": sorted(k for k in src.keys() if k not in used)}


def unused_tensors(cfg: ModelConfig, names: list[str]) -> list[str]:
    """Checkpoint tensors that no rank's model reads and that are not the family's passthrough ones."""
    hf = load_hf_config(cfg.pretrained)
    adapter = adapter_for(hf.model_type)
    return [n for n in names if not adapter.passthrough(n)]
