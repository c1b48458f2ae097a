"""The ViT over fixed-size tiles, CLIP- or SigLIP-shaped, with megatron-core blocks.

Embeddings as transformers' CLIP/SigLIP vision towers compute them: patch conv (+bias for SigLIP),
a CLS token inside the sequence when `class_token` (its position included), learned positions,
CLIP's pre-LN. Then only the blocks needed for `feature_layer` run (LLaVA-1.5 takes the hidden
state before the last block), `post_layernorm` applies the final LN to the features only when asked
(LLaVA never does), and `feature_select_strategy=default` drops the first token. Weights that a
checkpoint carries but this configuration does not use (later blocks, the final LN) stay in the
module, frozen, so that export writes them back unchanged.

All tiles of a micro-batch run as one thd sequence, one segment per tile (bidirectional within a
tile, nothing across tiles): [num_tiles * tokens, hidden].
"""

from __future__ import annotations

import torch
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_block import TransformerBlock
from megatron.core.transformer.transformer_config import TransformerConfig

from mmtrain.models.config import ModelConfig, patches_per_tile, vision_layers_used, vit_seq_length


class VisionEncoder(MegatronModule):
    def __init__(self, cfg: ModelConfig, tcfg: TransformerConfig, layer_spec) -> None:
        super().__init__(config=tcfg)
        v = cfg.vision
        self.patches = patches_per_tile(cfg)
        self.seq = vit_seq_length(cfg)
        self.drop_first = v.feature_select_strategy == "default"
        self.apply_post_layernorm = v.post_layernorm
        self.layers_used = vision_layers_used(cfg)
        h = v.hidden_size
        self.conv = torch.nn.Conv2d(v.in_channels, h, kernel_size=v.patch_size, stride=v.patch_size, bias=v.patch_bias)
        self.class_embedding = torch.nn.Parameter(torch.empty(h)) if v.class_token else None
        self.position_embedding = torch.nn.Parameter(torch.empty(self.seq, h))
        self.ln_pre = torch.nn.LayerNorm(h, eps=v.norm_epsilon) if v.pre_layernorm else None
        self.blocks = TransformerBlock(config=tcfg, spec=layer_spec, post_layer_norm=False)
        self.ln_post = torch.nn.LayerNorm(h, eps=v.norm_epsilon)
        for layer in self.blocks.layers[self.layers_used :]:
            layer.requires_grad_(False)
        if not self.apply_post_layernorm:
            self.ln_post.requires_grad_(False)

    def blank_tiles(self, n: int, device: torch.device) -> torch.Tensor:
        """n black tiles [n, C, H, W] in the weights' dtype."""
        c, k = self.conv.in_channels, self.conv.kernel_size[0]
        side = int(self.patches**0.5) * k
        return torch.zeros(n, c, side, side, device=device, dtype=self.conv.weight.dtype)

    def embed(self, pixels: torch.Tensor) -> torch.Tensor:
        """[n, C, H, W] -> [n, seq, hidden]: what the first block sees (transformers' hidden_states[0])."""
        n = pixels.shape[0]
        x = self.conv(pixels.to(self.conv.weight.dtype)).flatten(2).transpose(1, 2)  # [n, patches, h]
        if self.class_embedding is not None:
            x = torch.cat([self.class_embedding.expand(n, 1, -1), x], dim=1)
        x = x + self.position_embedding
        return self.ln_pre(x) if self.ln_pre is not None else x

    def hidden_states(self, pixels: torch.Tensor, layers: int) -> torch.Tensor:
        """Output of the first `layers` blocks, [n, seq, hidden]."""
        x = self.embed(pixels)
        n, seq = x.shape[0], x.shape[1]
        cu = torch.arange(0, (n + 1) * seq, seq, dtype=torch.int32, device=x.device)
        psp = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=seq, max_seqlen_kv=seq)
        y = x.reshape(n * seq, 1, -1)
        for layer in self.blocks.layers[:layers]:
            y, _ = layer(hidden_states=y, attention_mask=None, packed_seq_params=psp)
        return y.reshape(n, seq, -1)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        y = self.hidden_states(pixels, self.layers_used)
        if self.apply_post_layernorm:
            y = self.ln_post(y)
        if self.drop_first:
            y = y[:, 1:]
        return y.reshape(-1, y.shape[-1])


