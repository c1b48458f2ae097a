"""Native-resolution images in packing and balancing (model=tiny_native on the native LLaVA-Pretrain
smoke table, tests/assets/llava_pretrain_native_smoke.csv): packing.max_vision_patches_per_pack
holds on every packer path (online packs of training, strict steps, plan files, evaluation), and the
balancer's costs carry the ViT term of every image, quadratic per image."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from mmtrain.balancing.cost import CostModel, work_terms
from mmtrain.config import compose
from mmtrain.models.config import tokens_per_tile, vit_unit_length
from mmtrain.steps.from_config import build_source, build_stream, vision_unit_cap

REPO = Path(__file__).resolve().parents[3]
TABLE = REPO / "tests/assets/llava_pretrain_native_smoke.csv"
CAP = 1000  # ViT patches per pack: 2-4 images of the capped table, where 1024 tokens hold 6-10 samples


def _cfg(*extra, table=TABLE):
    return compose(["model=tiny_native", "data=lengths", f"data.source={table}", "packing.seq_length=1024",
                    "trainer.global_batch_size=4", "packing.buffer_size=16", *extra])


@pytest.fixture(scope="module")
def capped(tmp_path_factory):
    """64 samples of 25-200 merged image tokens (100-800 patches; text-only ones too), 10-40 text."""
    rng = np.random.default_rng(5)
    img = rng.integers(25, 201, 64)
    img[::9] = 0
    path = tmp_path_factory.mktemp("native") / "capped.csv"
    rows = [f"s{i},{t},{x}" for i, (t, x) in enumerate(zip(img, rng.integers(10, 41, 64)))]
    path.write_text("id,image_tokens,text_tokens\n" + "\n".join(rows) + "\n")
    return path


def _epoch_packs(cfg, dp=2):
    tpt = tokens_per_tile(cfg.model)
    src = build_source(cfg, tpt)
    stream = build_stream(cfg, src, tpt, dp, 1)
    rows = []
    while True:
        st = stream.next_step()
        if st.epoch > 0:
            break
        rows += st.rows
    return src, stream, rows


def _patches(src, rows):
    vl = src.vision_lengths
    return [sum(n for i in r for n in vl[i]) for r in rows]


def test_vision_unit_cap_in_units_of_each_model():
    assert vision_unit_cap(_cfg()) is None
    assert vit_unit_length(_cfg().model) == 4 and tokens_per_tile(_cfg().model) == 1
    assert vision_unit_cap(_cfg("packing.max_vision_patches_per_pack=1001")) == 250  # merged tokens of 4 patches
    tiles = compose(["model=tiny", "packing.max_vision_patches_per_pack=100"])
    assert vit_unit_length(tiles.model) == 17 and vision_unit_cap(tiles) == 5  # a tile: 16 patches + CLS
    assert vision_unit_cap(compose(["model=tiny", "packing.max_vision_patches_per_pack=100", "packing.max_tiles_per_pack=3"])) == 3
    with pytest.raises(ValueError, match="no tiles"):
        vision_unit_cap(_cfg("packing.max_tiles_per_pack=3"))
    with pytest.raises(ValueError, match="less than one merged token"):
        vision_unit_cap(_cfg("packing.max_vision_patches_per_pack=3"))


@pytest.mark.parametrize("mode", ["balanced", "strict"])
def test_training_packs_hold_at_most_the_vit_patch_cap(capped, mode):
    extra = ["packing.strict_equivalence=true", "trainer.global_batch_size=16"] if mode == "strict" else []
    src, _, free = _epoch_packs(_cfg(*extra, table=capped))
    assert max(_patches(src, free)) > CAP, "the cap would not bind: the test proves nothing"
    src, _, rows = _epoch_packs(_cfg(*extra, f"packing.max_vision_patches_per_pack={CAP}", table=capped))
    assert max(_patches(src, rows)) <= CAP
    seen = sorted(i for r in rows for i in r)
    assert seen == list(range(len(src))), "every sample once per epoch"


def test_eval_rows_hold_at_most_the_vit_patch_cap(capped):
    from mmtrain.train.evaluate import Evaluator

    src = build_source(_cfg(table=capped), 1)

    def rows_of(cfg):
        return [row for rank in Evaluator(cfg, SimpleNamespace(dp=2), src, 1).plan for mb in rank for row in mb]

    assert max(_patches(src, rows_of(_cfg(table=capped)))) > CAP
    rows = rows_of(_cfg(f"packing.max_vision_patches_per_pack={CAP}", table=capped))
    assert sorted(i for r in rows for i in r) == list(range(len(src)))
    assert max(_patches(src, rows)) <= CAP and len(rows) < len(src)  # packed, under the cap


@pytest.mark.parametrize("dp", [None, 2])
def test_plan_file_packs_hold_at_most_the_vit_patch_cap(capped, tmp_path, dp):
    from mmtrain.steps.pack_cli import main

    out = tmp_path / "plan.jsonl"
    args = [str(capped), "--out", str(out), "--seq-length", "1024", "--max-vision-patches-per-pack", str(CAP), "model=tiny_native"]
    if dp:
        args += ["--dp", "2", "--micro-batches", "2"]
    assert main(args[:5] + args[7:]) == 0  # without the cap: some pack holds more
    src = build_source(_cfg(table=capped), 1)
    index = {sid: i for i, sid in enumerate(src.ids)}
    free = [[index[s] for s in json.loads(line)["samples"]] for line in out.read_text().splitlines()]
    assert max(_patches(src, free)) > CAP
    assert main(args) == 0
    rows = [[index[s] for s in json.loads(line)["samples"]] for line in out.read_text().splitlines()]
    assert sorted(i for r in rows for i in r) == list(range(len(src)))
    assert max(_patches(src, rows)) <= CAP


def test_native_cost_model_has_the_vit_and_its_per_image_attention():
    cfg = _cfg()
    cm = CostModel.from_config(cfg.model)
    assert cm.vision_token > 0 and cm.vision_attention > 0 and cm.tile_length == 4
    # one image of 400 patches costs its square; four of 100 patches a quarter of that in attention
    one, four = cm.sample_costs([50, 50], [[400], [100, 100, 100, 100]])
    assert one - four == pytest.approx(cm.vision_attention * (400**2 - 4 * 100**2))
    # freezing the ViT takes its backward away, never its forward
    frozen = CostModel.from_config(_cfg("model.freeze_vit=true").model)
    assert 0 < frozen.vision_token < cm.vision_token and 0 < frozen.vision_attention < cm.vision_attention


def test_balancer_costs_are_the_formula_with_every_images_vit_length():
    """The step stream (training's, simulate's) weighs each pack by decoder + ViT work, the ViT's
    from each image's own patch count: equal to work_terms over the samples' per-image lengths."""
    src, stream, rows = _epoch_packs(_cfg())
    lens = stream.lengths
    packs = [(tuple(r), tuple(int(lens[i]) for i in r)) for r in rows]
    vl = src.vision_lengths
    want = np.array([work_terms([lens[i] for i in r], [vl[i] for i in r]).sum(axis=0) for r in rows])
    assert np.array_equal(stream.pack_terms(packs), want)
    assert np.allclose(stream.pack_costs(packs), want @ stream.cost_model.coefficients, rtol=1e-12)
    assert (want[:, 3] > 0).all() and (want[:, 3] < want[:, 2] ** 2).any()  # per image, not per pack
    st = build_stream(_cfg(), src, 1, 2, 1).next_step()
    costs = stream.pack_costs([(r, tuple(int(lens[i]) for i in r)) for r in st.rows])
    assert st.row_costs == pytest.approx(costs.tolist(), rel=1e-12)
