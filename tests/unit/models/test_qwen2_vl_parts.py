"""Qwen2-VL / Qwen2.5-VL pieces against transformers, without building our model: mRoPE positions
(get_rope_index) and their packing, the decoder's rotary cos/sin, the ViT's patch positions and
window order, the fused-QKV conversion, config.json both ways (transformers 5 and the hub's
transformers 4 layout), and the errors a user sees."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

import qwen_models as Q
from mmtrain.models import params
from mmtrain.models.config import ModelConfig, validate
from mmtrain.models.hf import qwen2_vl, resolve
from mmtrain.models.hf.common import FusedQKV, PretrainedError, SafetensorsFolder, read_shard
from mmtrain.models.mrope import inv_freq, mrope_angles, mrope_position_ids, packed_mrope_position_ids, rotary_cos_sin
from mmtrain.models.qwen_vision import patch_positions, window_index


@pytest.fixture(scope="module")
def hf_models():
    return {fam: Q.make_hf_model(fam) for fam in Q.FAMILIES}


def _ours(sample) -> np.ndarray:
    return mrope_position_ids(len(sample["input_ids"]), Q.image_starts(sample["input_ids"]), sample["grid"].numpy(), Q.MERGE)


@pytest.mark.parametrize("family", Q.FAMILIES)
def test_mrope_positions_equal_get_rope_index(hf_models, family):
    """Text only, one image, several images of different sizes, an image first, images back to back."""
    samples = Q.make_samples((0, 1, 2, 3), seed=5)
    first = dict(samples[1])
    first["input_ids"] = first["input_ids"][1:]  # starts with the image's pad tokens (vision_start dropped)
    for s in [*samples, first]:
        ours = _ours(s)
        assert np.array_equal(ours, Q.hf_rope_index(hf_models[family], s).numpy())
    assert _ours(samples[3])[1].max() > _ours(samples[3])[0].max() - 3  # images really spread rows/columns


def test_pack_restarts_positions_for_every_sample():
    samples = Q.make_samples((1, 0, 2), seed=6)
    spec = [(len(s["input_ids"]), Q.image_starts(s["input_ids"]), s["grid"].numpy()) for s in samples]
    packed = packed_mrope_position_ids(spec, Q.MERGE)
    at = 0
    for s in samples:
        n = len(s["input_ids"])
        assert np.array_equal(packed[:, at : at + n], _ours(s)) and (packed[:, at] == 0).all()
        at += n
    assert packed.shape == (3, at)


def test_positions_reject_images_that_do_not_fit():
    with pytest.raises(ValueError, match="runs past"):
        mrope_position_ids(5, [3], [[1, 4, 4]], 2)  # 4 tokens from index 3 in a 5-token sample
    with pytest.raises(ValueError, match="overlaps"):
        mrope_position_ids(20, [2, 4], [[1, 4, 4], [1, 2, 2]], 2)
    with pytest.raises(ValueError, match="2 image starts for 1"):
        mrope_position_ids(20, [2, 9], [[1, 4, 4]], 2)


@pytest.mark.parametrize("family", Q.FAMILIES)
def test_rotary_cos_sin_equal_transformers(hf_models, family):
    lm = hf_models[family].model.language_model
    g = torch.Generator().manual_seed(0)
    pos = torch.randint(0, 50, (3, 1, 17), generator=g)
    x = torch.zeros(1, 17, 64)
    ref_cos, ref_sin = lm.rotary_emb(x, pos)
    t = lm.config
    section = t.rope_parameters["mrope_section"]
    angles = mrope_angles(pos[:, 0], inv_freq(64 // 4, t.rope_parameters["rope_theta"]), section)
    cos, sin = rotary_cos_sin(angles, torch.float32)
    assert torch.equal(cos[:, 0], ref_cos[0]) and torch.equal(sin[:, 0], ref_sin[0])


GRIDS = [[[1, 4, 8]], [[1, 10, 4], [1, 6, 4]], [[1, 8, 8]], [[2, 6, 10], [1, 2, 2], [1, 14, 6]]]


@pytest.mark.parametrize("grids", GRIDS)
def test_patch_positions_and_window_order_equal_transformers(grids):
    """Merge-block order of the 2D positions; windows of 2x2 and 3x3 merged tokens, partial windows
    at the right and bottom edges, several frames, several images."""
    from transformers.vision_utils import get_vision_position_ids, get_vision_window_index

    g = torch.tensor(grids)
    assert np.array_equal(patch_positions(g, 2), get_vision_position_ids(g, 2).numpy())
    for window_px in (56, 84):
        ref_index, ref_cu = get_vision_window_index(g, spatial_merge_size=2, window_size=window_px, patch_size=14)
        order, lengths = window_index(g, 2, window_px // 2 // 14)
        assert np.array_equal(order, ref_index.numpy())
        assert np.array_equal(np.concatenate([[0], np.cumsum(lengths) * 4]), ref_cu.numpy())


def test_fused_qkv_loads_by_head_and_exports_back(tmp_path):
    """The ViT's fused [q; k; v] becomes megatron's per-head [q_h, k_h, v_h], each TP rank reading
    only its heads; to_hf of the unsharded tensor gives the checkpoint tensor back."""
    from safetensors.torch import save_file

    heads, d, h = 4, 3, 5
    w = torch.randn(3 * heads * d, h)
    b = torch.randn(3 * heads * d)
    save_file({"qkv.weight": w, "qkv.bias": b}, str(tmp_path / "model.safetensors"))
    with SafetensorsFolder(tmp_path) as src:
        for leaf, full in (("weight", w), ("bias", b)):
            r = FusedQKV(f"qkv.{leaf}", heads, d)
            shards = [read_shard(r, src, params.ShardSpec(0), rank, 2, (3 * heads * d // 2, *full.shape[1:])) for rank in range(2)]
            ours = params.unshard(shards, params.ShardSpec(0), 0)
            q, k, v = full.reshape(3, heads, d, *full.shape[1:])
            assert torch.equal(ours.reshape(heads, 3, d, *full.shape[1:])[1, 1], k[1])  # head 1's k
            assert torch.equal(shards[1].reshape(2, 3, d, *full.shape[1:])[0, 0], q[2])  # rank 1 starts at head 2
            assert torch.equal(r.to_hf(ours)[f"qkv.{leaf}"], full)


def test_gated_vision_mlp_shards_as_gate_and_up():
    assert params.shard_spec("vision.blocks.layers.0.mlp.linear_fc1.weight") == params.ShardSpec(0)
    assert params.shard_spec("vision.blocks.layers.0.mlp.linear_fc1.bias", gated_vision=True) == params.ShardSpec(0, gated=True)
    assert params.shard_spec("projector.encoder.linear_fc1.weight", gated_vision=True) == params.ShardSpec(0)


def _resolved(tmp_path, family):
    Q.hf_config(family).save_pretrained(str(tmp_path))
    return resolve(ModelConfig(architecture="pretrained", pretrained=str(tmp_path))), json.loads((tmp_path / "config.json").read_text())


@pytest.mark.parametrize("family", Q.FAMILIES)
def test_config_round_trip(tmp_path, family):
    """config.json -> ours -> config.json is the identity with the source, and transformers reads
    the one written without a source as the same architecture."""
    cfg, source = _resolved(tmp_path, family)
    arch = {"qwen2_vl": "Qwen2VLForConditionalGeneration", "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration"}[family]
    assert qwen2_vl.hf_config_dict(cfg, source) == {"architectures": [arch], **source}
    fresh = qwen2_vl.hf_config_dict(cfg)
    hf = type(Q.hf_config(family))(**fresh)
    assert hf.model_type == family
    ours = dataclasses.asdict(cfg)
    fields = qwen2_vl.model_fields(hf)
    for sec in ("decoder", "vision", "projector"):
        assert fields[sec] == {k: ours[sec][k] for k in fields[sec]}, sec
    v = cfg.vision
    if family == "qwen2_5_vl":
        assert (v.normalization, v.gated_mlp, v.window_size, v.fullatt_block_indexes) == ("RMSNorm", True, 56, [1])
    else:
        assert (v.normalization, v.gated_mlp, v.window_size, v.activation) == ("LayerNorm", False, None, "quick_gelu")
        assert cfg.decoder.tie_word_embeddings and cfg.decoder.layer_types == ["full_attention", "sliding_attention"]
    assert cfg.decoder.vocab_size == Q.VOCAB and cfg.decoder.qkv_bias and cfg.projector.ffn_hidden_size == 4 * v.hidden_size


def test_hub_layout_config_reads_and_round_trips(tmp_path):
    """Qwen2-VL checkpoints on the hub keep the text keys at the top level with rope_scaling
    {type: mrope}: the same architecture, and export writes that layout back unchanged."""
    cfg, source = _resolved(tmp_path / "v5", "qwen2_vl")
    text = source["text_config"]
    legacy = {k: v for k, v in source.items() if k != "text_config"}
    legacy.update({k: v for k, v in text.items() if k not in ("model_type", "rope_parameters", "layer_types")})
    legacy["rope_scaling"] = {"type": "mrope", "mrope_section": text["rope_parameters"]["mrope_section"]}
    legacy["rope_theta"] = text["rope_parameters"]["rope_theta"]
    hub_vision = {k: v for k, v in legacy["vision_config"].items() if k not in ("hidden_act", "rope_parameters", "in_channels")}
    legacy["vision_config"] = {**hub_vision, "in_chans": 3, "spatial_patch_size": 14}
    (tmp_path / "hub").mkdir()
    (tmp_path / "hub" / "config.json").write_text(json.dumps(legacy))
    hub = resolve(ModelConfig(architecture="pretrained", pretrained=str(tmp_path / "hub")))
    assert hub.decoder == cfg.decoder and hub.vision == cfg.vision
    back = qwen2_vl.hf_config_dict(hub, json.loads((tmp_path / "hub" / "config.json").read_text()))
    assert back == {"architectures": ["Qwen2VLForConditionalGeneration"], **legacy}
    assert "text_config" not in back and back["rope_scaling"]["mrope_section"] == [2, 3, 3]
    assert back["hidden_size"] == 64 and back["vision_config"] == legacy["vision_config"]


@pytest.mark.parametrize(
    "change,match",
    [
        (lambda m: setattr(m.decoder, "mrope_section", [2, 2, 2]), "mrope_section"),
        (lambda m: setattr(m.vision, "window_size", 20), "window_size"),
        (lambda m: setattr(m.vision, "num_attention_heads", 16), "divisible by 4"),
        (lambda m: setattr(m.vision, "fullatt_block_indexes", [7]), "fullatt_block_indexes"),
        (lambda m: setattr(m.vision, "normalization", "BatchNorm"), "normalization"),
    ],
)
def test_invalid_native_config_is_refused(tmp_path, change, match):
    cfg, _ = _resolved(tmp_path, "qwen2_5_vl")
    change(cfg)
    with pytest.raises(ValueError, match=match):
        validate(cfg)


def test_unrepresentable_architecture_is_refused(tmp_path):
    cfg, source = _resolved(tmp_path, "qwen2_5_vl")
    cfg.vision.gated_mlp = False
    with pytest.raises(PretrainedError, match="SwiGLU"):
        qwen2_vl.hf_config_dict(cfg, source)
    cfg.vision.gated_mlp = True
    cfg.projector.activation = "silu"
    with pytest.raises(PretrainedError, match="patch merger"):
        qwen2_vl.hf_config_dict(cfg, source)


def test_checkpoint_names_of_every_spelling():
    assert qwen2_vl.normalize("visual.blocks.0.attn.qkv.weight") == "model.visual.blocks.0.attn.qkv.weight"
    assert qwen2_vl.normalize("model.visual.merger.ln_q.weight") == "model.visual.merger.ln_q.weight"
    assert qwen2_vl.normalize("model.layers.1.mlp.up_proj.weight") == "model.language_model.layers.1.mlp.up_proj.weight"
    assert qwen2_vl.normalize("model.language_model.norm.weight") == "model.language_model.norm.weight"
    assert qwen2_vl.normalize("lm_head.weight") == "lm_head.weight"
    for key in ("model.language_model.embed_tokens.weight", "model.visual.patch_embed.proj.weight", "lm_head.weight"):
        assert qwen2_vl.normalize(qwen2_vl.save_name(key)) == key
