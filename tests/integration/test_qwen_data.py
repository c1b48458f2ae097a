"""Qwen2-VL / Qwen2.5-VL on LLaVA JSON against transformers (tests/qwen_chat.py): tiny folders with
a trained BPE tokenizer carrying Qwen's special tokens, Qwen's chat template with generation markers,
the family's processor (Qwen2VLImageProcessor: smart resize within small min/max pixels); real
images of very different sizes and aspect ratios, multi-turn records with `<image>` anywhere, a
text-only record, two images in one record, a system prompt, a record without an id.

* the data path == transformers' processor, sample by sample, in a packed micro-batch: token ids
  (images expanded to grid_t*grid_h*grid_w / merge^2 <|image_pad|>), loss targets (its assistant
  mask, shifted), flattened patches and image_grid_thw, mRoPE positions == get_rope_index of the
  sample alone (so they restart for every sample of the pack);
* per sample, `mmtrain eval` loss sum and target count == transformers' answer-only loss at TP1
  (DP2), TP2 and PP2, packing on and off, both families, one torchrun launch;
* a few training steps (ViT, merger and decoder trained), export-hf, and transformers on the
  export gives the loss `mmtrain eval --checkpoint` gives on the run. fp32, CPU, gloo.
"""

from __future__ import annotations

import json
import os
import subprocess

import numpy as np
import pytest
import torch

import hf_chat
import qwen_chat as C
from mmtest_utils import PY, REPO, free_port, torchrun

REL, ABS = 2e-5, 2e-4
SEQ = "packing.seq_length=256"  # 2-3 samples a pack


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("qwendata")
    data = C.write_dataset(root / "data")
    fams = {}
    for i, fam in enumerate(C.FAMILIES):
        d = C.save_folder(fam, root / fam, seed=i)
        fams[fam] = {"dir": d, "ref": C.reference_losses(d, root / "data")}
    return {"root": root, "data": data, "fams": fams}


def _assert_scores(rows, ref, where):
    hf_chat.assert_scores(rows, ref, C.record_ids(), where, REL, ABS)


@pytest.mark.parametrize("family", C.FAMILIES)
def test_micro_batch_equals_transformers_processor(folders, family):
    """One packed micro-batch of every record: each sample's span holds transformers' input ids,
    its answer mask as next-token targets, and get_rope_index's positions; the patches and grids are
    the processor's, image by image."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from mmtrain.config import compose
    from mmtrain.models.config import tokens_per_tile
    from mmtrain.steps.batch import build_micro_batch, native_layout
    from mmtrain.steps.from_config import build_source

    d = folders["fams"][family]["dir"]
    cfg = compose(["model=hf", f"model.pretrained={d}", "data=llava_json", f"data.source={folders['data']}", "packing.seq_length=1024"])
    tpt = tokens_per_tile(cfg.model)
    src = build_source(cfg, tpt)
    assert tpt == 1 and src.ids == C.record_ids()
    mb = build_micro_batch([[src.sample(i, True) for i in range(len(src))]], row_length=None, tokens_per_tile=tpt,
                           image_shape=src.image_shape, capacity=1024, native=native_layout(cfg.model))
    proc = AutoProcessor.from_pretrained(str(d), local_files_only=True)
    model = AutoModelForImageTextToText.from_pretrained(str(d), local_files_only=True)
    patches, grids = [], []
    for k, (rec, (a, b)) in enumerate(zip(C.RECORDS, mb.sample_spans)):
        ref = C.encode_reference(proc, rec, folders["root"] / "data")
        ids = ref["input_ids"][0]
        assert torch.equal(mb.tokens[a:b], ids), f"{family} {src.ids[k]}: token ids differ from the processor's"
        mask = torch.as_tensor(ref["assistant_masks"]).reshape(-1)
        want = torch.cat([mask[1:], torch.zeros(1, dtype=mask.dtype)]).float()
        assert torch.equal(mb.loss_mask[a:b], want), f"{family} {src.ids[k]}: loss targets differ from the answer mask"
        if "image_grid_thw" in ref:
            pos, _ = model.model.get_rope_index(ref["input_ids"], mm_token_type_ids=ref["mm_token_type_ids"],
                                                image_grid_thw=ref["image_grid_thw"])
            pos = pos[:, 0]
            patches.append(ref["pixel_values"])
            grids.append(ref["image_grid_thw"])
        else:
            pos = torch.arange(len(ids)).expand(3, -1)
        assert torch.equal(mb.mrope_position_ids[:, a:b], pos), f"{family} {src.ids[k]}: mRoPE positions != get_rope_index"
    assert torch.equal(mb.image_grid_thw, torch.cat(grids))
    per_image = mb.image_grid_thw.prod(dim=1).tolist()
    assert [n for imgs in src.vision_lengths for n in imgs] == per_image  # the cost model's ViT lengths
    assert torch.equal(mb.images, torch.cat(patches).float()), f"{family}: patches differ from the processor's pixel_values"
    assert len(set(map(tuple, mb.image_grid_thw.tolist()))) >= 5  # very different sizes


def test_analyze_shows_the_lengths_transformers_makes(folders, tmp_path):
    """`mmtrain analyze` with the training overrides: per sample the decoder length of transformers'
    processor (images expanded at native resolution), and per image its ViT patches."""
    from transformers import AutoProcessor

    from mmtrain.analysis.stats import main

    d = folders["fams"]["qwen2_5_vl"]["dir"]
    out = tmp_path / "an"
    assert main(["--out", str(out), "--no-plots", "model=hf", f"model.pretrained={d}", "data=llava_json",
                 f"data.source={folders['data']}"]) == 0
    stats = json.loads((out / "stats.json").read_text())
    proc = AutoProcessor.from_pretrained(str(d), local_files_only=True)
    refs = [C.encode_reference(proc, rec, folders["root"] / "data") for rec in C.RECORDS]
    lengths = [int(r["input_ids"].shape[1]) for r in refs]
    patches = [int(g.prod()) for r in refs if "image_grid_thw" in r for g in r["image_grid_thw"]]
    assert stats["total_tokens"]["max"] == max(lengths) and stats["total_tokens"]["min"] == min(lengths)
    assert stats["total_tokens"]["mean"] == pytest.approx(float(np.mean(lengths)))
    assert stats["vit_patches_per_image"]["count"] == len(patches)
    assert stats["vit_patches_per_image"]["mean"] == pytest.approx(float(np.mean(patches)))
    assert (stats["vit_patches_per_image"]["min"], stats["vit_patches_per_image"]["max"]) == (min(patches), max(patches))
    assert "tiles" not in stats and stats["accounting"]["mode"] == "training (native resolution)"


def test_bad_native_records_are_named_or_skipped(folders, tmp_path):
    """An image the Qwen processor refuses (aspect ratio over 200), a missing one and an image that
    decodes to another grid than its header said: `fail` names every record, `skip` lists them in
    the report and trains on the rest; a decode failure in training feeds black patches (masked)."""
    from PIL import Image

    from mmtrain.config import compose
    from mmtrain.data.sources.llava_train import BadSampleError
    from mmtrain.steps.from_config import build_source

    root = folders["root"] / "data"
    Image.new("RGB", (1000, 4)).save(tmp_path / "thin.png")
    recs = [C.RECORDS[0], {"id": "thin", "image": str(tmp_path / "thin.png"), "conversations": C.RECORDS[0]["conversations"]},
            {"id": "gone", "image": "nope.png", "conversations": C.RECORDS[0]["conversations"]}]
    data = tmp_path / "bad.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in recs))
    base = ["model=hf", f"model.pretrained={folders['fams']['qwen2_vl']['dir']}", "data=llava_json",
            f"data.source={data}", f"data.image_root={root}"]
    with pytest.raises(BadSampleError) as err:
        build_source(compose(base), 1)
    assert "'thin'" in str(err.value) and "aspect ratio" in str(err.value) and "'gone'" in str(err.value)
    src = build_source(compose(base + ["data.bad_sample_policy=skip"]), 1)
    assert src.ids == ["first"] and {e["id"] for e in src.report.entries} == {"thin", "gone"}
    s = src.sample(0, True)
    assert s.pixels.shape == (int(np.prod(s.image_grid, axis=1).sum()), 3 * 2 * 14 * 14)
    src._samples[0].files[0] = str(root / "tall.png")  # the file changed since the source was opened
    black = src.sample(0, True)
    assert not black.pixels.any() and black.pixels.shape == s.pixels.shape and 0 in src.decode_failed
    assert src.report.entries[-1]["action"] == "bad_image" and "grid" in src.report.entries[-1]["reason"]


@pytest.fixture(scope="module")
def ours(folders, tmp_path_factory):
    """Both families at TP1 (DP2), TP2 and PP2, packing on and off: one 2-process launch."""
    out = tmp_path_factory.mktemp("ours") / "eval.json"
    spec = ",".join(f"{f['dir']}={folders['data']}" for f in folders["fams"].values())
    torchrun(2, ["tests/integration/text_worker.py", "eval", str(out), spec, SEQ], timeout=600)
    return json.loads(out.read_text())


@pytest.mark.multiproc
@pytest.mark.parametrize("packing", ["packed", "unpacked"])
@pytest.mark.parametrize("layout", ["tp1", "tp2", "pp2"])
@pytest.mark.parametrize("family", C.FAMILIES)
def test_eval_equals_transformers_answer_only_loss(folders, ours, family, layout, packing):
    f = folders["fams"][family]
    _assert_scores(ours[str(f["dir"])][layout][packing], f["ref"], f"{family} {layout} {packing}")


def _run(*args, timeout=300):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_PORT": str(free_port())}
    proc = subprocess.run([PY, *args], cwd=REPO, capture_output=True, text=True, timeout=timeout, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def test_train_export_then_transformers_equals_our_eval(folders, tmp_path):
    """3 steps from the Qwen2.5-VL folder (windowed ViT trained too, untied embeddings, vocabulary
    rows beyond the tokenizer's); export-hf; transformers on the export == `mmtrain eval --checkpoint`."""
    f = folders["fams"]["qwen2_5_vl"]
    run, exp, scores = tmp_path / "run", tmp_path / "export", tmp_path / "scores.jsonl"
    data = f"data.source={folders['data']}"
    _run("-m", "mmtrain.train", "model=hf", f"model.pretrained={f['dir']}", "data=llava_json", data,
         "trainer.max_steps=3", "trainer.global_batch_size=2", "trainer.lr=1e-2", "model.freeze_vit=false", SEQ,
         f"trainer.output_dir={run}", "trainer.log_sample_ids=true")
    metrics = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 3 and all(np.isfinite(m["loss"]) for m in metrics)
    assert {s for m in metrics for s in m["sample_ids"]} <= set(C.record_ids())
    _run("-m", "mmtrain", "export-hf", str(run), "--out", str(exp))
    _run("-m", "mmtrain", "eval", "--out", str(scores), "--checkpoint", str(run), "data=llava_json", data, SEQ)
    lines = [json.loads(x) for x in scores.read_text().splitlines()]
    ref = C.reference_losses(exp, folders["root"] / "data")
    assert any(abs(ref[k][0] - f["ref"][k][0]) > 1e-2 for k in ref), "the export did not train"
    _assert_scores([[r["id"], r["loss_sum"], r["tokens"]] for r in lines[:-1]], ref, "eval of the trained checkpoint")
