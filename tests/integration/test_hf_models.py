"""Our model against transformers, on tiny random LLaVA checkpoints built here (tests/hf_models.py):
logits and per-token losses (single samples and packed streams), ViT hidden states and image
features, at TP1, TP2 and PP2; one seed = one model at every layout; the same loaded weights give
the same training losses at TP1, TP2, PP2 and DP2; export round trip bit-exact, and the export of a
trained run loads in transformers with the same logits as ours. fp32, CPU, gloo.
"""

from __future__ import annotations

import json
import subprocess

import pytest
import torch

import hf_models as H
from mmtest_utils import PY, REPO, torchrun

TOL = 1e-5


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Per family: the saved checkpoint, the streams fed to our model, transformers' outputs."""
    root = tmp_path_factory.mktemp("hf")
    out = {}
    for i, fam in enumerate(H.FAMILIES):
        model = H.make_hf_model(fam, seed=i)
        d = root / fam
        model.save_pretrained(str(d))
        H.save_processor(d, model.config)
        img = H.image_token_id(model)
        samples = H.make_samples(model.config, 4, seed=10 + i)
        streams = [H.packed_inputs([s], img) for s in samples] + [H.packed_inputs(samples, img)]
        torch.save(streams, root / f"{fam}.inputs.pt")
        pixels = torch.cat([s["images"] for s in streams])
        with torch.no_grad():
            vt = model.model.vision_tower(pixels, output_hidden_states=True)
            feats = model.model.get_image_features(pixels).pooler_output
        out[fam] = {
            "dir": d, "inputs": root / f"{fam}.inputs.pt", "samples": samples, "streams": streams,
            "hf_logits": [H.hf_logits(model, s) for s in samples], "vocab": model.config.text_config.vocab_size,
            "vit_hidden": [h.float() for h in vt.hidden_states], "features": torch.cat(list(feats)).float(),
        }
    return out


def _launch(mode, out, *args):
    torchrun(2, ["tests/integration/model_worker.py", mode, str(out), *args])
    return [torch.load(f"{out}.rank{r}.pt", weights_only=False) for r in range(2)]


def _spec(checkpoints, families):
    return ",".join(f"{checkpoints[f]['dir']}={checkpoints[f]['inputs']}" for f in families)


def _rank0(recs, key):
    """The TP-rank-0 record that holds `key` (the last stage for logits, the first for the ViT)."""
    return next(r for r in recs if key in r and r["tp_rank"] == 0)


@pytest.fixture(scope="module")
def ours(checkpoints, tmp_path_factory):
    """Our model on every checkpoint at TP1 (as DP2), TP2 and PP2: one 2-process launch."""
    ranks = _launch("hf", tmp_path_factory.mktemp("ours") / "hf", _spec(checkpoints, H.FAMILIES))
    return {layout: {fam: [r[layout][str(c["dir"])] for r in ranks] for fam, c in checkpoints.items()} for layout in ranks[0]}


def _check_against_transformers(c, recs, fam, where):
    last, first = _rank0(recs, "logits"), _rank0(recs, "vit_hidden")
    V, n = c["vocab"], len(c["samples"])
    for k, (ref, hid) in enumerate(zip(c["vit_hidden"], first["vit_hidden"])):
        d = float((hid - ref).abs().max())
        assert d <= TOL, f"{fam} {where}: ViT hidden state {k} differs from transformers by {d:.2e}"
    d = float((first["image_features"] - c["features"]).abs().max())
    assert d <= TOL, f"{fam} {where}: projected image features differ by {d:.2e}"
    packed = c["streams"][-1]
    for i, (s, ref) in enumerate(zip(c["samples"], c["hf_logits"])):
        a, b = packed["spans"][i]
        ref_loss = H.hf_token_losses(ref, s["input_ids"]).float()
        for what, logits, loss in (
            ("alone", last["logits"][i], last["losses"][i]),
            ("packed", last["logits"][n][a:b], last["losses"][n][a:b]),
        ):
            assert logits.shape[-1] >= V
            d = float((logits[:, :V] - ref).abs().max())
            assert d <= TOL, f"{fam} {where} sample {i} ({what}): logits differ from transformers by {d:.2e}"
            if logits.shape[-1] > V:  # TP padding rows take no probability mass
                assert torch.isneginf(logits[:, V:]).all(), f"{fam} {where}: padded vocab rows are not masked"
            d = float((loss[:-1] - ref_loss).abs().max())
            assert d <= TOL, f"{fam} {where} sample {i} ({what}): loss differs from transformers' by {d:.2e}"


@pytest.mark.multiproc
@pytest.mark.parametrize("layout", ["tp1", "tp2", "pp2"])
@pytest.mark.parametrize("family", H.FAMILIES)
def test_logits_losses_and_vit_equal_transformers(checkpoints, ours, family, layout):
    """Single samples and a packed stream of all of them (0, 1 and 2 images, anywhere in the text)."""
    c = checkpoints[family]
    assert float(c["hf_logits"][0].std()) > 0.1  # logits of order 1: the tolerance is meaningful
    _check_against_transformers(c, ours[layout][family], family, layout)


@pytest.mark.multiproc
def test_one_seed_gives_one_model_at_every_layout(tmp_path):
    """Initial weights bit-identical by layout-independent name at TP1, TP2 and PP2; step-0 loss equal."""
    base = ["model=tiny", "trainer.precision=fp32", "trainer.global_batch_size=4", "data.num_samples=8", "trainer.seed=7"]
    ranks = _launch("init", tmp_path / "init", *base)
    runs = {}
    for layout in ranks[0]:
        merged = {}
        for r in ranks:
            merged.update(r[layout]["params"])
        runs[layout] = (merged, ranks[0][layout]["loss"])
    ref, loss = runs["tp1"]
    for layout, (weights, other_loss) in runs.items():
        assert weights.keys() == ref.keys(), layout
        for k, t in ref.items():
            assert torch.equal(weights[k], t), f"{layout}: initial {k} differs from TP1's"
        assert abs(other_loss - loss) <= 1e-6 * abs(loss), (layout, other_loss, loss)


TRAIN = ["trainer.precision=fp32", "trainer.global_batch_size=4", "data.num_samples=16", "packing.seq_length=256",
         "data.max_tiles=3", "data.max_text_tokens=32", "trainer.max_steps=3", "trainer.lr=1e-2", "model.freeze_vit=false"]


@pytest.fixture(scope="module")
def trained(checkpoints, tmp_path_factory):
    """Qwen2 (tied embeddings, padded vocab, qkv bias) and Llama + SigLIP (pooling head, head_dim)
    from their checkpoints: 3 steps at TP1 (DP2), TP2 and PP2, checkpoints saved: one launch."""
    fams = ("qwen2_clip", "llama_siglip")
    out = tmp_path_factory.mktemp("trained") / "t"
    ranks = _launch("train", out, _spec(checkpoints, fams), *TRAIN)
    dirs = {fam: out / str(i) for i, fam in enumerate(fams)}
    return {"dirs": dirs, "ranks": ranks, "key": {fam: str(checkpoints[fam]["dir"]) for fam in fams}}


@pytest.mark.multiproc
@pytest.mark.parametrize("family", ["qwen2_clip", "llama_siglip"])
def test_loaded_weights_train_alike_at_every_layout(trained, family):
    r0 = trained["ranks"][0]
    ref = r0["tp1"][trained["key"][family]]["losses"]
    assert ref[-1] < ref[0], ref  # it trained
    for layout in ("tp2", "pp2"):
        losses = r0[layout][trained["key"][family]]["losses"]
        for a, b in zip(ref, losses):
            assert abs(a - b) <= TOL * abs(a), (family, layout, ref, losses)


@pytest.mark.multiproc
@pytest.mark.parametrize("layout", ["tp2", "pp2"])
@pytest.mark.parametrize("family", ["qwen2_clip", "llama_siglip"])
def test_import_then_export_is_bit_exact(checkpoints, trained, tmp_path, family, layout):
    from mmtrain.train.export_hf import export

    exp = tmp_path / "export"
    export(trained["dirs"][family] / layout, exp)
    _assert_same_folder(checkpoints[family]["dir"], exp)


def _export(run, out, *extra):
    proc = subprocess.run([PY, "-m", "mmtrain", "export-hf", str(run), "--out", str(out), *extra], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _tensors(d):
    from safetensors import safe_open

    out = {}
    for f in sorted(d.glob("*.safetensors")):
        with safe_open(str(f), "pt") as h:
            out.update({k: h.get_tensor(k) for k in h.keys()})
    return out


def _assert_same_folder(src, exp):
    a, b = _tensors(src), _tensors(exp)
    assert a.keys() == b.keys(), sorted(set(a) ^ set(b))
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), f"{k} changed in the round trip"
    assert json.loads((exp / "config.json").read_text()) == json.loads((src / "config.json").read_text())


@pytest.mark.multiproc
@pytest.mark.parametrize("family", ["qwen2_clip", "llama_siglip"])
def test_trained_export_loads_in_transformers_with_our_logits(checkpoints, trained, tmp_path, family):
    """`mmtrain export-hf` of the trained run: AutoModelForImageTextToText and AutoProcessor load
    it, its weights are the checkpoint's (the SigLIP head passed through), and transformers'
    logits on it equal our trained model's."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from mmtrain.train.export_hf import checkpoint_tensors, resolve_checkpoint

    c = checkpoints[family]
    run = trained["dirs"][family] / "trained"
    exp = tmp_path / "export"
    if family == "llama_siglip":
        summary = _export(run, exp)  # the CLI
    else:
        from mmtrain.train.export_hf import export

        summary = export(run, exp)
    assert "tokenizer.json" in summary["copied"] and "processor_config.json" in summary["copied"]
    AutoProcessor.from_pretrained(str(exp))
    model = AutoModelForImageTextToText.from_pretrained(str(exp)).eval()
    src, out = _tensors(c["dir"]), _tensors(exp)
    assert src.keys() == out.keys()
    assert any(not torch.equal(src[k], out[k]) for k in src), "nothing trained"
    assert all(torch.equal(src[k], out[k]) for k in src if "vision_tower.head." in k)
    emb = checkpoint_tensors(resolve_checkpoint(run)).get("language_model.embedding.word_embeddings.weight")
    assert torch.equal(emb, out["language_model.model.embed_tokens.weight"])
    after = _rank0([r["tp1"][trained["key"][family]]["after"] for r in trained["ranks"]], "logits")
    V = c["vocab"]
    for i, s in enumerate(c["samples"]):
        ref = H.hf_logits(model, s)
        d = float((after["logits"][i][:, :V] - ref).abs().max())
        assert d <= TOL, f"sample {i}: transformers on the export differs from our trained model by {d:.2e}"


def _train_cli(*args, ok=True):
    proc = subprocess.run([PY, "-m", "mmtrain.train", *args], cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert (proc.returncode == 0) == ok, proc.stderr[-4000:]
    return proc


def test_a_run_ends_with_a_checkpoint_that_exports(tmp_path):
    """trainer.save_final (default on); the tiny model from scratch exports as Llama + CLIP and
    transformers loads it."""
    from transformers import AutoModelForImageTextToText

    out = tmp_path / "run"
    _train_cli("model=tiny", "trainer.max_steps=2", "trainer.global_batch_size=4", "data.num_samples=8", f"trainer.output_dir={out}")
    assert (out / "checkpoints" / "step_00000002" / "meta.json").is_file()
    exp = tmp_path / "export"
    summary = _export(out, exp)
    assert summary["step"] == 2 and summary["files"] == ["model.safetensors"]
    model = AutoModelForImageTextToText.from_pretrained(str(exp))
    assert model.config.text_config.model_type == "llama" and model.config.vision_config.model_type == "clip_vision_model"
    assert model.config.vision_feature_layer == -1


def test_explicit_config_names_every_tensor_that_does_not_fit(checkpoints, tmp_path):
    proc = _train_cli("model=tiny", f"model.pretrained={checkpoints['mistral_clip']['dir']}", "trainer.max_steps=1",
                      f"trainer.output_dir={tmp_path}", ok=False)
    err = proc.stderr
    assert "does not fit this model config" in err
    assert "model.language_model.layers.0.mlp.gate_proj.weight: checkpoint [96, 64], model [128, 64]" in err
    assert "model.vision_tower.embeddings.position_embedding.weight" not in err  # that one fits
