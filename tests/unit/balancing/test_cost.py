"""The one cost formula (balancer and MFU), its calibration, and its persistence."""

import numpy as np
import pytest

from mmtrain.balancing.cost import CostModel


def test_default_is_the_anchor_formula():
    cm = CostModel.default()
    assert cm.sample_cost(1000) == pytest.approx(29e9 * 1000 + 0.5e6 * 1000**2)
    assert cm.pack_cost([1000, 24]) == pytest.approx(cm.sample_cost(1000) + cm.sample_cost(24))


def test_mistral7b_frozen_shape_lands_near_anchor():
    from mmtrain.config import compose

    cfg = compose(["model=llava_mistral7b_clip224"])  # LM and ViT frozen, projector trained
    cm = CostModel.from_config(cfg.model)
    assert 27e9 < cm.decoder_token < 31e9  # fwd + input-grad GEMMs of ~7.1B weights
    assert cm.vision_token > 0 and cm.vision_attention > 0 and cm.tile_length == 257
    cfg.model.freeze_lm = False
    trained = CostModel.from_config(cfg.model)
    assert trained.decoder_token == pytest.approx(cm.decoder_token * 1.5)  # + weight-grad GEMMs


def test_tiny_flops_equal_an_independent_count():
    """MFU's useful FLOPs are this formula: recount one sample of the tiny model by hand."""
    from mmtrain.config import compose

    m = compose(["model=tiny"]).model
    cm = CostModel.from_config(m)
    L, tiles = 300, 3
    d, v, p = m.decoder, m.vision, m.projector
    hd = d.hidden_size // d.num_attention_heads
    w = d.num_layers * (d.hidden_size * (d.num_attention_heads + 2 * d.num_query_groups) * hd
                        + d.num_attention_heads * hd * d.hidden_size + 3 * d.hidden_size * d.ffn_hidden_size) \
        + d.hidden_size * d.vocab_size
    dec = 3 * 2 * L * w + 3 * d.num_layers * 2 * L * L * d.num_attention_heads * hd  # all trains: fwd + 2x bwd
    patches, n, tok = 16, 17, 16  # 28 px / 7 px patches = 4 x 4, + CLS; CLS dropped for the decoder
    layers = v.num_layers  # feature_layer -1: both blocks run
    vit_fwd = 2 * n * layers * (4 * v.hidden_size**2 + 2 * v.hidden_size * v.ffn_hidden_size) \
        + layers * 4 * n * n * v.hidden_size + 2 * patches * v.in_channels * v.patch_size**2 * v.hidden_size
    proj_fwd = 2 * tok * (v.hidden_size * p.ffn_hidden_size + p.ffn_hidden_size * d.hidden_size)
    want = dec + tiles * 3 * (vit_fwd + proj_fwd)
    assert cm.tiled_costs([L], [tiles])[0] == pytest.approx(want, rel=1e-12)


def test_vision_is_a_list_of_image_lengths_quadratic_per_image():
    cm = CostModel(decoder_token=0, decoder_attention=0, vision_token=1.0, vision_attention=1.0, tile_length=100)
    assert cm.sample_costs([0], [[200]])[0] == pytest.approx(200 + 200**2)
    assert cm.sample_costs([0], [[100, 100]])[0] == pytest.approx(2 * (100 + 100**2))
    assert cm.tiled_costs([0], [2])[0] == cm.sample_costs([0], [[100, 100]])[0]
    assert cm.sample_costs([5, 7], [[], [100]]).tolist() == [0.0, 100 + 100**2]  # text-only sample: no ViT


@pytest.mark.parametrize("suffix", [".json", ".yaml"])
def test_roundtrip(tmp_path, suffix):
    cm = CostModel(1.5e-9, 2e-13, 3e-6, 4e-7, 257, "s")
    cm.save(tmp_path / f"c{suffix}")
    assert CostModel.load(tmp_path / f"c{suffix}") == cm


def test_old_keys_are_refused_naming_the_new_ones(tmp_path):
    with pytest.raises(ValueError, match="decoder_token"):
        CostModel.from_dict({"dec_linear": 1.0})


def test_fit_term_weights_recovers_the_time_per_flop_of_each_term():
    from mmtrain.balancing.calibrate import fit_term_weights

    rng = np.random.default_rng(0)
    terms = rng.uniform(1e8, 1e9, (40, 4)) * np.array([1.0, 0.3, 0.5, 0.1])
    true = np.array([2e-12, 8e-12, 1e-12, 3e-12])
    secs = 0.01 + terms @ true + rng.normal(0, 1e-5, 40)
    w, c, resid = fit_term_weights(terms, secs, ridge=1e-6)
    assert w == pytest.approx(true, rel=0.05) and c == pytest.approx(0.01, rel=0.1) and resid < 0.01


def test_calibrate_tiny_writes_a_loadable_model(tmp_path):
    from mmtrain.balancing.calibrate import main

    out = tmp_path / "cm.yaml"
    assert main(["--device", "cpu", "--hidden", "32", "--ffn", "64", "--heads", "2", "--layers", "1",
                 "--vit-hidden", "16", "--vit-ffn", "32", "--vit-heads", "2", "--vit-layers", "1",
                 "--tile-length", "16", "--lengths", "64,128,256", "--repeats", "1", "--out", str(out)]) == 0
    cm = CostModel.load(out)
    assert cm.unit == "s" and cm.decoder_token >= 0 and cm.decoder_attention >= 0 and cm.tile_length == 16
