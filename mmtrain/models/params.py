"""Parameters by layout-independent name: naming, TP sharding, and initialisation.

megatron names a decoder layer by its index *within the pipeline stage* and holds 1/TP of each
tensor-parallel weight. Everything that must not depend on the layout (initial weights, checkpoint
import and export) works on the *full* tensor under its *global* name instead:

* name: this rank's parameter name with the decoder layer index made global
  (`language_model.decoder.layers.<global>.…`); the LM head of a later stage that reuses the
  embedding is `language_model.embedding.word_embeddings.weight`.
* full tensor: the concatenation of the TP shards along megatron's partition dim, except that the
  vocab rows stop at the real vocab (TP padding rows are zero and dropped) and a SwiGLU fc1 is
  [gate; up] (each TP shard holds [gate_r; up_r]). QKV stays in megatron's per-group order
  [q_g..., k_g, v_g] for each query group g, which a plain chunk shards.

`initialize` draws each full tensor from a generator keyed by (seed, name), then keeps this rank's
shard, so one seed gives the same model at every TP/PP.
"""

from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass
from typing import Iterator, Optional

import torch

from mmtrain.models.config import ModelConfig

_DECODER_LAYER = re.compile(r"^language_model\.decoder\.layers\.(\d+)\.")
WORD_EMBEDDINGS = "language_model.embedding.word_embeddings.weight"
OUTPUT_LAYER = "language_model.output_layer.weight"


@dataclass(frozen=True)
class ShardSpec:
    dim: Optional[int]  # TP partition dim; None = replicated on every TP rank
    gated: bool = False  # SwiGLU fc1: rank r holds [gate_r; up_r]
    vocab: bool = False  # rows are the vocabulary, zero-padded to the padded vocab before sharding


def shard_spec(name: str, gated_vision: bool = False) -> ShardSpec:
    """How the parameter `name` (local or global) is split over TP, from megatron's layer types.
    gated_vision: the ViT's MLP is SwiGLU too (model.vision.gated_mlp, Qwen2.5-VL)."""
    if name.endswith("word_embeddings.weight") or name.endswith("output_layer.weight"):
        return ShardSpec(0, vocab=True)
    if ".linear_qkv." in name:
        return ShardSpec(0)
    if ".linear_fc1." in name:  # the decoder MLP is SwiGLU
        return ShardSpec(0, gated=name.startswith("language_model.") or (gated_vision and name.startswith("vision.")))
    if name.endswith("linear_proj.weight") or name.endswith("linear_fc2.weight"):
        return ShardSpec(1)
    return ShardSpec(None)


def global_name(local: str, layer_offset: int, tied_output: bool = False) -> str:
    """This stage's parameter name -> its layout-independent name."""
    m = _DECODER_LAYER.match(local)
    if m:
        return f"language_model.decoder.layers.{int(m.group(1)) + layer_offset}." + local[m.end() :]
    if tied_output and local == OUTPUT_LAYER:
        return WORD_EMBEDDINGS
    return local


def decoder_layer_offset(num_layers: int, pp: int, pp_rank: int) -> int:
    """Global index of stage `pp_rank`'s first decoder layer (megatron's even split)."""
    if num_layers % pp:
        raise ValueError(f"model.decoder.num_layers={num_layers} is not divisible by pipeline size {pp}")
    return pp_rank * (num_layers // pp)


def full_shape(local_shape: torch.Size, spec: ShardSpec, tp: int, vocab_size: int) -> tuple[int, ...]:
    shape = list(local_shape)
    if spec.dim is not None:
        shape[spec.dim] *= tp
    if spec.vocab:
        shape[0] = vocab_size
    return tuple(shape)


def shard(full: torch.Tensor, spec: ShardSpec, tp_rank: int, tp: int, padded_vocab: int = 0) -> torch.Tensor:
    """The TP rank's piece of a full tensor."""
    if spec.vocab and full.shape[0] < padded_vocab:
        full = torch.cat([full, full.new_zeros(padded_vocab - full.shape[0], *full.shape[1:])])
    if spec.dim is None or tp == 1:
        return full
    if spec.gated:
        gate, up = full.chunk(2, dim=0)
        return torch.cat([gate.chunk(tp, dim=0)[tp_rank], up.chunk(tp, dim=0)[tp_rank]])
    if full.shape[spec.dim] % tp:
        raise ValueError(f"dim {spec.dim} of a {tuple(full.shape)} tensor does not divide by TP={tp}")
    return full.chunk(tp, dim=spec.dim)[tp_rank]


def unshard(shards: list[torch.Tensor], spec: ShardSpec, vocab_size: int) -> torch.Tensor:
    """Inverse of `shard`: TP shards in rank order -> the full tensor."""
    if spec.dim is None:
        full = shards[0]
    elif spec.gated:
        halves = [s.chunk(2, dim=0) for s in shards]
        full = torch.cat([torch.cat([h[0] for h in halves]), torch.cat([h[1] for h in halves])])
    else:
        full = torch.cat(shards, dim=spec.dim)
    return full[:vocab_size] if spec.vocab else full


# ---- this rank's parameters under global names ------------------------------------------------


@dataclass(frozen=True)
class RankParam:
    name: str  # global
    param: torch.nn.Parameter
    spec: ShardSpec
    full_shape: tuple[int, ...]


def rank_params(vlm, tp: int) -> Iterator[RankParam]:
    """Every parameter of this rank's VLM stage under its global name, with its full shape.

    Checks megatron's own TP attributes against `shard_spec`, so a megatron change in how a layer
    is split fails here rather than loading or initialising the wrong slice.
    """
    offset = _layer_offset(vlm)
    tied = vlm.share_embeddings_and_output_weights
    gated_vision = getattr(vlm, "gated_vision_mlp", False)
    for local, p in vlm.named_parameters():
        spec = shard_spec(local, gated_vision)
        is_tp = bool(getattr(p, "tensor_model_parallel", False))
        if is_tp != (spec.dim is not None) or (is_tp and getattr(p, "partition_dim", spec.dim) != spec.dim):
            raise RuntimeError(
                f"{local}: megatron shards it {'on dim %s' % p.partition_dim if is_tp else 'not at all'}, "
                f"mmtrain.models.params expects {spec}"
            )
        yield RankParam(global_name(local, offset, tied), p, spec, full_shape(p.shape, spec, tp, vlm.vocab_size))


def _layer_offset(vlm) -> int:
    layers = vlm.language_model.decoder.layers
    if len(layers) == 0:
        return 0
    return int(layers[0].layer_number) - 1


# ---- layout-invariant initialisation ----------------------------------------------------------


def _seed_for(seed: int, name: str) -> int:
    digest = hashlib.sha256(f"{seed}/{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _is_norm(name: str) -> bool:
    return "layernorm" in name or ".ln_pre." in name or ".ln_post." in name


def init_std(name: str, cfg: ModelConfig) -> float:
    """N(0, std) for weights; megatron's scaled init (std / sqrt(2 layers)) for the projections
    that write into the residual stream."""
    std = cfg.decoder.init_method_std
    if name.endswith("linear_proj.weight") or name.endswith("linear_fc2.weight"):
        if name.startswith("language_model."):
            return std / math.sqrt(2.0 * cfg.decoder.num_layers)
        if name.startswith("vision."):
            return std / math.sqrt(2.0 * cfg.vision.num_layers)
    return std


def init_full(name: str, shape: tuple[int, ...], cfg: ModelConfig, seed: int, device: torch.device) -> torch.Tensor:
    """The full initial tensor of parameter `name`: a pure function of (seed, name, shape)."""
    if _is_norm(name):
        return torch.ones(shape, device=device) if name.endswith(".weight") else torch.zeros(shape, device=device)
    if name.endswith(".bias"):
        return torch.zeros(shape, device=device)
    g = torch.Generator(device=device).manual_seed(_seed_for(seed, name))
    return torch.empty(shape, device=device).normal_(0.0, init_std(name, cfg), generator=g)


@torch.no_grad()
def initialize(vlm, cfg: ModelConfig, seed: int, tp_rank: int, tp: int) -> None:
    """Fill every parameter of this rank from its full tensor's keyed draw."""
    for rp in rank_params(vlm, tp):
        full = init_full(rp.name, rp.full_shape, cfg, seed, rp.param.device)
        rp.param.copy_(shard(full, rp.spec, tp_rank, tp, vlm.padded_vocab_size))
