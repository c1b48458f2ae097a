"""The VLM: ViT over fixed-size tiles (mmtrain/models/vision.py) -> MLP projector -> GPT decoder,
from megatron-core parts; architecturally transformers' LLaVA (CLIP / SigLIP + Llama / Mistral / Qwen2).

Why a composition instead of megatron-core's LLaVAModel: LLaVAModel expands image tokens itself from
padded [b, s] batches, builds its CLIP ViT with `.cuda()` and a LayerNorm that rejects `config=` on
CPU, and interleaves image embeddings by searching token ids per sample. Our data module already
produces the packed stream (image tokens expanded, cu_seqlens counting them), so the model only has
to scatter projected tile embeddings into known positions. Everything parallel (TP linears, PP
stages, rope on thd, vocab-parallel cross entropy) is megatron-core's own: GPTModel and
TransformerBlock with the local layer spec, with our varlen core attention plugged in.

Native resolution (Qwen2-VL / Qwen2.5-VL, `model.vision.type=native`): the ViT is
mmtrain/models/qwen_vision.py over all patches of the micro-batch, the projector is the patch
merger's MLP over m^2 concatenated patches, and with `model.decoder.mrope_section` the decoder
rotates by per-token mRoPE angles from 3 x T position ids (mmtrain/models/mrope.py) instead of
megatron's 1-D RoPE.

Weights are not initialised here (megatron's `perform_initialization` is off): mmtrain/models/params.py
draws every full tensor from a generator keyed by its layout-independent name, or
mmtrain/models/hf/ loads a checkpoint, so one seed gives one model at every TP/PP.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.models.gpt.gpt_model import GPTModel
from megatron.core.models.vision.multimodal_projector import MultimodalProjector
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.mlp import MLPSubmodules
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig

from mmtrain.config import ModelConfig
from mmtrain.models import rope
from mmtrain.models.attention.core import VarlenCoreAttention
from mmtrain.models.config import (
    head_dim,
    is_native,
    merged_patch_size,
    padded_vocab_size,
    sliding_windows,
    tokens_per_tile,
    validate,
)
from mmtrain.models.mrope import mrope_angles, rotary_cos_sin
from mmtrain.models.qwen_vision import NativeVisionEncoder
from mmtrain.models.vision import VisionEncoder

__all__ = ["VLM", "ParallelShape", "Runtime", "tokens_per_tile", "decoder_config", "vision_config", "projector_config"]


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """CLIP's activation, x * sigmoid(1.702 x) (plain torch: no jit fuser on CPU)."""
    return x * torch.sigmoid(1.702 * x)


ACTIVATIONS = {
    "quick_gelu": quick_gelu,
    "gelu": F.gelu,
    "gelu_tanh": functools.partial(F.gelu, approximate="tanh"),
    "silu": F.silu,
    "relu": F.relu,
}


_COMPILED_ACTIVATIONS: dict[str, object] = {}


def activation(name: str, fused: bool):
    """The activation `name`; fused: the same formula as one generated kernel (torch.compile, any
    token count), e.g. QuickGELU's three elementwise passes become one."""
    fn = ACTIVATIONS[name]
    if not fused:
        return fn
    if name not in _COMPILED_ACTIVATIONS:
        _COMPILED_ACTIVATIONS[name] = torch.compile(fn, dynamic=True, fullgraph=True)
    return _COMPILED_ACTIVATIONS[name]


@dataclass(frozen=True)
class ParallelShape:
    tp: int = 1
    pp: int = 1


@dataclass(frozen=True)
class Runtime:
    """How the model runs (not what it computes): the perf.* settings that reach the model."""

    rope: str = "packed"  # packed: per-token tables, no host syncs | megatron: megatron-core's thd path
    fuse: bool = False  # fused bias-activation kernels (SwiGLU, GELU, QuickGELU) and rope
    recompute_granularity: Optional[str] = None  # None | selective | full (decoder only)
    recompute_modules: tuple = ("core_attn",)
    recompute_num_layers: int = 1
    static_tokens: Optional[int] = None  # every micro-batch holds exactly this many tokens
    batch_p2p_sync: bool = True  # a device sync after each batched PP send/recv (old NCCL bug)
    # Every trainable parameter gets a gradient in every micro-batch, images or not (megatron's
    # overlapped grad reduce waits for each parameter of a bucket before reducing it).
    grads_every_micro_batch: bool = False


def _common(par: ParallelShape, dtype: torch.dtype, use_cpu_init: bool, rt: Optional[Runtime] = None) -> dict:
    rt = rt or Runtime()
    return dict(
        tensor_model_parallel_size=par.tp,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        params_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        pipeline_dtype=dtype,
        use_cpu_initialization=use_cpu_init,
        perform_initialization=False,  # mmtrain.models.params initialises (layout-invariant) or a checkpoint loads
        bias_activation_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        bias_dropout_fusion=False,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        # Packed sequences change length every micro-batch: PP must exchange shapes first (unless
        # every micro-batch is padded to the same token count).
        variable_seq_lengths=rt.static_tokens is None,
        batch_p2p_sync=rt.batch_p2p_sync,
        moe_token_dispatcher_type="alltoall",  # dense model; avoids the allgather/variable-length check
        calculate_per_token_loss=True,  # global per-token mean: grads summed, divided by global tokens
    )


def _recompute(rt: Optional[Runtime]) -> dict:
    if rt is None or rt.recompute_granularity is None:
        return {}
    if rt.recompute_granularity == "selective":
        return dict(recompute_granularity="selective", recompute_modules=list(rt.recompute_modules))
    return dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=rt.recompute_num_layers)


def decoder_config(
    cfg: ModelConfig, par: ParallelShape, dtype: torch.dtype, use_cpu_init: bool, rt: Optional[Runtime] = None
) -> TransformerConfig:
    d = cfg.decoder
    common = _common(par, dtype, use_cpu_init, rt)
    # megatron's fused SwiGLU keeps only the fc1 output for backward (a torch.compile'd kernel)
    common["bias_activation_fusion"] = bool(rt and rt.fuse)
    return TransformerConfig(
        num_layers=d.num_layers,
        hidden_size=d.hidden_size,
        num_attention_heads=d.num_attention_heads,
        num_query_groups=d.num_query_groups,
        ffn_hidden_size=d.ffn_hidden_size,
        kv_channels=head_dim(cfg),
        normalization="RMSNorm",
        layernorm_epsilon=d.norm_epsilon,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=d.qkv_bias,
        init_method_std=d.init_method_std,
        pipeline_model_parallel_size=par.pp,
        **_recompute(rt),
        **common,
    )


def vision_config(
    cfg: ModelConfig, par: ParallelShape, dtype: torch.dtype, use_cpu_init: bool, rt: Optional[Runtime] = None
) -> TransformerConfig:
    v = cfg.vision
    return TransformerConfig(
        num_layers=v.num_layers,
        hidden_size=v.hidden_size,
        num_attention_heads=v.num_attention_heads,
        num_query_groups=v.num_attention_heads,
        ffn_hidden_size=v.ffn_hidden_size,
        kv_channels=v.hidden_size // v.num_attention_heads,
        normalization=v.normalization,
        layernorm_epsilon=v.norm_epsilon,
        gated_linear_unit=v.gated_mlp,
        activation_func=activation(v.activation, bool(rt and rt.fuse)),
        add_bias_linear=True,
        pipeline_model_parallel_size=1,  # the ViT lives whole on the first pipeline stage
        **_common(par, dtype, use_cpu_init, rt),
    )


def projector_config(
    cfg: ModelConfig, par: ParallelShape, dtype: torch.dtype, use_cpu_init: bool, rt: Optional[Runtime] = None
) -> TransformerConfig:
    return TransformerConfig(
        num_layers=1,
        hidden_size=cfg.decoder.hidden_size,
        num_attention_heads=cfg.decoder.num_attention_heads,  # unused by the MLP; must divide by TP
        ffn_hidden_size=cfg.projector.ffn_hidden_size,
        gated_linear_unit=False,
        activation_func=activation(cfg.projector.activation, bool(rt and rt.fuse)),
        add_bias_linear=cfg.projector.bias,
        pipeline_model_parallel_size=1,
        **_common(par, dtype, use_cpu_init, rt),
    )


def _layer_spec(normalization: str, mask: AttnMaskType, backend: str, windows: Optional[tuple] = None, core=VarlenCoreAttention):
    spec = get_gpt_layer_local_spec(normalization=normalization)
    spec.submodules.self_attention.params = {"attn_mask_type": mask}
    spec.submodules.self_attention.submodules.core_attention = functools.partial(
        core, backend=backend, sliding_windows=windows
    )
    return spec


class VLM(MegatronModule):
    """One pipeline stage of the VLM. The first stage owns the ViT, projector and embeddings."""

    def __init__(
        self,
        cfg: ModelConfig,
        par: ParallelShape,
        dtype: torch.dtype,
        use_cpu_init: bool,
        backend: str,
        runtime: Optional[Runtime] = None,
    ) -> None:
        validate(cfg)
        rt = runtime or Runtime()
        if rt.rope not in ("packed", "megatron"):
            raise ValueError(f"perf.rope={rt.rope!r}: choose packed or megatron")
        dcfg = decoder_config(cfg, par, dtype, use_cpu_init, rt)
        super().__init__(config=dcfg)
        self.runtime = rt
        self.pre_process = parallel_state.is_pipeline_first_stage()
        self.post_process = parallel_state.is_pipeline_last_stage()
        self.model_type = None
        # finalize_model_grads asks the top module whether the LM head reuses the embedding (then it
        # all-reduces that weight's gradient between the first and last pipeline stages).
        self.share_embeddings_and_output_weights = cfg.decoder.tie_word_embeddings
        self.vocab_size = cfg.decoder.vocab_size
        self.padded_vocab_size = padded_vocab_size(cfg, par.tp)
        self.native = is_native(cfg)
        self.gated_vision_mlp = cfg.vision.gated_mlp  # mmtrain.models.params: how its fc1 shards
        self.mrope_section = list(cfg.decoder.mrope_section) if cfg.decoder.mrope_section else None
        self.vision: Optional[VisionEncoder | NativeVisionEncoder] = None
        self.projector: Optional[MultimodalProjector] = None
        if self.pre_process:
            vcfg = vision_config(cfg, par, dtype, use_cpu_init, rt)
            if self.native:
                self.vision = NativeVisionEncoder(cfg, vcfg, _layer_spec(cfg.vision.normalization, AttnMaskType.no_mask, backend))
            else:
                self.vision = VisionEncoder(cfg, vcfg, _layer_spec("LayerNorm", AttnMaskType.no_mask, backend))
            self.projector = MultimodalProjector(
                projector_config(cfg, par, dtype, use_cpu_init, rt),
                MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear),
                projector_type="mlp",
                input_size=merged_patch_size(cfg),
            )
        # rope=packed (and mRoPE always): megatron applies no rope; the attention core rotates q and
        # k with the tables this module builds once per micro-batch from the per-token position ids.
        self.rope_theta = float(cfg.decoder.rotary_base)
        self.rope_dim = head_dim(cfg)
        self._inv_freq: Optional[torch.Tensor] = None
        core = VarlenCoreAttention
        self.language_model = GPTModel(
            config=dcfg,
            transformer_layer_spec=_layer_spec("RMSNorm", AttnMaskType.causal, backend, sliding_windows(cfg), core=core),
            vocab_size=self.padded_vocab_size,
            max_sequence_length=1 << 20,
            pre_process=self.pre_process,
            post_process=self.post_process,
            position_embedding_type="rope" if rt.rope == "megatron" and not self.mrope_section else "none",
            rotary_base=self.rope_theta,
            share_embeddings_and_output_weights=cfg.decoder.tie_word_embeddings,
            parallel_output=True,
        )
        if cfg.freeze_lm:
            self.language_model.requires_grad_(False)
        if cfg.freeze_vit and self.vision is not None:
            self.vision.requires_grad_(False)
        if cfg.freeze_projector and self.projector is not None:
            self.projector.requires_grad_(False)
        if self.native and self.vision is not None:  # the patch merger's norm belongs with its MLP
            self.vision.ln_post.requires_grad_(not cfg.freeze_projector)

    def prepare(self, device: torch.device, dtype: torch.dtype) -> dict[str, str]:
        """Pick every attention core's backend now, on this device and dtype (the pick runs a test
        call, which must not happen inside a compiled region or the first timed step); returns
        {"decoder": name, "vision": name}."""
        picked = {}
        for name, mod in self.named_modules():
            if isinstance(mod, VarlenCoreAttention):
                picked["vision" if name.startswith("vision.") else "decoder"] = mod.resolve_backend(device, dtype)
        return picked

    def compile_layers(self) -> None:
        """torch.compile every transformer layer: the decoder's at a static token count (every
        micro-batch padded to the same length, cu_seqlens to a fixed number of segments), the ViT's
        with a symbolic token count (tiles vary). Layers of one stack share one compiled graph."""
        import warnings

        torch._dynamo.config.reorderable_logging_functions.add(warnings.warn)  # megatron warns inside forward
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
        for layer in self.language_model.decoder.layers:
            layer.compile(dynamic=False)
        if self.vision is not None:
            for layer in self.vision.blocks.layers:
                layer.compile(dynamic=True)

    def _image_path_trains(self) -> bool:
        return any(p.requires_grad for m in (self.vision, self.projector) if m is not None for p in m.parameters())

    def _freqs(self, device: torch.device) -> torch.Tensor:
        if self._inv_freq is None or self._inv_freq.device != device:
            self._inv_freq = rope.inv_freq(self.rope_dim, self.rope_theta, device=device)
        return self._inv_freq

    def rope_tables(self, position_ids: torch.Tensor) -> rope.RotaryTables:
        """cos/sin of every token of the micro-batch, from its per-sample position ids (one small
        outer product and two elementwise kernels per micro-batch, no host sync)."""
        freqs = rope.freqs_from_positions(position_ids, self._freqs(position_ids.device))
        return rope.RotaryTables.from_freqs(freqs, self.config.params_dtype)

    def set_input_tensor(self, input_tensor) -> None:
        self.language_model.set_input_tensor(input_tensor)

    def shared_embedding_or_output_weight(self) -> torch.Tensor:
        return self.language_model.shared_embedding_or_output_weight()

    def _mask_padded_vocab(self, logits: torch.Tensor) -> torch.Tensor:
        """-inf on the vocab rows TP padding added, so they take no probability mass."""
        if self.padded_vocab_size == self.vocab_size:
            return logits
        local = logits.shape[-1]
        start = parallel_state.get_tensor_model_parallel_rank() * local
        if start + local <= self.vocab_size:
            return logits
        pad = torch.arange(start, start + local, device=logits.device) >= self.vocab_size
        return logits.masked_fill(pad, float("-inf"))

    def _output(self, *, hidden_states, output_layer, output_weight, labels, compute_language_model_loss, **_):
        """GPTModel's output hook: LM head, padded vocab rows masked, then the per-token loss."""
        logits, _ = output_layer(hidden_states, weight=output_weight, runtime_gather_output=False)  # [s, b, V/TP]
        logits = self._mask_padded_vocab(logits)
        if labels is None:
            return logits.transpose(0, 1).contiguous()
        return compute_language_model_loss(labels, logits)

    def forward(
        self,
        tokens: torch.Tensor,  # [T]
        position_ids: torch.Tensor,  # [T]
        packed_seq_params: PackedSeqParams,
        images: Optional[torch.Tensor] = None,  # [tiles, C, H, W]; native: [patches, C*T*p*p]
        image_token_index: Optional[torch.Tensor] = None,  # [image tokens] their positions in T
        labels: Optional[torch.Tensor] = None,  # [T]
        image_grid_thw: Optional[torch.Tensor] = None,  # native: int [images, 3], on the host
        mrope_position_ids: Optional[torch.Tensor] = None,  # mRoPE: int [3, T], every stage
    ) -> torch.Tensor:
        """Per-token loss [1, T] when labels are given (last stage), logits [1, T, V_padded/TP]
        otherwise (padded vocab rows at -inf); hidden states on earlier stages."""
        decoder_input = None
        if self.mrope_section:
            if mrope_position_ids is None:
                raise ValueError("model.decoder.mrope_section is set: the micro-batch must carry mrope_position_ids [3, T]")
            angles = mrope_angles(mrope_position_ids, self._freqs(tokens.device), self.mrope_section)
            tables = rope.RotaryTables(*rotary_cos_sin(angles, self.config.params_dtype))
            packed_seq_params = rope.with_rope(packed_seq_params, tables, fused=self.runtime.fuse)
        elif self.runtime.rope == "packed":
            packed_seq_params = rope.with_rope(packed_seq_params, self.rope_tables(position_ids), fused=self.runtime.fuse)
        if self.pre_process:
            emb = self.language_model.embedding(input_ids=tokens[None], position_ids=position_ids[None])  # [T,1,h]
            if images is not None and images.shape[0] > 0:
                if self.native and (images.dim() != 2 or image_grid_thw is None):
                    raise ValueError(
                        "model.vision.type=native takes flattened patches [patches, C*T*p*p] and image_grid_thw "
                        f"[images, 3] (the Qwen2-VL image processor's pixel_values / image_grid_thw), got images {tuple(images.shape)}"
                        + ("" if image_grid_thw is not None else " and no image_grid_thw")
                    )
                feats = self.vision(images, image_grid_thw) if self.native else self.vision(images)
                vis = self.projector(feats)  # [image tokens, h]
                emb = emb.index_put((image_token_index, torch.zeros_like(image_token_index)), vis.to(emb.dtype))
            elif self.runtime.grads_every_micro_batch and torch.is_grad_enabled() and self._image_path_trains():
                # No tile here: one black tile through the ViT and projector, added as 0 x its
                # features, gives their parameters the (zero) gradients the overlapped reduce waits for.
                blank = self.vision.blank_image(emb.device) if self.native else (self.vision.blank_tiles(1, emb.device),)
                vis = self.projector(self.vision(*blank))
                emb = emb + 0.0 * vis.sum().to(emb.dtype)
            decoder_input = emb
        return self.language_model(
            input_ids=tokens[None],
            position_ids=position_ids[None],
            attention_mask=None,
            decoder_input=decoder_input,
            labels=None if labels is None else labels[None],
            packed_seq_params=packed_seq_params,
            output_processor=self._output,
        )
