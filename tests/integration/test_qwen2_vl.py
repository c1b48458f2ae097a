"""Qwen2-VL and Qwen2.5-VL against transformers, on tiny random checkpoints built here
(tests/qwen_models.py) with real Pillow images of different sizes through transformers' image
processor: ViT hidden states (window order included) and merged image features, logits and
per-token losses of every sample alone and of one packed stream of all of them (text-only sample
included, mRoPE positions from mmtrain's own get_rope_index restarting per sample), at TP1, TP2 and
PP2; the training loss of mmtrain.train.step equals transformers' and is the same at every layout;
import then export is bit-exact; the export of a trained run loads in transformers with our
logits. fp32, CPU, gloo, one torchrun launch for everything.
"""

from __future__ import annotations

import json
import subprocess

import pytest
import torch

import qwen_models as Q
from mmtest_utils import PY, REPO, torchrun

TOL = 1e-5
STEPS = 2
TRAIN = ["trainer.precision=fp32", f"trainer.max_steps={STEPS}", "trainer.lr=1e-2", "trainer.warmup_steps=0",
         "model.freeze_vit=false"]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Per family: the saved checkpoint (with a processor), the streams fed to our model (each
    sample alone, then all packed), transformers' outputs."""
    root = tmp_path_factory.mktemp("qwen")
    out = {}
    for i, fam in enumerate(Q.FAMILIES):
        model = Q.make_hf_model(fam, seed=i)
        d = root / fam
        model.save_pretrained(str(d))
        Q.save_processor(d)
        samples = Q.make_samples(seed=20 + i)
        streams = [Q.packed_inputs([s]) for s in samples] + [Q.packed_inputs(samples)]
        torch.save(streams, root / f"{fam}.inputs.pt")
        pixels = torch.cat([s["images"] for s in streams])
        grid = torch.cat([s["image_grid_thw"] for s in streams])
        with torch.no_grad():
            vt = model.model.visual(pixels, grid_thw=grid, output_hidden_states=True)
        out[fam] = {
            "dir": d, "inputs": root / f"{fam}.inputs.pt", "samples": samples, "streams": streams,
            "hf_logits": [Q.hf_logits(model, s) for s in samples],
            "hf_rope_index": [Q.hf_rope_index(model, s) for s in samples],
            "vit_hidden": [h.float() for h in vt.hidden_states], "features": vt.pooler_output.float(),
        }
    return out


@pytest.fixture(scope="module")
def ours(checkpoints, tmp_path_factory):
    """Both families at TP1 (as DP2), TP2 and PP2: one 2-process launch."""
    out = tmp_path_factory.mktemp("ours") / "q"
    spec = ",".join(f"{c['dir']}={c['inputs']}" for c in checkpoints.values())
    torchrun(2, ["tests/integration/qwen_worker.py", str(out), spec, *TRAIN], timeout=600)
    ranks = [torch.load(f"{out}.rank{r}.pt", weights_only=False) for r in range(2)]
    by_layout = {layout: {fam: [r[layout][str(c["dir"])] for r in ranks] for fam, c in checkpoints.items()} for layout in ranks[0]}
    return {"layouts": by_layout, "root": out.parent, "index": {fam: i for i, fam in enumerate(checkpoints)}}


def _rank0(recs, key):
    """The TP-rank-0 record that holds `key` (the last stage for logits, the first for the ViT)."""
    return next(r for r in recs if key in r and r["tp_rank"] == 0)


def _check_logits(c, last, fam, where):
    n = len(c["samples"])
    packed = c["streams"][-1]
    for i, (s, ref) in enumerate(zip(c["samples"], c["hf_logits"])):
        a, b = packed["spans"][i]
        # the positions fed to our model: transformers' get_rope_index of each sample alone, also
        # inside the pack (RoPE is relative, so logits alone could not tell a uniform shift)
        assert torch.equal(packed["mrope_position_ids"][:, a:b], c["hf_rope_index"][i]), f"{fam}: sample {i}'s packed positions"
        ref_loss = Q.hf_token_losses(ref, s["input_ids"]).float()
        for what, logits, loss in (
            ("alone", last["logits"][i], last["losses"][i]),
            ("packed", last["logits"][n][a:b], last["losses"][n][a:b]),
        ):
            # rows TOKENIZER..VOCAB-1 belong to the checkpoint's vocabulary (not the tokenizer's):
            # finite and compared like the others; only TP padding rows beyond VOCAB are -inf
            d = float((logits[:, : Q.VOCAB] - ref).abs().max())
            assert d <= TOL, f"{fam} {where} sample {i} ({what}): logits differ from transformers by {d:.2e}"
            assert torch.isneginf(logits[:, Q.VOCAB :]).all(), f"{fam} {where}: TP padding rows are not masked"
            d = float((loss[:-1] - ref_loss).abs().max())
            assert d <= TOL, f"{fam} {where} sample {i} ({what}): loss differs from transformers' by {d:.2e}"


@pytest.mark.multiproc
@pytest.mark.parametrize("layout", ["tp1", "tp2", "pp2"])
@pytest.mark.parametrize("family", Q.FAMILIES)
def test_vit_logits_and_losses_equal_transformers(checkpoints, ours, family, layout):
    c = checkpoints[family]
    recs = ours["layouts"][layout][family]
    assert float(c["hf_logits"][0].std()) > 0.1  # logits of order 1: the tolerance is meaningful
    assert c["samples"][1]["grid"].shape[0] == 0 and c["samples"][2]["grid"].shape[0] == 2
    first = _rank0(recs, "vit_hidden")
    # The patch embedding is a matmul here and a Conv3d in transformers: hidden states of order 10
    # agree to fp32 rounding, so this tolerance is relative to their magnitude.
    for k, (ref, hid) in enumerate(zip(c["vit_hidden"], first["vit_hidden"], strict=True)):
        d = float((hid.detach() - ref).abs().max()) / max(1.0, float(ref.abs().max()))
        assert d <= TOL, f"{family} {layout}: ViT hidden state {k} differs from transformers by {d:.2e} (relative)"
    d = float((first["image_features"] - c["features"]).abs().max())
    assert d <= TOL, f"{family} {layout}: merged image features differ from transformers by {d:.2e}"
    _check_logits(c, _rank0(recs, "logits"), family, layout)


def _masked_mean_loss(c) -> float:
    """transformers' mean loss over the text labels (the worker's loss mask) of all samples; the
    worker's micro-batches hold every sample twice (alone, and in the pack), which leaves the mean."""
    total, count = 0.0, 0
    for s, ref in zip(c["samples"], c["hf_logits"]):
        losses = Q.hf_token_losses(ref, s["input_ids"])
        keep = s["input_ids"][1:] != Q.IMAGE_PAD
        total += float(losses[keep].sum())
        count += int(keep.sum())
    return total / count


@pytest.mark.multiproc
@pytest.mark.parametrize("family", Q.FAMILIES)
def test_training_step_loss_equals_transformers_at_every_layout(checkpoints, ours, family):
    """mmtrain.train.step on PackedMicroBatches carrying image_grid_thw and mrope_position_ids: the
    step-0 loss is transformers' loss, and every step's loss is the same at TP1 (DP2), TP2, PP2."""
    ref = _masked_mean_loss(checkpoints[family])
    runs = {layout: ours["layouts"][layout][family][0]["train_losses"] for layout in ("tp1", "tp2", "pp2")}
    assert abs(runs["tp1"][0] - ref) <= TOL * abs(ref), (runs["tp1"][0], ref)
    assert runs["tp1"][-1] < runs["tp1"][0], runs["tp1"]  # it trained
    for layout, losses in runs.items():
        for a, b in zip(runs["tp1"], losses, strict=True):
            assert abs(a - b) <= TOL * abs(a), (family, layout, runs)


def _tensors(d):
    from safetensors import safe_open

    out = {}
    for f in sorted(d.glob("*.safetensors")):
        with safe_open(str(f), "pt") as h:
            out.update({k: h.get_tensor(k) for k in h.keys()})
    return out


@pytest.mark.multiproc
@pytest.mark.parametrize("layout", ["tp1", "tp2", "pp2"])
@pytest.mark.parametrize("family", Q.FAMILIES)
def test_import_then_export_is_bit_exact(checkpoints, ours, tmp_path, family, layout):
    from mmtrain.train.export_hf import export

    exp = tmp_path / "export"
    export(ours["root"] / "q" / str(ours["index"][family]) / layout, exp)
    a, b = _tensors(checkpoints[family]["dir"]), _tensors(exp)
    assert a.keys() == b.keys(), sorted(set(a) ^ set(b))
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), f"{k} changed in the round trip"
    src = json.loads((checkpoints[family]["dir"] / "config.json").read_text())
    assert json.loads((exp / "config.json").read_text()) == src


@pytest.mark.multiproc
@pytest.mark.parametrize("family", Q.FAMILIES)
def test_trained_export_loads_in_transformers_with_our_logits(checkpoints, ours, tmp_path, family):
    """`mmtrain export-hf` of the trained run (ViT, merger and decoder trained): transformers'
    AutoModelForImageTextToText and AutoProcessor load it, and its logits equal our trained model's."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    c = checkpoints[family]
    run = ours["root"] / "q" / str(ours["index"][family]) / "trained"
    exp = tmp_path / "export"
    proc = subprocess.run([PY, "-m", "mmtrain", "export-hf", str(run), "--out", str(exp)], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert "tokenizer.json" in summary["copied"] and "processor_config.json" in summary["copied"]
    AutoProcessor.from_pretrained(str(exp))
    model = AutoModelForImageTextToText.from_pretrained(str(exp)).eval()
    assert type(model).__name__ == type(Q.make_hf_model(family)).__name__
    src, out = _tensors(c["dir"]), _tensors(exp)
    assert src.keys() == out.keys()
    changed = {k.split(".")[0] for k in src if not torch.equal(src[k], out[k])}
    assert {"visual", "model"} <= changed, changed  # the ViT and the decoder both trained
    after = _rank0([r["after"] for r in ours["layouts"]["tp1"][family]], "logits")
    for i, s in enumerate(c["samples"]):
        ref = Q.hf_logits(model, s)
        d = float((after["logits"][i][:, : Q.VOCAB] - ref).abs().max())
        assert d <= TOL, f"{family} sample {i}: transformers on the export differs from our trained model by {d:.2e}"
