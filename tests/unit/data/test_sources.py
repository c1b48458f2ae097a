"""Sources (LLaVA JSON/JSONL, WebDataset, image folder, synthetic, length table) and exact stats."""

from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pytest

from analysis_helpers import conv, image_bytes, write_image
from mmtrain.data import synthetic
from mmtrain.analysis.stats import parse_ranges, quantity_stats
from mmtrain.data.sources import (
    ImageFolderSource,
    LlavaJsonSource,
    ScanOptions,
    SyntheticSource,
    WebDatasetSource,
    open_source,
)

GOOD_IMAGE_TOKENS = {"a": 576, "b": 32, "c": 1, "d": 100}
EXPECTED_ERRORS = {
    "missing_image": ["missing"],
    "truncated_image": ["trunc"],
    "corrupt_image": ["corrupt"],
    "not_an_image": ["text"],
    "zero_size_image": ["empty"],
    "missing_placeholder": ["noph"],
    "multiple_images": ["two", "twoph"],
}


@pytest.mark.parametrize("workers", [1, 2])
def test_llava_jsonl_counts_and_errors(llava_dir, workers):
    src = open_source(llava_dir["jsonl"], image_root=llava_dir["root"])
    assert isinstance(src, LlavaJsonSource)
    res = src.scan(ScanOptions(workers=workers, progress=False))
    assert res.ids == list(GOOD_IMAGE_TOKENS)
    assert res.image_tokens.tolist() == list(GOOD_IMAGE_TOKENS.values())
    assert res.text_tokens.tolist() == [20] * 4
    assert res.total_tokens.tolist() == [20 + t - 1 for t in GOOD_IMAGE_TOKENS.values()]
    errors = res.errors.to_dict()
    assert {k: v["first_ids"] for k, v in errors.items()} == EXPECTED_ERRORS | {"malformed_json": ["data.jsonl:4"]}
    assert res.num_scanned == 13 and res.errors.total == 9


def test_llava_json_array_and_image_root_default(llava_dir, tmp_path):
    res = LlavaJsonSource(llava_dir["json"], llava_dir["root"]).scan(ScanOptions(progress=False))
    assert res.image_tokens.tolist() == list(GOOD_IMAGE_TOKENS.values())
    assert {k: v["first_ids"] for k, v in res.errors.to_dict().items()} == EXPECTED_ERRORS
    # default image root: the JSON file's folder
    (tmp_path / "x.png").write_bytes(image_bytes("PNG", (28, 42)))
    (tmp_path / "d.json").write_text(json.dumps([{"id": 1, "image": "x.png", "conversations": conv()}]))
    assert open_source(str(tmp_path / "d.json")).scan().image_tokens.tolist() == [2 * 3]
    # multi-image samples when allowed: tokens add up
    res = LlavaJsonSource(llava_dir["json"], llava_dir["root"]).scan(ScanOptions(progress=False, max_images=2))
    assert res.image_tokens[res.ids.index("two")] == 576 + 32


def test_llava_json_dynamic_tiling(llava_dir):
    from mmtrain.data.accounting import TokenAccounting

    acc = TokenAccounting(mode="dynamic", merge=2, thumbnail=True)
    res = LlavaJsonSource(llava_dir["json"], llava_dir["root"]).scan(ScanOptions(accounting=acc, progress=False))
    # 336x336 -> 1 tile; 100x50 -> (2,1)+thumb; 14x14 -> 1; 700x15 -> (12,1)+thumb
    assert res.tiles.tolist() == [1, 3, 1, 13]
    assert res.image_tokens.tolist() == [256, 768, 256, 13 * 256]


def _tar(path, samples, cut: int | None = None):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in samples:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    data = buf.getvalue()
    path.write_bytes(data if cut is None else data[:cut])


def test_webdataset_shards(tmp_path):
    j = json.dumps(conv()).encode()
    good = image_bytes("JPEG", (336, 336))
    _tar(
        tmp_path / "shard-000000.tar",
        [
            ("s0.jpg", good), ("s0.json", j),
            ("s1.jpg", good[:200]), ("s1.json", j),  # truncated image
            ("s2.jpg", image_bytes("JPEG", (100, 50))), ("s2.json", b"{not json"),
            ("s3.json", j),  # no image
            ("s4.png", image_bytes("PNG", (28, 28))), ("s4.json", json.dumps({"conversations": conv()}).encode()),
        ],
    )
    shard1 = [("t0.jpg", good), ("t0.json", j), ("t1.jpg", good), ("t1.json", j)]
    _tar(tmp_path / "shard-000001.tar", shard1, cut=512 + len(good) + 100)  # tar cut inside t0.json
    for spec, workers in [(str(tmp_path), 1), (str(tmp_path / "shard-{000000..000001}.tar"), 2)]:
        src = open_source(spec)
        assert isinstance(src, WebDatasetSource) and len(src.shards) == 2
        res = src.scan(ScanOptions(workers=workers, progress=False))
        assert res.ids == ["shard-000000.tar/s0", "shard-000000.tar/s4"]
        assert res.image_tokens.tolist() == [576, 4]
        assert res.text_tokens.tolist() == [20, 20]
        errs = {k: v["first_ids"] for k, v in res.errors.to_dict().items()}
        assert errs == {
            "truncated_image": ["shard-000000.tar/s1"],
            "malformed_json": ["shard-000000.tar/s2"],
            "missing_image": ["shard-000000.tar/s3"],
            "corrupt_shard": ["shard-000001.tar"],
        }
    assert [s["__key__"] for s in WebDatasetSource(str(tmp_path / "shard-000000.tar"))] == [
        "s0", "s1", "s2", "s3", "s4"
    ]


def test_image_folder(tmp_path):
    write_image(str(tmp_path / "a.png"), "PNG", (28, 14))
    (tmp_path / "sub").mkdir()
    write_image(str(tmp_path / "sub" / "b.webp"), "WEBP", (15, 15))
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / ".hidden").write_text("skipped")
    src = open_source(str(tmp_path))
    assert isinstance(src, ImageFolderSource)
    res = src.scan(ScanOptions(progress=False))
    assert res.ids == ["a.png", "sub/b.webp"]
    assert res.image_tokens.tolist() == [2, 4] and res.text_tokens.tolist() == [0, 0]
    assert res.errors.to_dict() == {"not_an_image": {"count": 1, "first_ids": ["notes.txt"]}}


def test_synthetic_source_deterministic():
    src = open_source("synthetic:num_samples=50,seed=7,tile_distribution=geometric,tokens_per_tile=256")
    assert isinstance(src, SyntheticSource)
    a, b = src.scan(), src.scan()
    spec = synthetic.SyntheticTilesSpec(num_samples=50, seed=7, tile_distribution="geometric")
    tiles, text = synthetic.sample_shapes(spec)
    assert (a.image_tokens == tiles * 256).all() and (a.text_tokens == text).all()
    assert (a.image_tokens == b.image_tokens).all()
    assert (a.total_tokens == a.image_tokens + a.text_tokens).all()
    first = src.sample(0, with_pixels=True)  # the training members of the one Source protocol
    assert first.pixels.shape == (tiles[0], 3, 28, 28) and len(first.text) == text[0]
    assert first.image_tokens == 256 * tiles[0] and src.ids[:3] == ["0", "1", "2"]
    with pytest.raises(ValueError):
        open_source("synthetic:bogus=1")


def test_synthetic_1000_is_the_same_data_in_analyze_training_and_the_tools():
    from mmtrain.config import compose
    from mmtrain.steps.from_config import build_source, tool_config

    analyzed = open_source("synthetic:1000").scan()
    trained = build_source(compose(["data=synthetic_tiles", "data.num_samples=1000"]), 16)
    simulated = build_source(tool_config("synthetic:1000", [], []), 16)
    for src in (trained, simulated):
        assert (np.asarray(src.tiles) == analyzed.tiles).all() and (np.asarray(src.text_tokens) == analyzed.text_tokens).all()
        assert list(src.ids) == list(analyzed.ids)


def test_length_table_trains_on_its_lengths_with_its_record_ids(tmp_path):
    from mmtrain.data.sources.lengths import LengthTableSource

    path = tmp_path / "t.csv"
    path.write_text("id,tiles,image_tokens,text_tokens\nGCC_1,2,512,30\nGCC_2,0,0,7\n")
    src = LengthTableSource(str(path), tokens_per_tile=16, vocab_size=300)
    assert src.ids == ["GCC_1", "GCC_2"] and src.tiles.tolist() == [2, 0] and src.text_tokens.tolist() == [30, 7]
    a, b = src.sample(0, True), src.sample(1, True)
    assert a.image_tokens == 32 and len(a.text) == 30 and a.pixels.shape == (2, 3, 28, 28)  # tiles x 16, not 512
    assert b.tiles == 0 and b.pixels.shape[0] == 0 and len(b.text) == 7  # text only
    assert (a.text == src.sample(0, False).text).all() and src.sample(0, False).pixels is None
    assert src.scan().image_tokens.tolist() == [512, 0]  # analysis: the columns as they are


def test_exact_ranges_and_thresholds():
    """Inclusive ranges and >= thresholds are exact counts (boundaries included)."""
    v = np.array([499, 500, 1000, 1500, 1501, 2999, 3000, 3001] + [700] * 992)
    st = quantity_stats(v, parse_ranges("500-1500,3000-"), [3000, 500])
    assert st["range_counts"] == {"500-1500": 995, "3000-": 2}
    assert st["ranges"]["500-1500"] == 995 / 1000
    assert st["at_least"] == {"3000": 2, "500": 999}
    assert st["count"] == 1000 and st["min"] == 499 and st["max"] == 3001
    assert set(st["percentiles"]) == {"50", "90", "99", "99.9"}
    assert st["percentiles"]["50"] == 700
    empty = quantity_stats(np.array([], dtype=np.int64), parse_ranges("1-2"), [5])
    assert empty["count"] == 0 and empty["ranges"] == {"1-2": 0.0} and empty["at_least"] == {"5": 0}
    with pytest.raises(ValueError):
        parse_ranges("10-5")
