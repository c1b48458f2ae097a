"""Layout-independent parameter names, TP sharding and the keyed initialisation (no processes)."""

from __future__ import annotations

import pytest
import torch

from mmtrain.models import params
from mmtrain.models.config import ModelConfig


@pytest.mark.parametrize(
    "name,spec",
    [
        ("language_model.embedding.word_embeddings.weight", params.ShardSpec(0, vocab=True)),
        ("language_model.output_layer.weight", params.ShardSpec(0, vocab=True)),
        ("language_model.decoder.layers.3.self_attention.linear_qkv.weight", params.ShardSpec(0)),
        ("language_model.decoder.layers.3.mlp.linear_fc1.weight", params.ShardSpec(0, gated=True)),
        ("vision.blocks.layers.0.mlp.linear_fc1.bias", params.ShardSpec(0)),
        ("projector.encoder.linear_fc1.weight", params.ShardSpec(0)),
        ("language_model.decoder.layers.0.self_attention.linear_proj.weight", params.ShardSpec(1)),
        ("vision.blocks.layers.1.mlp.linear_fc2.bias", params.ShardSpec(None)),
        ("vision.position_embedding", params.ShardSpec(None)),
    ],
)
def test_shard_spec(name, spec):
    assert params.shard_spec(name) == spec


@pytest.mark.parametrize("tp", [1, 2, 4])
@pytest.mark.parametrize("spec", [params.ShardSpec(0), params.ShardSpec(1), params.ShardSpec(0, gated=True), params.ShardSpec(None)])
def test_shard_unshard_round_trip(tp, spec):
    full = torch.randn(16, 8)
    shards = [params.shard(full, spec, r, tp) for r in range(tp)]
    assert torch.equal(params.unshard(shards, spec, vocab_size=0), full)


def test_gated_fc1_shard_holds_its_part_of_gate_and_up():
    gate, up = torch.arange(8.0)[:, None], 100 + torch.arange(8.0)[:, None]
    s1 = params.shard(torch.cat([gate, up]), params.ShardSpec(0, gated=True), 1, 2)
    assert s1[:, 0].tolist() == [4, 5, 6, 7, 104, 105, 106, 107]


def test_vocab_rows_padded_with_zeros_and_dropped_again():
    full = torch.randn(99, 4)
    spec = params.ShardSpec(0, vocab=True)
    shards = [params.shard(full, spec, r, 2, padded_vocab=128) for r in range(2)]
    assert [s.shape[0] for s in shards] == [64, 64] and (shards[1][35:] == 0).all()
    assert torch.equal(params.unshard(shards, spec, vocab_size=99), full)


def test_global_names_use_the_global_layer_index():
    assert params.global_name("language_model.decoder.layers.1.mlp.linear_fc2.weight", 4) == (
        "language_model.decoder.layers.5.mlp.linear_fc2.weight"
    )
    assert params.global_name("vision.blocks.layers.1.mlp.linear_fc2.weight", 4) == "vision.blocks.layers.1.mlp.linear_fc2.weight"
    assert params.global_name("language_model.output_layer.weight", 2, tied_output=True) == params.WORD_EMBEDDINGS
    assert [params.decoder_layer_offset(8, 4, r) for r in range(4)] == [0, 2, 4, 6]


def test_initial_tensor_is_a_function_of_seed_and_name_only():
    cfg = ModelConfig()
    name = "language_model.decoder.layers.1.self_attention.linear_qkv.weight"
    a = params.init_full(name, (8, 4), cfg, 3, torch.device("cpu"))
    assert torch.equal(a, params.init_full(name, (8, 4), cfg, 3, torch.device("cpu")))
    assert not torch.equal(a, params.init_full(name, (8, 4), cfg, 4, torch.device("cpu")))
    other = name.replace("layers.1", "layers.0")
    assert not torch.equal(a, params.init_full(other, (8, 4), cfg, 3, torch.device("cpu")))
    assert torch.equal(params.init_full("vision.ln_pre.weight", (4,), cfg, 3, torch.device("cpu")), torch.ones(4))
    assert torch.equal(params.init_full("projector.encoder.linear_fc1.bias", (4,), cfg, 3, torch.device("cpu")), torch.zeros(4))
    big = params.init_full(name, (256, 256), cfg, 3, torch.device("cpu"))
    assert abs(float(big.std()) - cfg.decoder.init_method_std) < 1e-3
    proj = params.init_full("language_model.decoder.layers.0.mlp.linear_fc2.weight", (256, 256), cfg, 3, torch.device("cpu"))
    assert abs(float(proj.std()) - cfg.decoder.init_method_std / 2.0) < 1e-3  # std / sqrt(2 * 2 layers)
