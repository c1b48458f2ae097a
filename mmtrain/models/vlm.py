"""The VLM: CLIP-style ViT over fixed-size tiles -> MLP projector -> GPT decoder, from megatron-core parts.

Why a composition instead of megatron-core's LLaVAModel: LLaVAModel expands image tokens itself from
padded [b, s] batches, builds its CLIP ViT with `.cuda()` and a LayerNorm that rejects `config=` on
CPU, and interleaves image embeddings by searching token ids per sample. Our data module already
produces the packed stream (image tokens expanded, cu_seqlens counting them), so the model only has
to scatter projected tile embeddings into known positions. Everything parallel (TP linears, PP
stages, rope on thd, vocab-parallel cross entropy) is megatron-core's own: GPTModel and
TransformerBlock with the local layer spec, with our varlen core attention plugged in.
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
from megatron.core.transformer.transformer_block import TransformerBlock
from megatron.core.transformer.transformer_config import TransformerConfig

from mmtrain.config import ModelConfig
from mmtrain.models.attention.core import VarlenCoreAttention


@dataclass(frozen=True)
class ParallelShape:
    tp: int = 1
    pp: int = 1


def tokens_per_tile(cfg: ModelConfig) -> int:
    side = cfg.vision.image_size // cfg.vision.patch_size
    if side * cfg.vision.patch_size != cfg.vision.image_size:
        raise ValueError(
            f"model.vision.image_size={cfg.vision.image_size} is not a multiple of patch_size={cfg.vision.patch_size}"
        )
    return side * side


def _common(par: ParallelShape, dtype: torch.dtype, use_cpu_init: bool) -> dict:
    return dict(
        tensor_model_parallel_size=par.tp,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        params_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        pipeline_dtype=dtype,
        use_cpu_initialization=use_cpu_init,
        perform_initialization=True,
        bias_activation_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        bias_dropout_fusion=False,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        # Packed sequences change length every micro-batch: PP must exchange shapes first.
        variable_seq_lengths=True,
        moe_token_dispatcher_type="alltoall",  # dense model; avoids the allgather/variable-length check
        calculate_per_token_loss=True,  # global per-token mean: grads summed, divided by global tokens
    )


def decoder_config(cfg: ModelConfig, par: ParallelShape, dtype: torch.dtype, use_cpu_init: bool) -> TransformerConfig:
    d = cfg.decoder
    return TransformerConfig(
        num_layers=d.num_layers,
        hidden_size=d.hidden_size,
        num_attention_heads=d.num_attention_heads,
        num_query_groups=d.num_query_groups,
        ffn_hidden_size=d.ffn_hidden_size,
        kv_channels=d.hidden_size // d.num_attention_heads,
        normalization="RMSNorm",
        layernorm_epsilon=d.norm_epsilon,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=False,
        init_method_std=d.init_method_std,
        pipeline_model_parallel_size=par.pp,
        **_common(par, dtype, use_cpu_init),
    )


def vision_config(cfg: ModelConfig, par: ParallelShape, dtype: torch.dtype, use_cpu_init: bool) -> TransformerConfig:
    v = cfg.vision
    return TransformerConfig(
        num_layers=v.num_layers,
        hidden_size=v.hidden_size,
        num_attention_heads=v.num_attention_heads,
        ffn_hidden_size=v.ffn_hidden_size,
        kv_channels=v.hidden_size // v.num_attention_heads,
        normalization="LayerNorm",
        layernorm_epsilon=v.norm_epsilon,
        gated_linear_unit=False,
        activation_func=F.gelu,
        add_bias_linear=True,
        pipeline_model_parallel_size=1,  # the ViT lives whole on the first pipeline stage
        **_common(par, dtype, use_cpu_init),
    )


def projector_config(cfg: ModelConfig, par: ParallelShape, dtype: torch.dtype, use_cpu_init: bool) -> TransformerConfig:
    return TransformerConfig(
        num_layers=1,
        hidden_size=cfg.decoder.hidden_size,
        num_attention_heads=cfg.decoder.num_attention_heads,  # unused by the MLP; must divide by TP
        ffn_hidden_size=cfg.projector.ffn_hidden_size,
        gated_linear_unit=False,
        activation_func=F.gelu,
        add_bias_linear=True,
        pipeline_model_parallel_size=1,
        **_common(par, dtype, use_cpu_init),
    )


def _layer_spec(normalization: str, mask: AttnMaskType, backend: str):
    spec = get_gpt_layer_local_spec(normalization=normalization)
    spec.submodules.self_attention.params = {"attn_mask_type": mask}
    spec.submodules.self_attention.submodules.core_attention = functools.partial(VarlenCoreAttention, backend=backend)
    return spec


class VisionEncoder(MegatronModule):
    """CLIP-style ViT: patch conv -> (+class token) + learned positions -> pre-LN -> blocks -> post-LN.

    All tiles of a micro-batch run as one thd sequence, one segment per tile (bidirectional within a
    tile, nothing across tiles): [num_tiles * tokens, hidden].
    """

    def __init__(self, cfg: ModelConfig, tcfg: TransformerConfig, backend: str) -> None:
        super().__init__(config=tcfg)
        v = cfg.vision
        self.patch_size = v.patch_size
        self.class_token = v.class_token
        self.tokens = tokens_per_tile(cfg)
        seq = self.tokens + (1 if v.class_token else 0)
        self.conv = torch.nn.Conv2d(v.in_channels, v.hidden_size, kernel_size=v.patch_size, stride=v.patch_size, bias=False)
        self.cls = torch.nn.Parameter(torch.randn(1, v.hidden_size) * 0.02) if v.class_token else None
        self.pos = torch.nn.Parameter(torch.randn(seq, v.hidden_size) * 0.02)
        self.ln_pre = torch.nn.LayerNorm(v.hidden_size, eps=v.norm_epsilon)
        self.blocks = TransformerBlock(
            config=tcfg, spec=_layer_spec("LayerNorm", AttnMaskType.no_mask, backend), post_layer_norm=True
        )

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        n = pixels.shape[0]
        x = self.conv(pixels.to(self.conv.weight.dtype)).flatten(2).transpose(1, 2)  # [n, tokens, h]
        if self.cls is not None:
            x = torch.cat([self.cls.expand(n, 1, -1), x], dim=1)
        x = self.ln_pre(x + self.pos)
        seq = x.shape[1]
        cu = torch.arange(0, (n + 1) * seq, seq, dtype=torch.int32, device=x.device)
        psp = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=seq, max_seqlen_kv=seq)
        y = self.blocks(x.reshape(n * seq, 1, -1), attention_mask=None, packed_seq_params=psp)  # [n*seq, 1, h]
        y = y.reshape(n, seq, -1)
        if self.cls is not None:
            y = y[:, 1:]
        return y.reshape(n * self.tokens, -1)


class VLM(MegatronModule):
    """One pipeline stage of the VLM. The first stage owns the ViT, projector and embeddings."""

    def __init__(self, cfg: ModelConfig, par: ParallelShape, dtype: torch.dtype, use_cpu_init: bool, backend: str) -> None:
        dcfg = decoder_config(cfg, par, dtype, use_cpu_init)
        super().__init__(config=dcfg)
        self.pre_process = parallel_state.is_pipeline_first_stage()
        self.post_process = parallel_state.is_pipeline_last_stage()
        self.model_type = None
        # finalize_model_grads asks every stage's top module about tied embeddings; ours are untied.
        self.share_embeddings_and_output_weights = False
        self.vision: Optional[VisionEncoder] = None
        self.projector: Optional[MultimodalProjector] = None
        if self.pre_process:
            self.vision = VisionEncoder(cfg, vision_config(cfg, par, dtype, use_cpu_init), backend)
            self.projector = MultimodalProjector(
                projector_config(cfg, par, dtype, use_cpu_init),
                MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear),
                projector_type="mlp",
                input_size=cfg.vision.hidden_size,
            )
        self.language_model = GPTModel(
            config=dcfg,
            transformer_layer_spec=_layer_spec("RMSNorm", AttnMaskType.causal, backend),
            vocab_size=cfg.decoder.vocab_size,
            max_sequence_length=1 << 20,
            pre_process=self.pre_process,
            post_process=self.post_process,
            position_embedding_type="rope",
            rotary_base=int(cfg.decoder.rotary_base),
            share_embeddings_and_output_weights=False,
            parallel_output=True,
        )
        if cfg.freeze_lm:
            self.language_model.requires_grad_(False)
        if cfg.freeze_vit and self.vision is not None:
            self.vision.requires_grad_(False)
        if cfg.freeze_projector and self.projector is not None:
            self.projector.requires_grad_(False)

    def set_input_tensor(self, input_tensor) -> None:
        self.language_model.set_input_tensor(input_tensor)

    def forward(
        self,
        tokens: torch.Tensor,  # [T]
        position_ids: torch.Tensor,  # [T]
        packed_seq_params: PackedSeqParams,
        images: Optional[torch.Tensor] = None,  # [tiles, C, H, W]
        image_token_index: Optional[torch.Tensor] = None,  # [tiles * tokens_per_tile] positions in T
        labels: Optional[torch.Tensor] = None,  # [T]
    ) -> torch.Tensor:
        """Per-token loss [1, T] when labels are given (last stage), logits [1, T, V/TP] otherwise."""
        decoder_input = None
        if self.pre_process:
            emb = self.language_model.embedding(input_ids=tokens[None], position_ids=position_ids[None])  # [T,1,h]
            if images is not None and images.shape[0] > 0:
                vis = self.projector(self.vision(images))  # [tiles*P, h]
                emb = emb.index_put((image_token_index, torch.zeros_like(image_token_index)), vis.to(emb.dtype))
            decoder_input = emb
        return self.language_model(
            input_ids=tokens[None],
            position_ids=position_ids[None],
            attention_mask=None,
            decoder_input=decoder_input,
            labels=None if labels is None else labels[None],
            packed_seq_params=packed_seq_params,
        )
