"""Useful FLOPs of a step, for MFU: only work on real tokens counts (padding is waste, not work).

Per decoder segment of L tokens (layers l, hidden h, FFN f, query heads a, kv groups g, head dim d,
vocab V):
  forward  = 2 L (l (h*(a+2g)*d + a*d*h + 3 h f) + h V)   [QKV, out-proj, SwiGLU, LM head GEMMs]
           + l * 2 * 2 * (L^2 / 2) * a * d                [causal QK^T and PV]
  backward = activation grads (same GEMM FLOPs, always needed when anything upstream trains)
           + weight grads (same GEMM FLOPs again, only if the decoder trains)
           + 2x the attention forward.
ViT per tile of P tokens (bidirectional, GELU MLP): forward 2 P (l_v (4 h_v^2 + 2 h_v f_v)) + l_v 4 P^2 h_v;
backward only if the ViT trains. Projector: 2 P (h_v f_p + f_p h) per tile, x3 if trained.
"""

from __future__ import annotations

from typing import Iterable

from mmtrain.config import ModelConfig


def decoder_flops(cfg: ModelConfig, segment_lengths: Iterable[int], upstream_trains: bool) -> float:
    d = cfg.decoder
    hd = d.hidden_size // d.num_attention_heads
    per_tok = d.num_layers * (
        d.hidden_size * (d.num_attention_heads + 2 * d.num_query_groups) * hd
        + d.num_attention_heads * hd * d.hidden_size
        + 3 * d.hidden_size * d.ffn_hidden_size
    ) + d.hidden_size * d.vocab_size
    gemm_mult = 1 + (1 if (upstream_trains or not cfg.freeze_lm) else 0) + (0 if cfg.freeze_lm else 1)
    attn_mult = 1 + (2 if (upstream_trains or not cfg.freeze_lm) else 0)
    total = 0.0
    for L in segment_lengths:
        total += gemm_mult * 2.0 * L * per_tok
        total += attn_mult * d.num_layers * 2.0 * L * L * d.num_attention_heads * hd
    return total


def vision_flops(cfg: ModelConfig, tiles: int, tokens_per_tile: int) -> float:
    v, p = cfg.vision, tokens_per_tile
    fwd = 2.0 * p * v.num_layers * (4 * v.hidden_size**2 + 2 * v.hidden_size * v.ffn_hidden_size)
    fwd += v.num_layers * 4.0 * p * p * v.hidden_size
    fwd += 2.0 * p * v.in_channels * v.patch_size**2 * v.hidden_size
    vit = fwd * (1 if cfg.freeze_vit else 3)
    proj = 2.0 * p * (v.hidden_size * cfg.projector.ffn_hidden_size + cfg.projector.ffn_hidden_size * cfg.decoder.hidden_size)
    proj *= 1 if cfg.freeze_projector else 3
    return tiles * (vit + proj)


def step_flops(cfg: ModelConfig, sample_lengths: Iterable[int], total_tiles: int, tokens_per_tile: int) -> float:
    upstream = not (cfg.freeze_vit and cfg.freeze_projector)
    return decoder_flops(cfg, sample_lengths, upstream) + vision_flops(cfg, total_tiles, tokens_per_tile)
