"""`mmtrain eval` against transformers on real text and real images (tests/hf_chat.py): tiny LLaVA
folders with a trained BPE tokenizer, chat templates with generation markers (string contents and
list-of-parts contents), a LlavaProcessor; a LLaVA JSONL with images of very different shapes,
multi-turn records with `<image>` not always first, text-only records, two images in one record, a
system prompt, a record without an id.

Per sample, our loss sum and target count equal transformers' own answer-only loss (its processor,
its template, labels = input ids where the assistant mask is 1) at TP1 (DP2), TP2 and PP2, packing
on and off; `torchrun -m mmtrain eval` at PP2; a few training steps, then export-hf, and
transformers on the export gives the loss that `mmtrain eval --checkpoint` gives on the run (and
the run's last validation loss). fp32, CPU, gloo.
"""

from __future__ import annotations

import json
import os
import subprocess

import pytest

import hf_chat as C
from mmtest_utils import PY, REPO, free_port, torchrun

REL, ABS = 2e-5, 2e-4


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("hftext")
    data = C.write_dataset(root / "data")
    fams = {}
    for i, fam in enumerate(C.FOLDERS):
        d = C.save_folder(fam, root / fam, seed=i)
        fams[fam] = {"dir": d, "ref": C.reference_losses(d, root / "data", C.FOLDERS[fam][1])}
    return {"root": root, "data": data, "fams": fams}


def _assert_scores(rows, ref, where):
    C.assert_scores(rows, ref, C.record_ids(), where, REL, ABS)


@pytest.fixture(scope="module")
def ours(folders, tmp_path_factory):
    """Every folder at TP1 (DP2), TP2 and PP2, packing on and off: one 2-process launch."""
    out = tmp_path_factory.mktemp("ours") / "eval.json"
    spec = ",".join(f"{f['dir']}={folders['data']}" for f in folders["fams"].values())
    torchrun(2, ["tests/integration/text_worker.py", "eval", str(out), spec, "packing.seq_length=160"])
    return json.loads(out.read_text())


@pytest.mark.multiproc
@pytest.mark.parametrize("packing", ["packed", "unpacked"])
@pytest.mark.parametrize("layout", ["tp1", "tp2", "pp2"])
@pytest.mark.parametrize("family", list(C.FOLDERS))
def test_eval_equals_transformers_answer_only_loss(folders, ours, family, layout, packing):
    f = folders["fams"][family]
    _assert_scores(ours[str(f["dir"])][layout][packing], f["ref"], f"{family} {layout} {packing}")


@pytest.mark.multiproc
def test_torchrun_module_eval_at_pp2(folders, tmp_path):
    """`torchrun ... -m mmtrain eval` (the CLI under torchrun), packing on, PP2: scores and summary."""
    f = folders["fams"]["llama_siglip"]
    out = tmp_path / "scores.jsonl"
    torchrun(2, ["-m", "mmtrain", "eval", "--out", str(out), "model=hf", f"model.pretrained={f['dir']}", "data=llava_json",
                 f"data.source={folders['data']}", "parallel.pipeline_model_parallel_size=2", "packing.seq_length=160"])
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    rows, summary = lines[:-1], lines[-1]
    _assert_scores([[r["id"], r["loss_sum"], r["tokens"]] for r in rows], f["ref"], "torchrun -m mmtrain eval PP2")
    assert summary["samples"] == len(C.RECORDS) and summary["tokens"] == sum(n for _, n in f["ref"].values())
    ref_loss = sum(s for s, _ in f["ref"].values()) / summary["tokens"]
    assert abs(summary["loss"] - ref_loss) <= REL * ref_loss
    assert (tmp_path / "scores.data_report.jsonl").read_text() == ""  # nothing left out


def _run(*args, timeout=300):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_PORT": str(free_port())}
    proc = subprocess.run([PY, *args], cwd=REPO, capture_output=True, text=True, timeout=timeout, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def test_train_export_then_transformers_equals_our_eval(folders, tmp_path):
    """3 steps from the Qwen2 folder (tied embeddings, padded vocab) with a validation loss; export-hf;
    transformers on the export == `mmtrain eval --checkpoint RUN` per sample == the last val loss."""
    f = folders["fams"]["qwen2_clip"]
    run, exp, scores = tmp_path / "run", tmp_path / "export", tmp_path / "scores.jsonl"
    data = f"data.source={folders['data']}"
    _run("-m", "mmtrain.train", "model=hf", f"model.pretrained={f['dir']}", "data=llava_json", data,
         "trainer.max_steps=3", "trainer.global_batch_size=4", "trainer.lr=1e-2", "model.freeze_vit=false",
         "packing.seq_length=160", f"trainer.output_dir={run}", "trainer.log_sample_ids=true",
         "trainer.eval_interval=2", f"data.validation_source={folders['data']}")
    metrics = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert {s for m in metrics for s in m["sample_ids"]} == set(C.record_ids())  # record ids in the metrics
    assert ["val_loss" in m for m in metrics] == [False, True, True]
    _run("-m", "mmtrain", "export-hf", str(run), "--out", str(exp))
    _run("-m", "mmtrain", "eval", "--out", str(scores), "--checkpoint", str(run), "data=llava_json", data, "packing.seq_length=160")
    lines = [json.loads(x) for x in scores.read_text().splitlines()]
    ref = C.reference_losses(exp, folders["root"] / "data", C.FOLDERS["qwen2_clip"][1])
    assert any(abs(ref[k][0] - f["ref"][k][0]) > 1e-2 for k in ref), "the export did not train"
    _assert_scores([[r["id"], r["loss_sum"], r["tokens"]] for r in lines[:-1]], ref, "eval of the trained checkpoint")
    assert abs(metrics[-1]["val_loss"] - lines[-1]["loss"]) <= REL * lines[-1]["loss"]


@pytest.mark.multiproc
def test_one_seed_one_step0_loss_at_pp1_and_pp2_on_llava_json(folders, tmp_path):
    out = tmp_path / "step0.json"
    torchrun(2, ["tests/integration/text_worker.py", "step0", str(out), "model=tiny", "data=llava_json",
                 f"data.source={folders['data']}", "trainer.global_batch_size=4", "trainer.seed=3", "packing.seq_length=400"])
    losses = json.loads(out.read_text())
    assert abs(losses["tp1"] - losses["pp2"]) <= 1e-6 * abs(losses["tp1"]), losses
