"""The cost of a sample or pack: one formula for the balancer and for MFU's useful FLOPs.

A sample is a decoder segment of `L` tokens (image + text, after expansion) plus the images its
vision encoder runs, each a ViT sequence of `n_i` tokens (a fixed-size tile: patches + CLS; a
native-resolution image: its own t*h*w patches). Its work has four terms:

    decoder_token     * L           GEMMs of every decoder layer and the LM head
    decoder_attention * L**2        causal attention inside the segment
    vision_token      * sum(n_i)    ViT GEMMs, patch embedding, projector
    vision_attention  * sum(n_i**2) bidirectional attention inside each image

Packs are varlen (attention never crosses segments or images), so a pack costs the sum of its
samples. `CostModel.from_config` sets the four coefficients to the model's training FLOPs (what MFU
counts); `mmtrain calibrate` and online calibration (`balancing.calibrate_steps`) rescale them to
measured seconds. The balancer only needs relative costs, so the unit is free.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Sequence

import numpy as np

__all__ = ["TERMS", "CostModel", "work_terms", "tiled_terms"]

TERMS = ("decoder_token", "decoder_attention", "vision_token", "vision_attention")


def work_terms(decoder_lengths, vision_lengths: Sequence[Sequence[int]] | None = None) -> np.ndarray:
    """Per sample [L, L^2, sum n_i, sum n_i^2] (float64, shape [samples, 4]).

    `vision_lengths[j]` lists the ViT sequence length of every image of sample j (empty for a
    text-only sample); None = no images at all."""
    L = np.asarray(decoder_lengths, dtype=np.float64).reshape(-1)
    out = np.zeros((L.size, 4), dtype=np.float64)
    out[:, 0], out[:, 1] = L, L * L
    if vision_lengths is not None:
        if len(vision_lengths) != L.size:
            raise ValueError(f"vision_lengths has {len(vision_lengths)} samples, decoder_lengths {L.size}")
        for j, imgs in enumerate(vision_lengths):
            n = np.asarray(imgs, dtype=np.float64)
            out[j, 2], out[j, 3] = n.sum(), (n * n).sum()
    return out


def tiled_terms(decoder_lengths, tiles, tile_length: int, vision_sq=None) -> np.ndarray:
    """`work_terms` for samples whose images are `tiles[j]` vision units of `tile_length` ViT tokens
    each: fixed tiles (each its own ViT sequence), or with `vision_sq` native images, whose units
    (merged tokens of m^2 patches) add up to sum n_i and vision_sq[j] = sum n_i^2 over its images."""
    L = np.asarray(decoder_lengths, dtype=np.float64).reshape(-1)
    t = np.zeros_like(L) if tiles is None else np.asarray(tiles, dtype=np.float64).reshape(-1)
    n = float(tile_length)
    sq = t * n * n if vision_sq is None else np.asarray(vision_sq, dtype=np.float64).reshape(-1)
    return np.stack([L, L * L, t * n, sq], axis=1)


def _native_vision(model_cfg) -> tuple[float, float, int]:
    """(vision_token per ViT patch, vision_attention per patch^2, patches per unit) of a
    native-resolution ViT (Qwen2-VL / Qwen2.5-VL), training FLOPs as in `CostModel.from_config`.

    Per patch: every block's GEMMs (qkv + proj, fc1/fc2 or SwiGLU's three), the patch embedding
    (C*T*p^2 inputs), the merger (its MLP over m^2 concatenated patches, per merged token / m^2)
    and the attention of windowed blocks (bounded by a full window of (window / patch)^2 patches,
    linear in the image); per patch^2 of each image: the attention of the full-attention blocks."""
    from mmtrain.models.config import vision_windowed_layers

    d, v, p = model_cfg.decoder, model_cfg.vision, model_cfg.projector
    train_vit, train_proj = not model_cfg.freeze_vit, not model_cfg.freeze_projector
    hv, m2 = v.hidden_size, v.spatial_merge_size**2
    windowed = vision_windowed_layers(model_cfg)
    full, win = sum(not w for w in windowed), sum(windowed)
    window_patches = (v.window_size // v.patch_size) ** 2 if v.window_size else 0
    vit_passes = 3 if train_vit else 1
    mlp = (3 if v.gated_mlp else 2) * hv * v.ffn_hidden_size
    per_patch = 2.0 * v.num_layers * (4 * hv * hv + mlp)
    per_patch += 2.0 * v.in_channels * v.temporal_patch_size * v.patch_size**2 * hv  # patch embedding
    per_patch += 4.0 * hv * window_patches * win  # windowed attention, QK^T and PV
    proj_passes = 1 + int(train_vit) + int(train_proj)
    merger = 2.0 * (m2 * hv * p.ffn_hidden_size + p.ffn_hidden_size * d.hidden_size) / m2
    return per_patch * vit_passes + merger * proj_passes, 4.0 * hv * full * vit_passes, int(m2)


@dataclass(frozen=True)
class CostModel:
    decoder_token: float = 29e9
    decoder_attention: float = 0.5e6
    vision_token: float = 0.0
    vision_attention: float = 0.0
    tile_length: int = 0  # ViT tokens of one vision unit: a tile, or a native merged token (m^2); 0: no ViT
    unit: str = "flop"  # "flop" (the model's formulas) or "s" (calibrated)

    # ---- constructors ---------------------------------------------------------------------------
    @classmethod
    def default(cls) -> "CostModel":
        """The anchors' decoder-only cost, 29e9 * L + 0.5e6 * L^2 (a Mistral-7B-sized LM, frozen)."""
        return cls()

    @classmethod
    def from_config(cls, model_cfg) -> "CostModel":
        """Training FLOPs of `mmtrain.config.ModelConfig` (duck-typed).

        A GEMM with W weights costs 2W per token forward, 2W for the input gradient (needed iff
        anything upstream trains) and 2W for the weight gradient (iff the part trains): frozen
        parts skip weight-gradient GEMMs, and a frozen ViT does no backward at all (pixels are
        upstream of it). Attention forward: QK^T and PV, 2 * 2 * S^2 * heads * head_dim per layer
        (halved when causal); backward twice the forward. Only the ViT blocks up to the feature
        layer run; the projector runs on the image tokens the decoder receives. Native-resolution
        ViTs: see `_native_vision`."""
        from mmtrain.models.config import head_dim, is_native, patches_per_tile, tokens_per_tile, vision_layers_used, vit_seq_length

        d, v, p = model_cfg.decoder, model_cfg.vision, model_cfg.projector
        train_lm, train_vit = not model_cfg.freeze_lm, not model_cfg.freeze_vit
        train_proj = not model_cfg.freeze_projector
        hd, h = head_dim(model_cfg), d.hidden_size
        a, g = d.num_attention_heads, d.num_query_groups
        dec_w = d.num_layers * (h * (a + 2 * g) * hd + a * hd * h + 3 * h * d.ffn_hidden_size) + h * d.vocab_size
        upstream = train_vit or train_proj
        backward = train_lm or upstream
        gemm_passes = 1 + int(backward) + int(train_lm)
        attn_passes = 1 + 2 * int(backward)
        decoder_token = 2.0 * dec_w * gemm_passes
        decoder_attention = 2.0 * a * hd * d.num_layers * attn_passes  # causal: 4 S^2 a hd / 2

        if is_native(model_cfg):
            return cls(decoder_token, decoder_attention, *_native_vision(model_cfg), "flop")
        n = vit_seq_length(model_cfg)  # ViT tokens of a tile
        hv, layers = v.hidden_size, vision_layers_used(model_cfg)
        vit_passes = 3 if train_vit else 1
        per_token = 2.0 * layers * (4 * hv * hv + 2 * hv * v.ffn_hidden_size)
        per_token += 2.0 * v.in_channels * v.patch_size**2 * hv * patches_per_tile(model_cfg) / n  # patch conv
        proj_passes = 1 + int(train_vit) + int(train_proj)
        proj = 2.0 * (hv * p.ffn_hidden_size + p.ffn_hidden_size * h) * tokens_per_tile(model_cfg) / n
        vision_token = per_token * vit_passes + proj * proj_passes
        vision_attention = 4.0 * hv * layers * vit_passes
        return cls(decoder_token, decoder_attention, vision_token, vision_attention, int(n), "flop")

    # ---- costs ---------------------------------------------------------------------------------
    @property
    def coefficients(self) -> np.ndarray:
        return np.array([self.decoder_token, self.decoder_attention, self.vision_token, self.vision_attention])

    def sample_costs(self, decoder_lengths, vision_lengths: Sequence[Sequence[int]] | None = None) -> np.ndarray:
        """Cost of each sample from its decoder length and the ViT length of each of its images."""
        return work_terms(decoder_lengths, vision_lengths) @ self.coefficients

    def tiled_costs(self, decoder_lengths, tiles=None, vision_sq=None) -> np.ndarray:
        """`sample_costs` for vision units (`tiles[j]` units of `tile_length` ViT tokens; native
        images: with `vision_sq`, see `tiled_terms`)."""
        return tiled_terms(decoder_lengths, tiles, self.tile_length, vision_sq) @ self.coefficients

    def sample_cost(self, length: float, tiles: float = 0) -> float:
        return float(self.tiled_costs([length], [tiles])[0])

    def pack_cost(self, lengths: Sequence[float], tiles: Sequence[float] | None = None) -> float:
        """A varlen pack: the sum of its segments (no cross-segment attention)."""
        return float(self.tiled_costs(lengths, tiles).sum())

    def vision_fraction(self, lengths, tiles) -> float:
        """Share of the total cost spent in the vision encoder (the weight of tile balance)."""
        terms = tiled_terms(lengths, tiles, self.tile_length) * self.coefficients
        total = terms.sum()
        return float(terms[:, 2:].sum() / total) if total > 0 else 0.0

    def scaled(self, weights: Sequence[float], unit: str) -> "CostModel":
        """Each term's coefficient times its weight (a calibration's result)."""
        w = [float(x) for x in weights]
        return replace(self, decoder_token=self.decoder_token * w[0], decoder_attention=self.decoder_attention * w[1],
                       vision_token=self.vision_token * w[2], vision_attention=self.vision_attention * w[3], unit=unit)

    # ---- persistence ---------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "CostModel":
        d = dict(d.get("cost_model", d))
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown cost-model keys {sorted(unknown)}; a cost model has {sorted(known)} "
                             "(re-run `mmtrain calibrate` for a file written by an older version)")
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
