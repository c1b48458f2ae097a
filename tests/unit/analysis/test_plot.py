"""`mmtrain plot`: every figure drawn from the metrics it is about (the series' colours are on the
PNG, not only axes), straggler and resumed-run handling, clear errors for a folder without metrics."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from mmtrain.analysis.plot import main, plot_run, read_metrics, si

TAB = {"blue": (31, 119, 180), "orange": (255, 127, 14), "green": (44, 160, 44), "red": (214, 39, 40),
       "purple": (148, 103, 189), "brown": (140, 86, 75), "cyan": (23, 190, 207)}


def _metrics(run, steps=30, ranks=4, **extra):
    rng = np.random.default_rng(0)
    run.mkdir(parents=True, exist_ok=True)
    with open(run / "metrics.jsonl", "w") as f:
        for s in range(steps):
            rank_ms = (100 + 20 * rng.random(ranks)).tolist()
            rec = {"step": s, "loss": 5.0 - 0.05 * s + 0.1 * rng.random(), "samples": 16, "step_time_s": 0.5 + 0.1 * rng.random(),
                   "tokens_per_s": 4000 + 500 * rng.random(), "padding_fraction": 0.1 * rng.random(), "packs": 9,
                   "rank_compute_ms": rank_ms, "predicted_rank_cost": (1e9 * (1 + 0.1 * rng.random(ranks))).tolist()}
            f.write(json.dumps(rec | {k: v(s) for k, v in extra.items()}) + "\n")
    (run / "summary.json").write_text(json.dumps({"model": "tiny", "packing_enabled": True, "world_size": ranks,
                                                  "tp": 1, "pp": 1, "dp": ranks, "warmup_steps_excluded": 1}))
    return run


def _share(path, colour) -> float:
    im = np.asarray(Image.open(path).convert("RGB")).astype(int)
    return float(np.mean(np.abs(im - np.array(colour)).sum(axis=2) < 40))


def test_figures_show_their_series(tmp_path):
    run = _metrics(tmp_path / "run")
    paths = plot_run(run, tmp_path / "out")
    assert [p.name for p in paths] == ["loss.png", "throughput.png", "rank_compute.png", "padding.png"]
    expect = {"loss.png": ["blue", "orange"],  # per step + moving average (30 >= 20 steps)
              "throughput.png": ["blue", "green"],
              "rank_compute.png": ["blue", "orange", "green", "red", "purple"],  # ranks 0-2, measured, predicted
              "padding.png": ["brown", "cyan"]}
    for p in paths:
        for colour in expect[p.name]:
            assert _share(p, TAB[colour]) > 5e-4, (p.name, colour)


def test_logged_straggler_preferred_and_many_ranks_as_image(tmp_path):
    run = _metrics(tmp_path / "run", steps=5, ranks=32, straggler_measured=lambda s: 1.3, straggler_predicted=lambda s: 1.01)
    paths = plot_run(run, tmp_path / "out")
    rc = next(p for p in paths if p.name == "rank_compute.png")
    assert _share(rc, TAB["red"]) > 5e-4 and _share(rc, TAB["purple"]) > 5e-4


def test_resumed_run_keeps_the_last_record_of_a_step(tmp_path):
    run = _metrics(tmp_path / "run", steps=4)
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 2, "loss": 9.0, "samples": 16, "step_time_s": 0.5}\n{"step": 3, "lo')  # re-done step, cut line
    recs = read_metrics(run)
    assert [r["step"] for r in recs] == [0, 1, 2, 3] and recs[2]["loss"] == 9.0


def test_errors_name_the_problem(tmp_path, capsys):
    assert main([str(tmp_path / "nope")]) == 2
    assert "metrics.jsonl not found" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "metrics.jsonl").write_text("")
    assert main([str(tmp_path / "empty")]) == 2
    assert "no step records" in capsys.readouterr().err


@pytest.mark.parametrize("x,text", [(0, "0"), (2, "2"), (1500, "1.5k"), (2.5e6, "2.5M"), (0.25, "0.25"), (8192, "8.19k")])
def test_tick_labels_are_plain(x, text):
    assert si(x) == text
