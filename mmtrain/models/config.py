"""Model schema (`model=`): decoder, vision encoder, projector, what trains, the attention backend.

The keys follow transformers' LLaVA family (CLIP / SigLIP vision tower, Llama / Mistral / Qwen2
decoder) and its Qwen2-VL / Qwen2.5-VL family (native-resolution ViT with 2D rotary, window
attention and a 2x2 patch merger; mRoPE decoder), so a checkpoint's config.json translates key for
key (mmtrain/models/hf/). Torch-free: the data path and the cost model read the shape helpers at
the bottom.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

VISION_ACTIVATIONS = ("quick_gelu", "gelu", "gelu_tanh", "silu")
VISION_TYPES = ("tiles", "native")
NORMALIZATIONS = ("LayerNorm", "RMSNorm")
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
    # Multimodal RoPE (Qwen2-VL): the head_dim/2 rotary frequencies split into sections, section i
    # rotated by position axis i % 3 (temporal, height, width) of 3 x T position ids. None: 1-D RoPE.
    mrope_section: Optional[list[int]] = None
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
    # tiles: fixed-size tiles (CLIP / SigLIP above). native: any image size (Qwen2-VL): flattened
    # patches [patches, C * temporal_patch_size * patch_size^2] and a (t, h, w) grid per image,
    # 2D rotary positions, no class token or learned positions, and a patch merger (the norm below
    # on each patch, then spatial_merge_size^2 neighbouring patches concatenated into the projector).
    type: str = "tiles"
    normalization: str = "LayerNorm"  # LayerNorm | RMSNorm (Qwen2.5-VL), also the merger's norm
    gated_mlp: bool = False  # SwiGLU MLP (gate/up/down, biased) instead of fc1 -> act -> fc2
    temporal_patch_size: int = 2  # native: frames per patch (a still image is repeated)
    spatial_merge_size: int = 2  # native: m x m patches become one decoder token
    # native: side of an attention window in pixels (Qwen2.5-VL); None = every layer attends to
    # the whole image. Layers listed in fullatt_block_indexes attend to the whole image anyway.
    window_size: Optional[int] = None
    fullatt_block_indexes: Optional[list[int]] = None
    rotary_base: float = 10000.0  # native: base of the 2D rotary embedding


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
    """Image tokens one vision unit contributes to the decoder stream: a tile's tokens after feature
    selection, or 1 for native-resolution models, whose unit is one merged token (see `vit_unit_length`)."""
    if is_native(cfg):
        return 1
    return vit_seq_length(cfg) - int(cfg.vision.feature_select_strategy == "default")


def vit_unit_length(cfg: ModelConfig) -> int:
    """ViT sequence length of one vision unit, the unit packing and balancing count images in
    (a sample's `tiles`): a tile (patches + CLS), or for native-resolution models one merged token,
    m^2 patches (an image of k merged tokens is k units, t*h*w = k*m^2 patches: exact for any grid)."""
    if is_native(cfg):
        return cfg.vision.spatial_merge_size**2
    return vit_seq_length(cfg)


def is_native(cfg: ModelConfig) -> bool:
    """A native-resolution (Qwen2-VL-shaped) vision tower instead of fixed-size tiles."""
    return cfg.vision.type == "native"


def merged_patch_size(cfg: ModelConfig) -> int:
    """Input width of the projector: one ViT hidden state per tile token, or m^2 merged patches."""
    v = cfg.vision
    return v.hidden_size * v.spatial_merge_size**2 if is_native(cfg) else v.hidden_size


def native_patch_dim(cfg: ModelConfig) -> int:
    """Values in one flattened native patch: C x temporal_patch_size x patch_size^2."""
    v = cfg.vision
    return v.in_channels * v.temporal_patch_size * v.patch_size * v.patch_size


def vision_windowed_layers(cfg: ModelConfig) -> tuple[bool, ...]:
    """Per ViT block, whether it attends within windows (native with window_size only)."""
    v = cfg.vision
    if not is_native(cfg) or v.window_size is None:
        return (False,) * v.num_layers
    full = set(v.fullatt_block_indexes or ())
    return tuple(i not in full for i in range(v.num_layers))


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
    if v.type not in VISION_TYPES:
        raise ValueError(f"model.vision.type={v.type!r}: choose one of {', '.join(VISION_TYPES)}")
    if v.normalization not in NORMALIZATIONS:
        raise ValueError(f"model.vision.normalization={v.normalization!r}: choose one of {', '.join(NORMALIZATIONS)}")
    if d.mrope_section is not None and 2 * sum(d.mrope_section) != head_dim(cfg):
        raise ValueError(
            f"model.decoder.mrope_section={list(d.mrope_section)} must sum to head_dim / 2 = {head_dim(cfg) // 2}"
        )
    if is_native(cfg):
        vhd = v.hidden_size // v.num_attention_heads
        if v.hidden_size % v.num_attention_heads or vhd % 4:
            raise ValueError(
                f"model.vision: the 2D rotary needs a head dim divisible by 4 (hidden_size {v.hidden_size} / "
                f"{v.num_attention_heads} heads)"
            )
        if v.spatial_merge_size < 1 or v.temporal_patch_size < 1:
            raise ValueError("model.vision.spatial_merge_size and temporal_patch_size must be >= 1")
        if v.window_size is not None and v.window_size // v.spatial_merge_size // v.patch_size < 1:
            raise ValueError(
                f"model.vision.window_size={v.window_size} px is smaller than one merged patch "
                f"({v.spatial_merge_size} x {v.patch_size} px)"
            )
        bad = [i for i in (v.fullatt_block_indexes or ()) if not 0 <= i < v.num_layers]
        if bad:
            raise ValueError(f"model.vision.fullatt_block_indexes {bad} are outside the {v.num_layers} ViT blocks")
    else:
        if tokens_per_tile(cfg) < 1:
            raise ValueError("model.vision: feature selection leaves no image tokens per tile")
        vision_layers_used(cfg)
    sliding_windows(cfg)
