"""`mmtrain analyze` on the training config: exactly the lengths training sees (the step stream's
lengths, `mmtrain lengths`' table), skipped samples named, aspect ratios of the real images, and
figures that read: packing.seq_length marked, legends, plain tick labels."""

from __future__ import annotations

import json

import numpy as np
import pytest

from mmtrain.analysis import report
from mmtrain.analysis.plot import pyplot
from mmtrain.analysis.stats import is_training_config, main
from mmtrain.config import compose
from mmtrain.steps.from_config import build_source, export_lengths_main

SYNTH = ["model=tiny", "data.num_samples=300", "data.max_tiles=12", "packing.seq_length=160"]


def test_mode_is_chosen_by_the_words(tmp_path):
    assert is_training_config([]) and is_training_config(["model=tiny", "data=llava_json"])
    assert not is_training_config(["data.jsonl"]) and not is_training_config(["synthetic:n=10"])
    odd = tmp_path / "a=b.csv"
    odd.write_text("image_tokens,text_tokens\n1,2\n")
    assert not is_training_config([str(odd)])  # an existing path is a SOURCE even with '=' in its name


def test_synthetic_lengths_equal_training_lengths(tmp_path):
    out = tmp_path / "out"
    assert main(["--out", str(out), *SYNTH, "--ranges", "100-200", "--thresholds", "150"]) == 0
    stats = json.loads((out / "stats.json").read_text())
    # what the step stream packs: tiles x tokens per tile (4x4 patches = 16) + text tokens
    src = build_source(compose(SYNTH), 16)
    lengths = np.asarray(src.tiles) * 16 + np.asarray(src.text_tokens)
    tot = stats["total_tokens"]
    assert tot["count"] == 300 and tot["mean"] == pytest.approx(lengths.mean())
    assert tot["min"] == lengths.min() and tot["max"] == lengths.max()
    assert tot["range_counts"] == {"100-200": int(((lengths >= 100) & (lengths <= 200)).sum())}
    assert tot["at_least"] == {"150": int((lengths >= 150).sum())}
    assert stats["image_tokens"]["max"] == 16 * int(np.max(src.tiles))
    assert stats["tiles"]["mean"] == pytest.approx(np.mean(src.tiles)) and stats["tiles"]["max"] <= 12
    pk = stats["packing"]
    assert pk["seq_length"] == 160 and pk["over_seq_length"] == int((lengths > 160).sum()) > 0
    assert pk["over_seq_length_first_ids"] == [str(i) for i in np.flatnonzero(lengths > 160)[:10]]
    assert pk["lower_bound_packs"] == -(-int(lengths.sum()) // 160)
    assert stats["accounting"]["tokens_per_tile"] == 16 and stats["source_kind"] == "training-config"
    for name in ("total_tokens_hist", "tiles_hist"):
        assert (out / f"{name}.png").stat().st_size > 10_000
    assert not (out / "aspect_ratio_hist.png").exists()  # synthetic tiles have no image sizes
    # the same numbers as a file scan of the table `mmtrain lengths` writes for these overrides
    table = tmp_path / "t.csv"
    assert export_lengths_main(["--out", str(table), *SYNTH]) == 0
    assert main([str(table), "--out", str(tmp_path / "file"), "--no-plots", "--ranges", "100-200", "--thresholds", "150"]) == 0
    from_file = json.loads((tmp_path / "file" / "stats.json").read_text())
    for q in ("image_tokens", "text_tokens", "total_tokens"):
        assert from_file[q] == stats[q]


def test_llava_training_view_tiles_skips_and_aspect(llava_dir, tmp_path):
    out = tmp_path / "out"
    ov = ["model=tiny", "data=llava_json", f"data.source={llava_dir['jsonl']}", f"data.image_root={llava_dir['root']}",
          "data.bad_sample_policy=skip", "data.max_tiles=6"]
    assert main(["--out", str(out), *ov]) == 0
    stats = json.loads((out / "stats.json").read_text())
    cfg = compose(ov)
    src = build_source(cfg, 16)
    assert stats["samples"]["used"] == len(src) == 5  # a, b, c, d and "two" (training takes several images)
    assert stats["tiles"]["mean"] == pytest.approx(np.mean(src.tiles))
    assert stats["total_tokens"]["mean"] == pytest.approx(np.mean(np.asarray(src.tiles) * 16 + src.text_tokens))
    skipped = {sid for e in stats["errors"].values() for sid in e["first_ids"]}
    assert skipped == {"missing", "trunc", "corrupt", "text", "empty", "noph", "twoph", "data.jsonl:4"}
    assert stats["samples"]["with_errors"] == 8 and stats["samples"]["scanned"] == 13
    # images a 336x336, b 100x50, c 14x14, d 700x15, and "two" = a + b
    ar = stats["aspect_ratio"]
    assert ar["count"] == 6 and ar["min"] == pytest.approx(1.0) and ar["max"] == pytest.approx(700 / 15)
    assert ar["landscape"] == 3 and ar["portrait"] == 0
    assert (out / "aspect_ratio_hist.png").stat().st_size > 10_000
    # with the default policy the first bad sample stops the analysis, as it would stop training
    assert main(["--out", str(out), *ov[:-2]]) == 2


def test_file_flags_refused_in_training_mode(tmp_path, capsys):
    assert main(["--out", str(tmp_path), "model=tiny", "--tiling", "dynamic"]) == 2
    assert "--tiling" in capsys.readouterr().err
    assert main(["--out", str(tmp_path), "model=tiny", "data.nope=1"]) == 2
    assert "data.nope" in capsys.readouterr().err


def _tick_texts(fig) -> list[str]:
    fig.canvas.draw()
    return [t.get_text() for ax in fig.axes for t in ax.get_xticklabels() + ax.get_yticklabels() if t.get_text()]


def test_histogram_marks_seq_length_with_legend_and_plain_ticks():
    rng = np.random.default_rng(0)
    values = rng.integers(300, 9000, 5000)
    fig = report.histogram_figure(values, "total_tokens", [(500, 1500)], [3000], bins=100, seq_length=8192)
    try:
        for ax in fig.axes:
            labels = [t.get_text() for t in ax.get_legend().get_texts()]
            assert any(f"packing.seq_length = 8,192 ({int((values > 8192).sum()):,} samples longer)" == x for x in labels)
            assert any(x.startswith("500-1,500: ") for x in labels) and any(x.startswith(">= 3,000: ") for x in labels)
            assert 8192 in [line.get_xdata()[0] for line in ax.get_lines()]
            assert ax.get_xlabel() and ax.get_ylabel()
        ticks = _tick_texts(fig)
        assert ticks and not any("10^" in t or "times" in t or "$" in t for t in ticks), ticks
        assert "8,000" in ticks  # thousands separators on the token axis
    finally:
        pyplot().close(fig)


def test_tiles_and_aspect_figures_read_well():
    tiles = np.r_[np.ones(50, int), np.full(30, 4), np.full(20, 12)]
    fig = report.tiles_figure(tiles, tokens_per_tile=256)
    try:
        ax = fig.axes[0]
        assert "256 image tokens each" in ax.get_xlabel()
        assert sorted(round(p.get_height()) for p in ax.patches) == [20, 30, 50]
        assert "mean 4.10 tiles" in [t.get_text() for t in ax.get_legend().get_texts()]
    finally:
        pyplot().close(fig)
    fig = report.aspect_figure(np.array([1.0, 1.0, 0.5, 2.0, 4 / 3]))
    try:
        ticks = _tick_texts(fig)
        assert {"1:2", "1:1", "2:1"} <= set(ticks)
        assert "square: 2; portrait 1; landscape 2" in [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    finally:
        pyplot().close(fig)
