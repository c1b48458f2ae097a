"""The cost of a sample or pack: one formula for the balancer and for MFU's useful FLOPs.

A sample is a decoder segment of `L` tokens (image + text, after expansion) plus the images its
vision encoder runs, each a ViT sequence of `n_i` tokens (a fixed-size tile today: patches + CLS;
a native-resolution image later, with its own patch count). Its work has four terms:

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


def tiled_terms(decoder_lengths, tiles, tile_length: int) -> np.ndarray:
    """`work_terms` for samples whose images are `tiles[j]` fixed tiles of `tile_length` ViT tokens."""
    L = np.asarray(decoder_lengths, dtype=np.float64).reshape(-1)
    t = np.zeros_like(L) if tiles is None else np.asarray(tiles, dtype=np.float64).reshape(-1)
    n = float(tile_length)
    return np.stack([L, L * L, t * n, t * n * n], axis=1)


@dataclass(frozen=True)
class CostModel:
    decoder_token: float = 29e9
    decoder_attention: float = 0.5e6
    vision_token: float = 0.0
    vision_attention: float = 0.0
    tile_length: int = 0  # ViT tokens of one fixed-size tile (0: no vision encoder)
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
        layer run; the projector runs on the image tokens the decoder receives."""
        from mmtrain.models.config import head_dim, patches_per_tile, tokens_per_tile, vision_layers_used, vit_seq_length

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

    def tiled_costs(self, decoder_lengths, tiles=None) -> np.ndarray:
        """`sample_costs` for fixed-size tiles (`tiles[j]` tiles of `tile_length` ViT tokens)."""
        return tiled_terms(decoder_lengths, tiles, self.tile_length) @ self.coefficients

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
