"""Frozen weights from model.pretrained are not written to checkpoints (trainer.save_frozen=false):
the checkpoint records the source's fingerprint, a resume rebuilds them from the source and refuses
a source whose contents changed; `mmtrain export-hf` takes them from the source. With
trainer.save_frozen=true they are written and the source no longer matters. Tiny transformers LLaVA
(model=hf: the ViT frozen), one process, fp32."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

import hf_models as H
from mmtest_utils import PY, REPO

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
ENV.pop("MMTRAIN_FAULT_INJECT", None)
COMMON = ["model=hf", "trainer.precision=fp32", "trainer.global_batch_size=4", "data.num_samples=16", "packing.seq_length=256",
          "data.max_tiles=3", "data.max_text_tokens=32", "trainer.lr=1e-2", "trainer.log_sample_ids=true",
          "trainer.progress_bar=off", "trainer.tensorboard=false", "trainer.save_interval=2", "trainer.keep_last=0"]


def train(out: Path, source: Path, *extra: str, ok: bool = True) -> subprocess.CompletedProcess:
    cmd = [PY, "-m", "mmtrain.train", *COMMON, f"model.pretrained={source}", f"trainer.output_dir={out}", *extra]
    proc = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)
    if ok and proc.returncode != 0:
        pytest.fail(f"training failed ({proc.returncode}):\n{proc.stderr[-5000:]}")
    return proc


def metrics(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def changed_copy(source: Path, dst: Path) -> Path:
    """The source with one frozen (vision) weight nudged: same files, same sizes, other contents."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(source, dst)
    f = dst / "model.safetensors"
    tensors = load_file(str(f))
    key = next(k for k in sorted(tensors) if "vision_tower" in k and k.endswith("weight"))
    tensors[key] = tensors[key] + 1e-3
    save_file(tensors, str(f), metadata={"format": "pt"})
    assert f.stat().st_size == (source / "model.safetensors").stat().st_size
    return dst


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("frozen")
    source = H.save_hf_model("mistral_clip", root / "source")
    lean, full = root / "lean", root / "full"
    train(lean, source, "trainer.max_steps=4")
    train(full, source, "trainer.max_steps=2", "trainer.save_frozen=true")
    return {"root": root, "source": source, "lean": lean, "full": full}


def test_frozen_pretrained_weights_are_not_written_by_default(runs):
    from mmtrain.train import checkpoint as ck

    lean, full = (runs[k] / "checkpoints" / "step_00000002" for k in ("lean", "full"))
    meta = ck.read_meta(lean)
    frozen = sorted(n for n, r in meta["params"].items() if not r["saved"])
    assert frozen and all(n.startswith("vision.") for n in frozen)
    assert all(not meta["params"][n]["trainable"] for n in frozen)
    assert meta["pretrained"]["sha256"] and meta["pretrained"]["files"]["model.safetensors"] > 0
    stored = ck.stored_tensors(lean)
    assert not [k for k in stored if k.startswith("model/vision.")]
    assert "model/language_model.decoder.layers.0.self_attention.linear_qkv.weight" in stored
    assert [k for k in ck.stored_tensors(full) if k.startswith("model/vision.")], "save_frozen=true writes them"
    assert ck.total_bytes(lean) < ck.total_bytes(full)


def test_resume_rebuilds_frozen_weights_from_the_source(runs, tmp_path):
    """Resume from the step-2 checkpoint that lacks the ViT: same losses and final state as the
    uninterrupted run."""
    from mmtrain.train import checkpoint as ck

    out = tmp_path / "resumed"
    train(out, runs["source"], "trainer.max_steps=4", f"trainer.resume={runs['lean'] / 'checkpoints' / 'step_00000002'}")
    ref = metrics(runs["lean"])
    got = metrics(out)
    assert [g["step"] for g in got] == [2, 3]
    assert [(g["sample_ids"], g["loss"]) for g in got] == [(r["sample_ids"], r["loss"]) for r in ref[2:]]
    assert ck.digests(out / "checkpoints" / "step_00000004") == ck.digests(runs["lean"] / "checkpoints" / "step_00000004")


def test_a_changed_source_is_refused_unless_frozen_weights_were_saved(runs, tmp_path):
    changed = changed_copy(runs["source"], tmp_path / "changed")
    lean_ckpt = runs["lean"] / "checkpoints" / "step_00000002"
    p = train(tmp_path / "a", changed, "trainer.max_steps=4", f"trainer.resume={lean_ckpt}", ok=False)
    assert p.returncode != 0
    assert "refusing to resume" in p.stderr and "the source changed" in p.stderr and "trainer.save_frozen=true" in p.stderr, p.stderr[-3000:]
    # a checkpoint that holds the frozen weights does not depend on the source
    full_ckpt = runs["full"] / "checkpoints" / "step_00000002"
    train(tmp_path / "b", changed, "trainer.max_steps=3", f"trainer.resume={full_ckpt}")
    ref = metrics(runs["lean"])
    assert metrics(tmp_path / "b")[0]["loss"] == ref[2]["loss"]


def test_export_takes_frozen_weights_from_the_unchanged_source(runs, tmp_path):
    from safetensors.torch import load_file

    from mmtrain.models.hf.common import PretrainedError
    from mmtrain.train.export_hf import export

    export(runs["lean"], tmp_path / "export")
    src = load_file(str(runs["source"] / "model.safetensors"))
    exp = {}
    for f in (tmp_path / "export").glob("*.safetensors"):
        exp.update(load_file(str(f)))
    vision = [k for k in src if "vision_tower" in k]
    assert vision and all(torch.equal(exp[k], src[k]) for k in vision)
    assert any(not torch.equal(exp[k], src[k]) for k in src if "language_model" in k), "the trained LM is exported"
    moved = tmp_path / "run"
    shutil.copytree(runs["lean"], moved)
    meta_path = moved / "checkpoints" / "step_00000004" / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta["pretrained"]["path"] = str(changed_copy(runs["source"], tmp_path / "changed"))
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(PretrainedError, match="changed since the run"):
        export(moved, tmp_path / "export2")
