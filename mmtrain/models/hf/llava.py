"""The LLaVA family (transformers `LlavaForConditionalGeneration`): a CLIP or SigLIP vision tower,
the 2-layer projector, a Llama / Mistral / Qwen2 decoder.

Config translation both ways, the checkpoint-name spelling of each transformers version, and which
checkpoint tensors make each of our parameters.
"""

from __future__ import annotations

import re
from typing import Any, Optional

from mmtrain.models.config import ModelConfig, head_dim, sliding_windows
from mmtrain.models.hf.common import QKV, Copy, PretrainedError, Recipe, rewrite_first, swap_prefix, text_decoder_recipe

MODEL_TYPE = "llava"
TEXT_TYPES = ("llama", "mistral", "qwen2")
VISION_TYPES = ("clip_vision_model", "siglip_vision_model")

# transformers activation names -> ours (same function; the tanh GELU variants differ by rounding only)
_ACT_IN = {
    "quick_gelu": "quick_gelu", "gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh",
    "gelu_fast": "gelu_tanh", "gelu_python_tanh": "gelu_tanh", "silu": "silu", "swish": "silu", "relu": "relu",
}
_ACT_OUT = {"quick_gelu": "quick_gelu", "gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh", "silu": "silu", "relu": "relu"}

# ---- checkpoint names ---------------------------------------------------------------------------
# One spelling inside mmtrain (transformers 5's module names); checkpoints on the hub and those that
# different transformers versions write use others. `normalize` maps all of them onto ours; export
# writes each tensor the way the source checkpoint spelled it, else as transformers 5 saves.

_NORMALIZE = [
    (re.compile(r"^(?:model\.)?language_model\.lm_head\."), "lm_head."),
    (re.compile(r"^language_model\.model\."), "model.language_model."),
    (re.compile(r"^(?:model\.)?language_model\."), "model.language_model."),
    (re.compile(r"^(?:model\.)?vision_tower\.(?:vision_model\.)?"), "model.vision_tower."),
    (re.compile(r"^(?:model\.)?multi_modal_projector\."), "model.multi_modal_projector."),
]
_SAVE_AS = [  # how transformers 5.x save_pretrained spells them
    ("lm_head.", "language_model.lm_head."),
    ("model.language_model.", "language_model.model."),
    ("model.vision_tower.", "vision_tower."),
    ("model.multi_modal_projector.", "multi_modal_projector."),
]


def normalize(raw: str) -> str:
    return rewrite_first(raw, _NORMALIZE)


def save_name(key: str) -> str:
    return swap_prefix(key, _SAVE_AS)


def passthrough(key: str) -> bool:
    """Checkpoint tensors our model does not hold and export copies from the source unchanged
    (SigLIP's attention-pooling head: LLaVA never uses the pooled output)."""
    return key.startswith("model.vision_tower.head.")


# ---- our parameters <- checkpoint tensors -------------------------------------------------------

_LM, _VT, _MP = "model.language_model.", "model.vision_tower.", "model.multi_modal_projector."
_VIT = re.compile(r"^vision\.blocks\.layers\.(\d+)\.(.+)$")


def recipe(name: str, cfg: ModelConfig) -> Optional[Recipe]:
    """Which checkpoint tensors make our parameter `name` (global); None if none do."""
    found = text_decoder_recipe(name, cfg, _LM)
    if found is not None:
        return found
    v = cfg.vision
    fixed = {
        "vision.conv.weight": _VT + "embeddings.patch_embedding.weight",
        "vision.conv.bias": _VT + "embeddings.patch_embedding.bias",
        "vision.class_embedding": _VT + "embeddings.class_embedding",
        "vision.position_embedding": _VT + "embeddings.position_embedding.weight",
        "vision.ln_pre.weight": _VT + "pre_layrnorm.weight",
        "vision.ln_pre.bias": _VT + "pre_layrnorm.bias",
        "vision.ln_post.weight": _VT + "post_layernorm.weight",
        "vision.ln_post.bias": _VT + "post_layernorm.bias",
        "projector.encoder.linear_fc1.weight": _MP + "linear_1.weight",
        "projector.encoder.linear_fc1.bias": _MP + "linear_1.bias",
        "projector.encoder.linear_fc2.weight": _MP + "linear_2.weight",
        "projector.encoder.linear_fc2.bias": _MP + "linear_2.bias",
    }
    if name in fixed:
        return Copy(fixed[name])
    m = _VIT.match(name)
    if m:
        i, rest = m.group(1), m.group(2)
        p = f"{_VT}encoder.layers.{i}."
        if rest.startswith("self_attention.linear_qkv."):
            leaf = rest.rsplit(".", 1)[1]
            a = p + "self_attn."
            h = v.num_attention_heads
            return QKV(a + f"q_proj.{leaf}", a + f"k_proj.{leaf}", a + f"v_proj.{leaf}", h, h, v.hidden_size // h)
        layer = {
            "input_layernorm.weight": "layer_norm1.weight",
            "input_layernorm.bias": "layer_norm1.bias",
            "self_attention.linear_proj.weight": "self_attn.out_proj.weight",
            "self_attention.linear_proj.bias": "self_attn.out_proj.bias",
            "pre_mlp_layernorm.weight": "layer_norm2.weight",
            "pre_mlp_layernorm.bias": "layer_norm2.bias",
            "mlp.linear_fc1.weight": "mlp.fc1.weight",
            "mlp.linear_fc1.bias": "mlp.fc1.bias",
            "mlp.linear_fc2.weight": "mlp.fc2.weight",
            "mlp.linear_fc2.bias": "mlp.fc2.bias",
        }
        return Copy(p + layer[rest]) if rest in layer else None
    return None


# ---- config.json -> our model config ------------------------------------------------------------


def _act_in(name: str, key: str) -> str:
    if name not in _ACT_IN:
        raise PretrainedError(f"{key}={name!r}: mmtrain has no such activation (supported: {', '.join(sorted(_ACT_IN))})")
    return _ACT_IN[name]


def _rope_theta(t) -> float:
    rp = getattr(t, "rope_parameters", None) or {}
    if "rope_theta" not in rp and hasattr(t, "rope_theta"):
        rp = {"rope_type": "default", "rope_theta": t.rope_theta}
    kind = rp.get("rope_type", rp.get("type", "default"))
    if kind != "default" or rp.get("partial_rotary_factor", 1.0) != 1.0:
        raise PretrainedError(f"text_config.rope_parameters={rp}: only plain RoPE (rope_type=default) is supported")
    return float(rp["rope_theta"])


def model_fields(hf) -> dict[str, Any]:
    """transformers LlavaConfig -> the architecture keys of our ModelConfig (nested dict)."""
    t, v = hf.text_config, hf.vision_config
    if t.model_type not in TEXT_TYPES:
        raise PretrainedError(f"text_config.model_type={t.model_type!r}: supported {', '.join(TEXT_TYPES)}")
    if v.model_type not in VISION_TYPES:
        raise PretrainedError(f"vision_config.model_type={v.model_type!r}: supported {', '.join(VISION_TYPES)}")
    if t.hidden_act not in ("silu", "swish"):
        raise PretrainedError(f"text_config.hidden_act={t.hidden_act!r}: the decoder MLP is SwiGLU (silu)")
    if getattr(t, "mlp_bias", False) or getattr(t, "attention_bias", False):
        raise PretrainedError("text_config.attention_bias / mlp_bias: biases on o_proj or the MLP are not supported")
    if not isinstance(hf.vision_feature_layer, int):
        raise PretrainedError(f"vision_feature_layer={hf.vision_feature_layer}: a list of layers is not supported, only one")
    heads = t.num_attention_heads
    hd = getattr(t, "head_dim", None) or t.hidden_size // heads
    sliding, layer_types = None, None
    if t.model_type == "mistral":
        sliding = t.sliding_window
    elif t.model_type == "qwen2":
        types = list(getattr(t, "layer_types", None) or [])
        if "sliding_attention" in types:
            sliding, layer_types = t.sliding_window, types
    clip = v.model_type == "clip_vision_model"
    return {
        "image_token_id": hf.image_token_id,
        "decoder": {
            "num_layers": t.num_hidden_layers,
            "hidden_size": t.hidden_size,
            "num_attention_heads": heads,
            "num_query_groups": t.num_key_value_heads or heads,
            "ffn_hidden_size": t.intermediate_size,
            "vocab_size": t.vocab_size,
            "head_dim": None if hd == t.hidden_size // heads else hd,
            "rotary_base": _rope_theta(t),
            "norm_epsilon": float(t.rms_norm_eps),
            "qkv_bias": t.model_type == "qwen2",
            "tie_word_embeddings": bool(hf.tie_word_embeddings),
            "sliding_window": sliding,
            "layer_types": layer_types,
        },
        "vision": {
            "num_layers": v.num_hidden_layers,
            "hidden_size": v.hidden_size,
            "num_attention_heads": v.num_attention_heads,
            "ffn_hidden_size": v.intermediate_size,
            "image_size": v.image_size,
            "patch_size": v.patch_size,
            "in_channels": v.num_channels,
            "class_token": clip,
            "patch_bias": not clip,
            "pre_layernorm": clip,
            "post_layernorm": False,
            "activation": _act_in(v.hidden_act, "vision_config.hidden_act"),
            "feature_layer": int(hf.vision_feature_layer),
            "feature_select_strategy": hf.vision_feature_select_strategy,
            "norm_epsilon": float(v.layer_norm_eps),
        },
        "projector": {
            "ffn_hidden_size": t.hidden_size,
            "activation": _act_in(hf.projector_hidden_act, "projector_hidden_act"),
            "bias": bool(hf.multimodal_projector_bias),
        },
    }


# ---- our model config -> config.json ------------------------------------------------------------


def _text_type(cfg: ModelConfig) -> str:
    d = cfg.decoder
    if d.qkv_bias or d.layer_types is not None:
        return "qwen2"
    return "mistral" if d.sliding_window is not None else "llama"


def hf_config_dict(cfg: ModelConfig, source: Optional[dict] = None) -> dict:
    """config.json for our architecture: the source checkpoint's config (token ids, dtype, processor
    fields kept) with every architectural key set from `cfg`. Raises when transformers' LLaVA cannot
    express the architecture."""
    d, v, p = cfg.decoder, cfg.vision, cfg.projector
    if v.post_layernorm:
        raise PretrainedError("model.vision.post_layernorm=true has no transformers LLaVA equivalent")
    if v.class_token != v.pre_layernorm or v.class_token == v.patch_bias:
        raise PretrainedError(
            "model.vision: transformers has CLIP (class_token, pre_layernorm, no patch_bias) or SigLIP "
            "(no class_token, no pre_layernorm, patch_bias); this mix is neither"
        )
    if p.ffn_hidden_size != d.hidden_size:
        raise PretrainedError("model.projector.ffn_hidden_size must equal model.decoder.hidden_size in transformers' LLaVA")
    out = dict(source or {})
    text = dict(out.get("text_config") or {})
    vision = dict(out.get("vision_config") or {})
    text_type = text.get("model_type") if text.get("model_type") in TEXT_TYPES else _text_type(cfg)
    if d.qkv_bias and text_type != "qwen2":
        text_type = "qwen2"
    vision_type = "clip_vision_model" if v.class_token else "siglip_vision_model"
    if vision.get("model_type") != vision_type:
        vision = {}
    if text.get("model_type") != text_type:
        text = {}
    windows = sliding_windows(cfg)
    text.update(
        model_type=text_type,
        num_hidden_layers=d.num_layers,
        hidden_size=d.hidden_size,
        num_attention_heads=d.num_attention_heads,
        num_key_value_heads=d.num_query_groups,
        intermediate_size=d.ffn_hidden_size,
        vocab_size=d.vocab_size,
        hidden_act="silu",
        rms_norm_eps=d.norm_epsilon,
        tie_word_embeddings=d.tie_word_embeddings,
    )
    hd = head_dim(cfg)
    if "head_dim" in text or text_type != "qwen2" or hd != d.hidden_size // d.num_attention_heads:
        text["head_dim"] = hd  # Qwen2 configs derive it and usually leave the key out
    text.pop("rope_theta", None)
    text.pop("rope_scaling", None)
    text["rope_parameters"] = {"rope_type": "default", "rope_theta": float(d.rotary_base)}
    if text_type == "llama":
        text.update(attention_bias=False, mlp_bias=False)
        if any(w is not None for w in windows):
            raise PretrainedError("sliding-window attention needs a Mistral or Qwen2 decoder")
    elif text_type == "mistral":
        if len(set(windows)) > 1:
            raise PretrainedError("Mistral slides in every layer; per-layer windows need Qwen2 (model.decoder.qkv_bias=true)")
        text["sliding_window"] = windows[0] if windows else None
        text.pop("layer_types", None)
    else:  # qwen2
        if not d.qkv_bias:
            raise PretrainedError("transformers' Qwen2 always has Q/K/V biases: set model.decoder.qkv_bias=true")
        sliding = any(w is not None for w in windows)
        text.update(
            use_sliding_window=sliding,
            sliding_window=d.sliding_window if sliding else None,
            layer_types=["sliding_attention" if w is not None else "full_attention" for w in windows],
        )
    src_act = vision.get("hidden_act")
    vision.update(
        model_type=vision_type,
        num_hidden_layers=v.num_layers,
        hidden_size=v.hidden_size,
        num_attention_heads=v.num_attention_heads,
        intermediate_size=v.ffn_hidden_size,
        image_size=v.image_size,
        patch_size=v.patch_size,
        num_channels=v.in_channels,
        layer_norm_eps=v.norm_epsilon,
        hidden_act=src_act if _ACT_IN.get(src_act) == v.activation else _ACT_OUT[v.activation],
    )
    src_proj_act = out.get("projector_hidden_act")
    out.setdefault("architectures", ["LlavaForConditionalGeneration"])
    out.update(
        model_type=MODEL_TYPE,
        text_config=text,
        vision_config=vision,
        vision_feature_layer=v.feature_layer,
        vision_feature_select_strategy=v.feature_select_strategy,
        projector_hidden_act=src_proj_act if _ACT_IN.get(src_proj_act) == p.activation else _ACT_OUT[p.activation],
        multimodal_projector_bias=p.bias,
        tie_word_embeddings=d.tie_word_embeddings,
    )
    if cfg.image_token_id is not None:
        out["image_token_index"] = cfg.image_token_id
    out.pop("image_token_id", None)
    return out
