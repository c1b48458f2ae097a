"""Model schema (`model=`): decoder, vision encoder, projector, what trains, the attention backend."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class DecoderConfig:
    num_layers: int = 2
    hidden_size: int = 64
    num_attention_heads: int = 4
    num_query_groups: int = 2
    ffn_hidden_size: int = 128
    vocab_size: int = 256
    rotary_base: float = 10000.0
    norm_epsilon: float = 1e-5
    init_method_std: float = 0.02


@dataclass
class VisionConfig:
    num_layers: int = 2
    hidden_size: int = 32
    num_attention_heads: int = 2
    ffn_hidden_size: int = 64
    image_size: int = 28  # tile side in pixels
    patch_size: int = 7
    in_channels: int = 3
    class_token: bool = False  # LLaVA drops CLIP's class token: tokens per tile = (image_size / patch_size)^2
    norm_epsilon: float = 1e-5


@dataclass
class ProjectorConfig:
    ffn_hidden_size: int = 64  # hidden width of the 2-layer GELU MLP


@dataclass
class ModelConfig:
    name: str = "tiny"
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    vision: VisionConfig = field(default_factory=VisionConfig)
    projector: ProjectorConfig = field(default_factory=ProjectorConfig)
    freeze_lm: bool = False
    freeze_vit: bool = False
    freeze_projector: bool = False
    # auto | flash_attn | transformer_engine | torch_varlen | reference
    attention_backend: str = "auto"
