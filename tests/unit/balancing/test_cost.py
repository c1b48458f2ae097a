import pytest

from mmtrain.balancing.cost import CostModel


def test_default_is_the_anchor_formula():
    cm = CostModel.default()
    assert cm.sample_cost(1000) == pytest.approx(29e9 * 1000 + 0.5e6 * 1000**2)
    assert cm.pack_cost([1000, 24]) == pytest.approx(cm.sample_cost(1000) + cm.sample_cost(24))


def test_mistral7b_frozen_shape_lands_near_anchor():
    cm = CostModel.from_model_shape(num_layers=32, hidden_size=4096, ffn_hidden_size=14336,
                                    num_attention_heads=32, num_query_groups=8, vocab_size=32768,
                                    vit_num_layers=24, vit_hidden_size=1024, vit_ffn_hidden_size=4096,
                                    projector_ffn_hidden_size=4096, train_lm=False, train_vit=False)
    assert 27e9 < cm.dec_linear < 31e9  # fwd + input-grad GEMMs of ~7.1B weights
    assert cm.vit_per_tile > 0 and cm.vit_attn_per_tile > 0
    trained = CostModel.from_model_shape(num_layers=32, hidden_size=4096, ffn_hidden_size=14336,
                                         num_attention_heads=32, num_query_groups=8, vocab_size=32768)
    assert trained.dec_linear == pytest.approx(cm.dec_linear * 1.5)  # + weight-grad GEMMs


def test_native_resolution_is_quadratic_per_image():
    cm = CostModel(dec_linear=0, dec_quadratic=0, vit_per_tile=1.0, vit_attn_per_tile=1.0, tokens_per_tile=100)
    assert cm.sample_cost(0, image_tokens=200) == pytest.approx(2 + 4)
    assert cm.sample_cost(0, tiles=2) == pytest.approx(4)


@pytest.mark.parametrize("suffix", [".json", ".yaml"])
def test_roundtrip(tmp_path, suffix):
    cm = CostModel(1.5e-9, 2e-13, 3e-6, 4e-7, 256, "s")
    cm.save(tmp_path / f"c{suffix}")
    assert CostModel.load(tmp_path / f"c{suffix}") == cm


def test_from_config():
    from mmtrain.config import ModelConfig

    cm = CostModel.from_config(ModelConfig())
    assert cm.tokens_per_tile == 16 and cm.dec_linear > 0


def test_calibrate_tiny_writes_a_loadable_model(tmp_path):
    pytest.importorskip("torch")
    from mmtrain.balancing.calibrate import main

    out = tmp_path / "cm.yaml"
    assert main(["--device", "cpu", "--hidden", "32", "--ffn", "64", "--heads", "2", "--layers", "1",
                 "--vit-hidden", "16", "--vit-ffn", "32", "--vit-heads", "2", "--vit-layers", "1",
                 "--tokens-per-tile", "16", "--lengths", "64,128,256", "--repeats", "1", "--out", str(out)]) == 0
    cm = CostModel.load(out)
    assert cm.unit == "s" and cm.dec_linear >= 0 and cm.dec_quadratic >= 0
