"""transformers LLaVA configs <-> our model config, checkpoint names, the conversions of fused
tensors, and the errors a user sees (no model is built here)."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

import hf_models as H
from mmtrain.config import compose
from mmtrain.models import params
from mmtrain.models.config import ModelConfig, tokens_per_tile
from mmtrain.models.hf import llava, resolve
from mmtrain.models.hf.common import QKV, Copy, GateUp, PretrainedError, SafetensorsFolder, read_shard


def _same_architecture(fields: dict, cfg: ModelConfig) -> None:
    for sec in ("decoder", "vision", "projector"):
        ours = dataclasses.asdict(getattr(cfg, sec))
        assert fields[sec] == {k: ours[k] for k in fields[sec]}, sec


def test_families_translate_to_our_keys():
    f = llava.model_fields(H.hf_config("mistral_clip"))
    assert f["decoder"]["sliding_window"] == 5 and f["decoder"]["rotary_base"] == 500.5 and not f["decoder"]["qkv_bias"]
    assert f["vision"]["activation"] == "quick_gelu" and f["vision"]["class_token"]
    assert f["vision"]["feature_layer"] == -2 and not f["vision"]["post_layernorm"]
    f = llava.model_fields(H.hf_config("llama_siglip"))
    assert f["decoder"]["head_dim"] == 24 and f["vision"]["activation"] == "gelu_tanh"
    assert not f["vision"]["class_token"] and f["vision"]["patch_bias"] and not f["vision"]["pre_layernorm"]
    f = llava.model_fields(H.hf_config("qwen2_clip"))
    assert f["decoder"]["qkv_bias"] and f["decoder"]["tie_word_embeddings"] and f["decoder"]["vocab_size"] == 99
    assert f["decoder"]["layer_types"] == ["full_attention", "sliding_attention"] and f["decoder"]["sliding_window"] == 4
    assert f["projector"] == {"ffn_hidden_size": 64, "activation": "gelu_tanh", "bias": True}


@pytest.mark.parametrize("family", H.FAMILIES)
def test_config_round_trip(family, tmp_path):
    """config.json -> ours -> config.json -> ours is the identity, with and without the source."""
    from transformers import LlavaConfig

    hf = H.hf_config(family)
    hf.save_pretrained(str(tmp_path))
    cfg = resolve(ModelConfig(architecture="pretrained", pretrained=str(tmp_path)))
    source = json.loads((tmp_path / "config.json").read_text())
    assert llava.hf_config_dict(cfg, source) == {"architectures": ["LlavaForConditionalGeneration"], **source}
    for src in (source, None):
        _same_architecture(llava.model_fields(LlavaConfig(**llava.hf_config_dict(cfg, src))), cfg)
    assert tokens_per_tile(cfg) == H.tokens_per_image(hf)


def test_tiny_model_exports_as_llama_clip():
    from transformers import LlavaConfig

    cfg = compose(["model=tiny"]).model
    out = llava.hf_config_dict(cfg)
    assert out["text_config"]["model_type"] == "llama" and out["vision_config"]["model_type"] == "clip_vision_model"
    _same_architecture(llava.model_fields(LlavaConfig(**out)), cfg)


def test_llava_recipe_is_llava_architecture():
    m = compose(["model=llava_mistral7b_clip224"]).model
    assert tokens_per_tile(m) == 256 and m.vision.activation == "quick_gelu" and m.vision.feature_layer == -2
    assert m.vision.class_token and not m.vision.post_layernorm and m.projector.ffn_hidden_size == m.decoder.hidden_size
    llava.hf_config_dict(m)  # expressible as a transformers LLaVA


@pytest.mark.parametrize(
    "change,match",
    [
        (lambda m: m.vision.__setattr__("post_layernorm", True), "post_layernorm"),
        (lambda m: m.vision.__setattr__("patch_bias", True), "CLIP"),
        (lambda m: m.projector.__setattr__("ffn_hidden_size", 32), "ffn_hidden_size"),
    ],
)
def test_unrepresentable_architecture_is_refused(change, match):
    m = compose(["model=tiny"]).model
    change(m)
    with pytest.raises(PretrainedError, match=match):
        llava.hf_config_dict(m)


def test_unsupported_checkpoints_are_named():
    from transformers import LlamaConfig, LlavaConfig

    hf = LlavaConfig(text_config=LlamaConfig(attention_bias=True))
    with pytest.raises(PretrainedError, match="attention_bias"):
        llava.model_fields(hf)
    hf = LlavaConfig(text_config=LlamaConfig(rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}))
    with pytest.raises(PretrainedError, match="rope"):
        llava.model_fields(hf)


def test_model_hf_needs_a_checkpoint_and_rejects_conflicting_keys(tmp_path):
    with pytest.raises(Exception, match="pretrained"):
        compose(["model=hf"])
    H.hf_config("mistral_clip").save_pretrained(str(tmp_path))
    cfg = compose(["model=hf", f"model.pretrained={tmp_path}"]).model
    assert cfg.decoder.sliding_window == 5 and cfg.image_token_id == 127 and cfg.vision.num_layers == 3
    with pytest.raises(ValueError, match="model.decoder.num_layers=7"):
        compose(["model=hf", f"model.pretrained={tmp_path}", "model.decoder.num_layers=7"])
    with pytest.raises(FileNotFoundError, match="config.json"):
        compose(["model=hf", f"model.pretrained={tmp_path / 'nope'}"])


@pytest.mark.parametrize(
    "raw",
    [
        "language_model.model.layers.0.self_attn.q_proj.weight",  # transformers 4.x / 5 save_pretrained
        "model.language_model.layers.0.self_attn.q_proj.weight",  # transformers 5 module names
    ],
)
def test_checkpoint_spellings_normalise_to_one_name(raw):
    assert llava.normalize(raw) == "model.language_model.layers.0.self_attn.q_proj.weight"


def test_vision_and_head_spellings():
    for raw in ("vision_tower.vision_model.encoder.layers.1.mlp.fc1.bias", "vision_tower.encoder.layers.1.mlp.fc1.bias",
                "model.vision_tower.encoder.layers.1.mlp.fc1.bias"):
        assert llava.normalize(raw) == "model.vision_tower.encoder.layers.1.mlp.fc1.bias"
    assert llava.normalize("language_model.lm_head.weight") == "lm_head.weight"
    assert llava.save_name("model.vision_tower.encoder.layers.1.mlp.fc1.bias") == "vision_tower.encoder.layers.1.mlp.fc1.bias"


def _folder(tmp_path, tensors):
    from safetensors.torch import save_file

    save_file(tensors, str(tmp_path / "model.safetensors"))
    return SafetensorsFolder(tmp_path)


@pytest.mark.parametrize("tp", [1, 2])
def test_qkv_fuses_per_group_and_reads_only_the_rank_slice(tmp_path, tp):
    heads, groups, d, h = 4, 2, 3, 5
    q = torch.arange(heads * d * h, dtype=torch.float32).reshape(heads * d, h)
    k, v = -1 - torch.arange(groups * d * h, dtype=torch.float32).reshape(groups * d, h), 1000 + torch.zeros(groups * d, h)
    r = QKV("q", "k", "v", heads, groups, d)
    with _folder(tmp_path, {"q": q, "k": k, "v": v}) as src:
        shards = [read_shard(r, src, params.ShardSpec(0), rank, tp, ((heads + 2 * groups) * d // tp, h)) for rank in range(tp)]
    full = torch.cat(shards)
    # group 0: q heads 0 and 1, then k0, v0; group 1: q heads 2 and 3, then k1, v1
    expect = torch.cat([q[0:6], k[0:3], v[0:3], q[6:12], k[3:6], v[3:6]])
    assert torch.equal(full, expect)
    back = r.to_hf(full)
    assert torch.equal(back["q"], q) and torch.equal(back["k"], k) and torch.equal(back["v"], v)


def test_gate_up_and_vocab_reads(tmp_path):
    gate, up, emb = torch.randn(8, 3), torch.randn(8, 3), torch.randn(7, 3)
    with _folder(tmp_path, {"g": gate, "u": up, "e": emb}) as src:
        s1 = read_shard(GateUp("g", "u"), src, params.ShardSpec(0, gated=True), 1, 2, (8, 3))
        assert torch.equal(s1, torch.cat([gate[4:], up[4:]]))
        e1 = read_shard(Copy("e"), src, params.ShardSpec(0, vocab=True), 1, 2, (4, 3))  # padded vocab 8: rows 4..7
        assert torch.equal(e1[:3], emb[4:]) and (e1[3] == 0).all()
        row = read_shard(Copy("e"), src, params.ShardSpec(1), 1, 3, (7, 1))
        assert torch.equal(row, emb[:, 1:2])
