"""The Qwen2-VL family (transformers `Qwen2VLForConditionalGeneration`, model_type qwen2_vl, and
`Qwen2_5_VLForConditionalGeneration`, qwen2_5_vl): a native-resolution ViT with 2D rotary and a
patch merger, a Qwen2 decoder with mRoPE.

Qwen2-VL's ViT: LayerNorm, fc1 / activation (QuickGELU) / fc2, every block attends to the whole
image. Qwen2.5-VL's: RMSNorm, SwiGLU with biases, windowed attention except in
`fullatt_block_indexes`, the merger's output width `out_hidden_size`. Both: fused `attn.qkv`, the
merger `ln_q` + Linear / GELU / Linear over 2x2 concatenated patches.

Config translation both ways, the checkpoint-name spelling of each transformers version, and which
checkpoint tensors make each of our parameters.
"""

from __future__ import annotations

import re
from typing import Any, Optional

from mmtrain.models.config import ModelConfig, sliding_windows
from mmtrain.models.hf.common import Copy, FusedQKV, GateUp, PretrainedError, Recipe, rewrite_first, swap_prefix, text_decoder_recipe
from mmtrain.models.hf.llava import _ACT_IN, _ACT_OUT, _act_in

MODEL_TYPES = ("qwen2_vl", "qwen2_5_vl")
_ARCHITECTURES = {"qwen2_vl": "Qwen2VLForConditionalGeneration", "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration"}
_NORM_EPS = 1e-6  # transformers hard-codes the ViT's and the merger's norm epsilon

# ---- checkpoint names ---------------------------------------------------------------------------
# Ours: transformers 5's module names (model.language_model.*, model.visual.*, lm_head.*). Hub
# checkpoints and transformers' save_pretrained spell the decoder model.* and the ViT visual.*.

_NORMALIZE = [
    (re.compile(r"^(?:model\.)?visual\."), "model.visual."),
    (re.compile(r"^model\.language_model\."), "model.language_model."),
    (re.compile(r"^model\."), "model.language_model."),
]
_SAVE_AS = [("model.language_model.", "model."), ("model.visual.", "visual.")]


def normalize(raw: str) -> str:
    return rewrite_first(raw, _NORMALIZE)


def save_name(key: str) -> str:
    return swap_prefix(key, _SAVE_AS)


def passthrough(key: str) -> bool:
    """Every checkpoint tensor has a place in our model."""
    return False


# ---- our parameters <- checkpoint tensors -------------------------------------------------------

_LM, _VT = "model.language_model.", "model.visual."
_VIT = re.compile(r"^vision\.blocks\.layers\.(\d+)\.(.+)$")


def recipe(name: str, cfg: ModelConfig) -> Optional[Recipe]:
    """Which checkpoint tensors make our parameter `name` (global); None if none do."""
    found = text_decoder_recipe(name, cfg, _LM)
    if found is not None:
        return found
    v = cfg.vision
    fixed = {
        "vision.conv.weight": _VT + "patch_embed.proj.weight",
        "vision.ln_post.weight": _VT + "merger.ln_q.weight",
        "vision.ln_post.bias": _VT + "merger.ln_q.bias",
        "projector.encoder.linear_fc1.weight": _VT + "merger.mlp.0.weight",
        "projector.encoder.linear_fc1.bias": _VT + "merger.mlp.0.bias",
        "projector.encoder.linear_fc2.weight": _VT + "merger.mlp.2.weight",
        "projector.encoder.linear_fc2.bias": _VT + "merger.mlp.2.bias",
    }
    if name in fixed:
        return Copy(fixed[name])
    m = _VIT.match(name)
    if m:
        i, rest = m.group(1), m.group(2)
        p = f"{_VT}blocks.{i}."
        leaf = rest.rsplit(".", 1)[1]
        if rest.startswith("self_attention.linear_qkv."):
            return FusedQKV(p + f"attn.qkv.{leaf}", v.num_attention_heads, v.hidden_size // v.num_attention_heads)
        if rest.startswith("mlp.linear_fc1.") and v.gated_mlp:
            return GateUp(p + f"mlp.gate_proj.{leaf}", p + f"mlp.up_proj.{leaf}")
        layer = {
            "input_layernorm": "norm1",
            "self_attention.linear_proj": "attn.proj",
            "pre_mlp_layernorm": "norm2",
            "mlp.linear_fc1": "mlp.fc1",
            "mlp.linear_fc2": "mlp.down_proj" if v.gated_mlp else "mlp.fc2",
        }
        module = rest.rsplit(".", 1)[0]
        return Copy(p + f"{layer[module]}.{leaf}") if module in layer else None
    return None


# ---- config.json -> our model config ------------------------------------------------------------


def _rope(t) -> tuple[float, list[int]]:
    rp = dict(getattr(t, "rope_parameters", None) or {})
    kind = rp.get("rope_type", rp.get("type", "default"))
    if kind not in ("default", "mrope") or rp.get("partial_rotary_factor", 1.0) != 1.0:
        raise PretrainedError(f"text_config.rope_parameters={rp}: only mRoPE without scaling is supported")
    if "mrope_section" not in rp:
        raise PretrainedError(f"text_config.rope_parameters={rp}: no mrope_section")
    return float(rp["rope_theta"]), [int(x) for x in rp["mrope_section"]]


def model_fields(hf) -> dict[str, Any]:
    """transformers Qwen2VLConfig / Qwen2_5_VLConfig -> the architecture keys of our ModelConfig."""
    t, v = hf.text_config, hf.vision_config
    qwen25 = hf.model_type == "qwen2_5_vl"
    if t.hidden_act not in ("silu", "swish"):
        raise PretrainedError(f"text_config.hidden_act={t.hidden_act!r}: the decoder MLP is SwiGLU (silu)")
    heads = t.num_attention_heads
    theta, section = _rope(t)
    types = list(getattr(t, "layer_types", None) or [])
    sliding, layer_types = None, None
    if "sliding_attention" in types:
        sliding, layer_types = t.sliding_window, types
    width = v.hidden_size if qwen25 else v.embed_dim
    out = v.out_hidden_size if qwen25 else v.hidden_size
    if out != t.hidden_size:
        raise PretrainedError(f"vision_config: the merger writes {out} features, the decoder's hidden_size is {t.hidden_size}")
    m = v.spatial_merge_size
    vrp = getattr(v, "rope_parameters", None) or {}
    return {
        "image_token_id": hf.image_token_id,
        "decoder": {
            "num_layers": t.num_hidden_layers,
            "hidden_size": t.hidden_size,
            "num_attention_heads": heads,
            "num_query_groups": t.num_key_value_heads or heads,
            "ffn_hidden_size": t.intermediate_size,
            "vocab_size": t.vocab_size,
            "head_dim": None,  # transformers' Qwen2-VL attention always uses hidden_size / heads
            "rotary_base": theta,
            "mrope_section": section,
            "norm_epsilon": float(t.rms_norm_eps),
            "qkv_bias": True,
            "tie_word_embeddings": bool(hf.tie_word_embeddings),
            "sliding_window": sliding,
            "layer_types": layer_types,
        },
        "vision": {
            "type": "native",
            "num_layers": v.depth,
            "hidden_size": width,
            "num_attention_heads": v.num_heads,
            "ffn_hidden_size": v.intermediate_size if qwen25 else int(v.embed_dim * v.mlp_ratio),
            "patch_size": v.patch_size,
            "temporal_patch_size": v.temporal_patch_size,
            "spatial_merge_size": m,
            "in_channels": v.in_channels,
            "activation": _act_in(v.hidden_act, "vision_config.hidden_act"),
            "normalization": "RMSNorm" if qwen25 else "LayerNorm",
            "gated_mlp": qwen25,
            "window_size": int(v.window_size) if qwen25 else None,
            "fullatt_block_indexes": [int(i) for i in v.fullatt_block_indexes] if qwen25 else None,
            "rotary_base": float(vrp.get("rope_theta", 10000.0)),
            "norm_epsilon": _NORM_EPS,
            # the LLaVA-tile keys, set to what this tower is: no CLS, no learned positions, no
            # pre-LN, the merger's norm on the features, every block's output used
            "class_token": False,
            "patch_bias": False,
            "pre_layernorm": False,
            "post_layernorm": True,
            "feature_layer": -1,
            "feature_select_strategy": "full",
        },
        "projector": {"ffn_hidden_size": width * m * m, "activation": "gelu", "bias": True},
    }


# ---- our model config -> config.json ------------------------------------------------------------


def _family(cfg: ModelConfig, source: Optional[dict]) -> str:
    if source and source.get("model_type") in MODEL_TYPES:
        return source["model_type"]
    v = cfg.vision
    return "qwen2_5_vl" if (v.gated_mlp or v.normalization == "RMSNorm" or v.window_size is not None) else "qwen2_vl"


def _act_out(ours: str, source: Optional[str]) -> str:
    return source if _ACT_IN.get(source) == ours else _ACT_OUT[ours]


def _set(d: dict, key: str, value, default) -> None:
    if key in d or value != default:
        d[key] = value


def hf_config_dict(cfg: ModelConfig, source: Optional[dict] = None) -> dict:
    """config.json for our architecture: the source checkpoint's config (token ids, dtype, processor
    fields kept) with every architectural key set from `cfg`. Raises when transformers' Qwen2-VL /
    Qwen2.5-VL cannot express the architecture."""
    d, v, p = cfg.decoder, cfg.vision, cfg.projector
    family = _family(cfg, source)
    qwen25 = family == "qwen2_5_vl"
    m = v.spatial_merge_size
    problems = []
    if v.type != "native":
        problems.append("model.vision.type must be native")
    if qwen25 and not (v.gated_mlp and v.normalization == "RMSNorm"):
        problems.append("Qwen2.5-VL's ViT is RMSNorm + SwiGLU (model.vision.normalization=RMSNorm, gated_mlp=true)")
    if not qwen25 and (v.gated_mlp or v.normalization != "LayerNorm" or v.window_size is not None):
        problems.append("Qwen2-VL's ViT is LayerNorm + fc1/fc2 without windows")
    if not qwen25 and v.ffn_hidden_size % v.hidden_size:
        problems.append("Qwen2-VL's ViT MLP width must be an integer multiple (mlp_ratio) of its hidden_size")
    if (p.ffn_hidden_size, p.activation, p.bias) != (v.hidden_size * m * m, "gelu", True):
        problems.append("the patch merger is Linear(m^2 h, m^2 h) / GELU / Linear with biases (model.projector)")
    if not d.qkv_bias or d.mrope_section is None:
        problems.append("the decoder has qkv biases and mRoPE (model.decoder.qkv_bias, mrope_section)")
    if d.head_dim not in (None, d.hidden_size // d.num_attention_heads):
        problems.append("the decoder's head_dim is hidden_size / num_attention_heads")
    if problems:
        raise PretrainedError(f"transformers' {_ARCHITECTURES[family]} cannot express this model: " + "; ".join(problems))

    out = dict(source or {})
    legacy = "text_config" not in out and "hidden_size" in out  # hub configs of transformers 4: text keys at the top
    text = out if legacy else dict(out.get("text_config") or {})
    vision = dict(out.get("vision_config") or {})
    windows = sliding_windows(cfg)
    sliding = any(w is not None for w in windows)
    text.update(
        num_hidden_layers=d.num_layers,
        hidden_size=d.hidden_size,
        num_attention_heads=d.num_attention_heads,
        num_key_value_heads=d.num_query_groups,
        intermediate_size=d.ffn_hidden_size,
        vocab_size=d.vocab_size,
        hidden_act=text.get("hidden_act") if _ACT_IN.get(text.get("hidden_act")) == "silu" else "silu",
        rms_norm_eps=d.norm_epsilon,
        use_sliding_window=sliding,
        sliding_window=d.sliding_window if sliding else None,
    )
    types = ["sliding_attention" if w is not None else "full_attention" for w in windows]
    first_sliding = text.get("max_window_layers", d.num_layers)  # how transformers lays out sliding layers
    derived = ["sliding_attention" if sliding and i >= first_sliding else "full_attention" for i in range(d.num_layers)]
    if "layer_types" in text or types != derived:
        text["layer_types"] = types
    if "rope_parameters" in text or "rope_scaling" not in text:
        rope = dict(text.get("rope_parameters") or {"rope_type": "default"})
        rope.update(rope_theta=float(d.rotary_base), mrope_section=list(d.mrope_section))
        text["rope_parameters"] = rope
        text.pop("rope_theta", None)
        text.pop("rope_scaling", None)
    else:  # the hub's layout: rope_scaling {type: mrope, mrope_section} and a separate rope_theta
        text["rope_scaling"] = {**text["rope_scaling"], "mrope_section": list(d.mrope_section)}
        text["rope_theta"] = float(d.rotary_base)
    if not legacy:
        text["model_type"] = f"{family}_text"
        if "tie_word_embeddings" in text:
            text["tie_word_embeddings"] = d.tie_word_embeddings
    vision.update(
        depth=v.num_layers,
        num_heads=v.num_attention_heads,
        patch_size=v.patch_size,
        spatial_merge_size=m,
        temporal_patch_size=v.temporal_patch_size,
    )
    # keys hub configs often leave out: written only when present or not transformers' default
    _set(vision, "in_channels", v.in_channels, 3)
    _set(vision, "hidden_act", _act_out(v.activation, vision.get("hidden_act")), "silu" if qwen25 else "quick_gelu")
    if qwen25:
        everything = list(range(v.num_layers))
        vision.update(
            hidden_size=v.hidden_size,
            intermediate_size=v.ffn_hidden_size,
            out_hidden_size=d.hidden_size,
            # no windows: every block is a full-attention block
            window_size=v.window_size if v.window_size is not None else vision.get("window_size", 112),
            fullatt_block_indexes=list(v.fullatt_block_indexes or []) if v.window_size is not None else everything,
        )
    else:
        vision.update(embed_dim=v.hidden_size, hidden_size=d.hidden_size, mlp_ratio=v.ffn_hidden_size // v.hidden_size)
    if "rope_parameters" in vision or v.rotary_base != 10000.0:
        vision["rope_parameters"] = {**(vision.get("rope_parameters") or {"rope_type": "axial"}), "rope_theta": float(v.rotary_base)}
    vision["model_type"] = f"{family}_vision" if vision.get("model_type") != family else family
    out.setdefault("architectures", [_ARCHITECTURES[family]])
    out.update(model_type=family, vision_config=vision, tie_word_embeddings=d.tie_word_embeddings)
    if not legacy:
        out["text_config"] = text
    if cfg.image_token_id is not None:
        out["image_token_id"] = cfg.image_token_id
    return out
