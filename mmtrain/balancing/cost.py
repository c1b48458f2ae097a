"""Cost of a sample / pack in one unit shared by vision and decoder work.

Balancing needs relative cost only, so the unit is free: FLOPs for the formula defaults, seconds
after `mmtrain calibrate`. A sample of `L` decoder tokens (image + text) whose image is `tiles`
tiles of `tokens_per_tile` ViT tokens costs

    dec_linear * L + dec_quadratic * L**2                       (GEMMs + causal attention, per segment)
  + tiles * (vit_per_tile + vit_attn_per_tile)                  (tiled ViT: each tile attends to itself)

Native-resolution images (one ViT sequence of `n` tokens per image) use the same two ViT
coefficients scaled to `n / tokens_per_tile` tiles, the attention part quadratically.
Packs are varlen: attention never crosses segments, so a pack costs the sum of its samples.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Sequence

import numpy as np

from mmtrain.models.config import tokens_per_tile

__all__ = ["CostModel"]


@dataclass(frozen=True)
class CostModel:
    dec_linear: float = 29e9  # per decoder token
    dec_quadratic: float = 0.5e6  # per (segment length)^2
    vit_per_tile: float = 0.0  # ViT GEMMs + projector per tile (linear in tokens per tile)
    vit_attn_per_tile: float = 0.0  # ViT attention per tile (quadratic in tokens per tile)
    tokens_per_tile: int = 256
    unit: str = "flop"  # "flop" for formula defaults, "s" after calibration

    # ---- constructors ---------------------------------------------------------------------------
    @classmethod
    def default(cls) -> "CostModel":
        """The anchors' decoder-only model: 29e9 * L + 0.5e6 * L^2 (the judged cost)."""
        return cls()

    @classmethod
    def from_model_shape(
        cls,
        *,
        num_layers: int,
        hidden_size: int,
        ffn_hidden_size: int,
        num_attention_heads: int,
        num_query_groups: int | None = None,
        vocab_size: int = 0,
        gated_mlp: bool = True,
        vit_num_layers: int = 0,
        vit_hidden_size: int = 0,
        vit_ffn_hidden_size: int = 0,
        tokens_per_tile: int = 256,
        projector_ffn_hidden_size: int = 0,
        train_lm: bool = True,
        train_vit: bool = True,
        train_projector: bool = True,
    ) -> "CostModel":
        """Training FLOPs per token from the model shape.

        A GEMM with W weights costs 2W per token forward, 2W for the input gradient (needed iff
        anything upstream trains) and 2W for the weight gradient (iff the part trains): frozen
        parts skip weight-grad GEMMs, and a frozen ViT under a frozen projector does no backward.
        Attention: forward 2 matmuls of 2*S^2*h (halved when causal); backward ~2x forward.
        """
        h, layers = hidden_size, num_layers
        kv = num_query_groups or num_attention_heads
        head_dim = h // num_attention_heads
        attn_w = h * (h + 2 * kv * head_dim) + h * h  # QKV + output projection
        mlp_w = (3 if gated_mlp else 2) * h * ffn_hidden_size
        dec_w = layers * (attn_w + mlp_w) + h * vocab_size
        vision_trains = train_vit or train_projector
        dec_passes = 1 + (1 if (train_lm or vision_trains) else 0) + (1 if train_lm else 0)
        dec_attn_passes = 1 + (2 if (train_lm or vision_trains) else 0)
        dec_linear = 2.0 * dec_w * dec_passes
        dec_quadratic = 2.0 * h * layers * dec_attn_passes  # causal: 4*S^2*h / 2 per layer forward

        vit_per_tile = vit_attn = 0.0
        if vit_num_layers and vit_hidden_size:
            hv, t = vit_hidden_size, tokens_per_tile
            vit_w = vit_num_layers * (4 * hv * hv + 2 * hv * (vit_ffn_hidden_size or 4 * hv))
            proj_w = (hv * projector_ffn_hidden_size + projector_ffn_hidden_size * h) if projector_ffn_hidden_size else hv * h
            proj_passes = 1 + (1 if train_vit else 0) + (1 if train_projector else 0)
            vit_passes = 1 + (1 if train_vit else 0) * 2  # upstream of the ViT is pixels: no input grad
            vit_per_tile = 2.0 * t * (vit_w * vit_passes + proj_w * proj_passes)
            vit_attn = 4.0 * t * t * hv * vit_num_layers * (3 if train_vit else 1)  # bidirectional
        return cls(dec_linear, dec_quadratic, vit_per_tile, vit_attn, int(tokens_per_tile), "flop")

    @classmethod
    def from_config(cls, model_cfg) -> "CostModel":
        """From `mmtrain.config.ModelConfig` (duck-typed: any object with the same attributes)."""
        d, v = model_cfg.decoder, model_cfg.vision
        tokens = tokens_per_tile(model_cfg)  # image tokens a tile puts in the decoder stream
        return cls.from_model_shape(
            num_layers=d.num_layers, hidden_size=d.hidden_size, ffn_hidden_size=d.ffn_hidden_size,
            num_attention_heads=d.num_attention_heads, num_query_groups=d.num_query_groups,
            vocab_size=d.vocab_size, vit_num_layers=v.num_layers, vit_hidden_size=v.hidden_size,
            vit_ffn_hidden_size=v.ffn_hidden_size, tokens_per_tile=tokens,
            projector_ffn_hidden_size=model_cfg.projector.ffn_hidden_size,
            train_lm=not model_cfg.freeze_lm, train_vit=not model_cfg.freeze_vit,
            train_projector=not model_cfg.freeze_projector,
        )

    # ---- costs ---------------------------------------------------------------------------------
    def sample_cost(self, length: float, tiles: float = 0, image_tokens: float | None = None) -> float:
        """One sample; pass `image_tokens` per image instead of tiles for native-resolution ViTs."""
        return float(self.sample_costs(np.asarray([length]), np.asarray([tiles]),
                                       None if image_tokens is None else np.asarray([image_tokens]))[0])

    def sample_costs(self, lengths, tiles=None, image_tokens=None) -> np.ndarray:
        """Vectorised `sample_cost` (float64 array)."""
        L = np.asarray(lengths, dtype=np.float64)
        cost = self.dec_linear * L + self.dec_quadratic * L * L
        if image_tokens is not None:  # native resolution: one ViT sequence per image
            n = np.asarray(image_tokens, dtype=np.float64) / self.tokens_per_tile
            cost = cost + self.vit_per_tile * n + self.vit_attn_per_tile * n * n
        elif tiles is not None:
            cost = cost + (self.vit_per_tile + self.vit_attn_per_tile) * np.asarray(tiles, dtype=np.float64)
        return cost

    def vision_costs(self, tiles) -> np.ndarray:
        """ViT part only (what the first pipeline stage / the ViT ranks carry)."""
        return (self.vit_per_tile + self.vit_attn_per_tile) * np.asarray(tiles, dtype=np.float64)

    def pack_cost(self, lengths: Sequence[float], tiles: Sequence[float] | None = None) -> float:
        """A varlen pack: the sum of its segments (no cross-segment attention)."""
        return float(self.sample_costs(lengths, tiles).sum())

    def pack_costs(self, packs: Sequence[Sequence[int]], lengths, tiles=None) -> np.ndarray:
        """Cost of each pack given sample indices per pack and per-sample arrays."""
        per_sample = self.sample_costs(lengths, tiles)
        return np.array([per_sample[np.asarray(p, dtype=np.int64)].sum() for p in packs], dtype=np.float64)

    def vision_fraction(self, lengths, tiles) -> float:
        """Share of total cost spent in the ViT: the weight of tile balance against total cost."""
        total = self.sample_costs(lengths, tiles).sum()
        return float(self.vision_costs(tiles).sum() / total) if total > 0 else 0.0

    # ---- persistence ---------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "CostModel":
        d = dict(d.get("cost_model", d))
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown cost-model keys: {sorted(unknown)}")
        return cls(**d)

    def save(self, path: str | Path) -> None:
        """JSON for *.json, YAML otherwise."""
        path = Path(path)
        payload = {"cost_model": self.to_dict()}
        if path.suffix == ".json":
            path.write_text(json.dumps(payload, indent=2) + "\n")
        else:
            import yaml

            path.write_text(yaml.safe_dump(payload, sort_keys=False))

    @classmethod
    def load(cls, path: str | Path) -> "CostModel":
        path = Path(path)
        text = path.read_text()
        if path.suffix == ".json":
            return cls.from_dict(json.loads(text))
        import yaml

        return cls.from_dict(yaml.safe_load(text))
