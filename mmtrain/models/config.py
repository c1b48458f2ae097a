"""Model schema (`model=`): decoder, vision encoder, projector, what trains, the attention backend.

The keys follow transformers' LLaVA family (CLIP / SigLIP vision tower, Llama / Mistral / Qwen2
decoder) so a checkpoint's config.json translates key for key (mmtrain/models/hf/). Torch-free:
the data path and the cost model read the shape helpers at the bottom.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

VISION_ACTIVATIONS = ("quick_gelu", "gelu", "gelu_tanh")
PROJECTOR_ACTIVATIONS = ("gelu", "gelu_tanh", "quick_gelu", "silu", "relu")
SELECT_STRATEGIES = ("default", "full")
LAYER_TYPES = ("full_attention", "sliding_attention")


@dataclass
class DecoderConfig:
    num_layers: int = 2
    hidden_size: int = 64
    num_attention_heads: int = 4
    num_query_groups: int = 2
    ffn_hidden_size: int = 128
    vocab_size: int = 256  # the checkpoint's vocabulary; TP padding rows are never part of it
    head_dim: Optional[int] = None  # None: hidden_size / num_attention_heads
    rotary_base: float = 10000.0
    norm_epsilon: float = 1e-5
    qkv_bias: bool = False  # bias on the Q/K/V projections (Qwen2)
    tie_word_embeddings: bool = False  # the LM head reuses the input embedding
    # Keys a query attends to, itself included (transformers' semantics: key j is seen by query i
    # iff i - sliding_window < j <= i). None: full causal attention.
    sliding_window: Optional[int] = None
    # Per layer full_attention | sliding_attention; None: every layer slides when sliding_window is set.
    layer_types: Optional[list[str]] = None
    # The embedding / LM head rows are padded to a multiple of this x TP size; the padded rows are
    # zero, excluded from the softmax and never exported.
    make_vocab_size_divisible_by: int = 128
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
    class_token: bool = True  # a learned CLS token inside the ViT, with its own position (CLIP)
    patch_bias: bool = False  # bias on the patch convolution (SigLIP has one, CLIP none)
    pre_layernorm: bool = True  # LayerNorm on the embeddings before the blocks (CLIP's pre_layrnorm)
    # LayerNorm on the selected features. LLaVA: false (transformers applies CLIP's post_layernorm
    # to the pooled CLS only, which LLaVA never uses); the weights are still held and exported.
    post_layernorm: bool = False
    activation: str = "quick_gelu"  # quick_gelu (CLIP) | gelu | gelu_tanh (SigLIP)
    # Hidden state fed to the projector, indexed like transformers' hidden_states: 0 = embeddings,
    # k = output of block k, negative from the end (-1 the last block, -2 LLaVA-1.5's choice).
    feature_layer: int = -2
    # default: drop the first token (the CLS) from the features; full: keep every token.
    feature_select_strategy: str = "default"
    norm_epsilon: float = 1e-5


@dataclass
class ProjectorConfig:
    ffn_hidden_size: int = 64  # hidden width of the 2-layer MLP (LLaVA: the decoder's hidden size)
    activation: str = "gelu"
    bias: bool = True


@dataclass
class ModelConfig:
    name: str = "tiny"
    # A transformers checkpoint folder (config.json + *.safetensors) whose weights are loaded into
    # this rank's shards; tensors whose shapes differ from this config are named in an error.
    pretrained: Optional[str] = None
    # explicit: decoder/vision/projector come from these keys; pretrained: from <pretrained>/config.json.
    architecture: str = "explicit"
    image_token_id: Optional[int] = None  # the checkpoint's image placeholder id (informational)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    vision: VisionConfig = field(default_factory=VisionConfig)
    projector: ProjectorConfig = field(default_factory=ProjectorConfig)
    freeze_lm: bool = False
    freeze_vit: bool = False
    freeze_projector: bool = False
    # auto | flash_attn | transformer_engine | torch_varlen | reference
    attention_backend: str = "auto"


# ---- shapes that the data path, the cost model and the model share --------------------------------


def patches_per_tile(cfg: ModelConfig) -> int:
    """(image_size // patch_size)^2: the patch conv drops a remainder, as transformers' CLIP / SigLIP do."""
    v = cfg.vision
    side = v.image_size // v.patch_size
    if side < 1:
        raise ValueError(f"model.vision.image_size={v.image_size} is smaller than patch_size={v.patch_size}")
    return side * side


def vit_seq_length(cfg: ModelConfig) -> int:
    """Tokens one tile occupies inside the ViT (patches, plus the CLS when present)."""
    return patches_per_tile(cfg) + int(cfg.vision.class_token)


def tokens_per_tile(cfg: ModelConfig) -> int:
    """Image tokens one tile contributes to the decoder stream (after feature selection)."""
    return vit_seq_length(cfg) - int(cfg.vision.feature_select_strategy == "default")


def head_dim(cfg: ModelConfig) -> int:
    d = cfg.decoder
    return d.head_dim or d.hidden_size // d.num_attention_heads


def padded_vocab_size(cfg: ModelConfig, tp: int) -> int:
    m = max(1, cfg.decoder.make_vocab_size_divisible_by) * tp
    return -(-cfg.decoder.vocab_size // m) * m


def vision_layers_used(cfg: ModelConfig) -> int:
    """How many ViT blocks run to produce the selected hidden state."""
    v = cfg.vision
    k = v.feature_layer if v.feature_layer >= 0 else v.num_layers + 1 + v.feature_layer
    if not 0 <= k <= v.num_layers:
        raise ValueError(
            f"model.vision.feature_layer={v.feature_layer} is outside the {v.num_layers + 1} hidden states "
            f"of a {v.num_layers}-layer ViT (0 = embeddings, -1 = last block)"
        )
    return k


def sliding_windows(cfg: ModelConfig) -> tuple[Optional[int], ...]:
    """The sliding window of every decoder layer (None = full causal)."""
    d = cfg.decoder
    if d.layer_types is None:
        return (d.sliding_window,) * d.num_layers
    if len(d.layer_types) != d.num_layers:
        raise ValueError(f"model.decoder.layer_types has {len(d.layer_types)} entries for {d.num_layers} layers")
    bad = sorted(set(d.layer_types) - set(LAYER_TYPES))
    if bad:
        raise ValueError(f"model.decoder.layer_types: unknown {bad}; use {' | '.join(LAYER_TYPES)}")
    if "sliding_attention" in d.layer_types and d.sliding_window is None:
        raise ValueError("model.decoder.layer_types has sliding_attention layers but model.decoder.sliding_window is unset")
    return tuple(d.sliding_window if t == "sliding_attention" else None for t in d.layer_types)


def validate(cfg: ModelConfig) -> None:
    """Reject values the model cannot build, naming the key."""
    v, p, d = cfg.vision, cfg.projector, cfg.decoder
    if v.activation not in VISION_ACTIVATIONS:
        raise ValueError(f"model.vision.activation={v.activation!r}: choose one of {', '.join(VISION_ACTIVATIONS)}")
    if p.activation not in PROJECTOR_ACTIVATIONS:
        raise ValueError(f"model.projector.activation={p.activation!r}: choose one of {', '.join(PROJECTOR_ACTIVATIONS)}")
    if v.feature_select_strategy not in SELECT_STRATEGIES:
        raise ValueError(f"model.vision.feature_select_strategy={v.feature_select_strategy!r}: choose default or full")
    if cfg.architecture not in ("explicit", "pretrained"):
        raise ValueError(f"model.architecture={cfg.architecture!r}: choose explicit or pretrained")
    if d.sliding_window is not None and d.sliding_window < 1:
        raise ValueError(f"model.decoder.sliding_window={d.sliding_window} must be >= 1 (or null)")
    if d.num_attention_heads % d.num_query_groups:
        raise ValueError(
            f"model.decoder.num_attention_heads={d.num_attention_heads} is not a multiple of num_query_groups={d.num_query_groups}"
        )
    if tokens_per_tile(cfg) < 1:
        raise ValueError("model.vision: feature selection leaves no image tokens per tile")
    vision_layers_used(cfg)
    sliding_windows(cfg)
