"""`mmtrain compare` end to end on the 1-GPU recipe's CPU smoke: both runs, then a table whose every
number is the runs' own summary.json value."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[3]


def check_run(lines: list[dict], summary: dict) -> None:
    """A run's summary and metrics lines agree with each other, recomputed here: one line per step,
    ms per sample of each line = its step time / its samples, the summary's = the same over the steps
    after the warm-up step, its losses the lines' losses."""
    assert [x["step"] for x in lines] == list(range(summary["steps"]))
    for x in lines:
        assert x["samples"] > 0 and x["loss"] == x["loss"] and x["loss_tokens"] > 0
        assert x["time_per_sample_ms"] == pytest.approx(1000.0 * x["step_time_s"] / x["samples"], rel=1e-9)
    timed = lines[1:]
    want = 1000.0 * sum(x["step_time_s"] for x in timed) / sum(x["samples"] for x in timed)
    assert summary["time_per_sample_ms"] == pytest.approx(want, rel=1e-9)
    assert summary["losses"] == [x["loss"] for x in lines] and summary["final_loss"] == lines[-1]["loss"]


def test_compare_on_cpu_smoke(tmp_path):
    """Both packing variants of h20_1gpu at scale=smoke, then the table and the chart."""
    res = subprocess.run([sys.executable, "-m", "mmtrain", "compare", "h20_1gpu", "scale=smoke",
                          "trainer.max_steps=3", "--out", str(tmp_path)],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    table = json.loads((tmp_path / "seed_table.json").read_text())
    off, on = table["rows"]
    assert off["packing_sequence"] is False and on["packing_sequence"] is True
    assert on["buffer_size"] == 16 and on["packing_seq_length"] == 512
    assert off["time_per_sample_ms"] > 0 and on["time_per_sample_ms"] > 0 and off["speedup"] == 1.0
    summaries = [json.loads((tmp_path / v / "summary.json").read_text()) for v in ("packing_disabled", "packing_enabled")]
    assert [s["packing_enabled"] for s in summaries] == [False, True]
    for row, s in zip((off, on), summaries):
        assert row["time_per_sample_ms"] == s["time_per_sample_ms"]
        assert row["final_loss"] == s["final_loss"] == s["losses"][-1]
        assert row["padding_fraction"] == s["padding_fraction"]
        assert row["seq_length"] == s["seq_length"] == 512
    assert on["buffer_size"] == summaries[1]["buffer_size"]
    assert on["speedup"] == summaries[0]["time_per_sample_ms"] / summaries[1]["time_per_sample_ms"]
    assert table["steps"] == summaries[1]["steps"] == 3 and table["model"] == "tiny" and table["cluster"] == "cpu"
    # padded to 512, the unpacked run computes padding; the packed one (buffer 16 > batch 2) almost none
    assert off["padding_fraction"] > 0.3 and on["padding_fraction"] < off["padding_fraction"]
    metrics = {}
    for variant in ("packing_disabled", "packing_enabled"):
        lines = (tmp_path / variant / "metrics.jsonl").read_text().splitlines()
        assert len(lines) == 3 and all("time_per_sample_ms" in json.loads(x) for x in lines)
        metrics[variant] = [json.loads(x) for x in lines]
    for m, s in zip((metrics["packing_disabled"], metrics["packing_enabled"]), summaries, strict=True):
        check_run(m, s)
    # unpacked: a step is global_batch_size=2 samples, one row each; packed: 2 packs holding >= 2 samples
    assert [x["samples"] for x in metrics["packing_disabled"]] == [2, 2, 2]
    assert all(x["packs"] == 2 and x["samples"] >= 2 for x in metrics["packing_enabled"])
    # the table's loss comparison is the one computed here from the two runs' per-step losses
    diffs = [abs(a["loss"] - b["loss"]) / abs(a["loss"]) for a, b in zip(*metrics.values(), strict=True)]
    assert table["loss_max_rel_diff"] == pytest.approx(max(diffs), rel=1e-12)
    assert table["losses_agree"] is (max(diffs) <= 1e-5)
    md = (tmp_path / "seed_table.md").read_text()
    assert md.count("\n| ") == 3
    assert f"| No | {off['time_per_sample_ms']:.2f} | - | - | 512 | 1.00x | {off['final_loss']:.6f} |" in md
    assert (tmp_path / "compare.png").stat().st_size > 10_000


def test_compare_check_loss_runs_both_layouts_on_the_same_samples(tmp_path):
    """What `make demo` runs (no recipe, --check-loss): the packed run in the strict-equivalence mode
    sees each unpacked step's samples, so the per-step losses (and step-0 grad norm) agree; the table
    says so, and the runs' own metrics say the same when compared here."""
    res = subprocess.run([sys.executable, "-m", "mmtrain", "compare", "model=tiny", "trainer.max_steps=2", "trainer.precision=fp32",
                          "trainer.log_sample_ids=true", "--check-loss", "--out", str(tmp_path)],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    table = json.loads((tmp_path / "seed_table.json").read_text())
    runs = [[json.loads(x) for x in (tmp_path / v / "metrics.jsonl").read_text().splitlines()]
            for v in ("packing_disabled", "packing_enabled")]
    summaries = [json.loads((tmp_path / v / "summary.json").read_text()) for v in ("packing_disabled", "packing_enabled")]
    for m, s in zip(runs, summaries, strict=True):
        check_run(m, s)
    off, on = runs
    assert len(off) == len(on) == 2 and [r["final_loss"] for r in table["rows"]] == [off[-1]["loss"], on[-1]["loss"]]
    for a, b in zip(off, on, strict=True):
        assert sorted(a["sample_ids"]) == sorted(b["sample_ids"]) and len(a["sample_ids"]) == a["samples"] > 0
        assert b["packs"] < a["packs"] == a["samples"]
        assert abs(a["loss"] - b["loss"]) <= 1e-5 * abs(a["loss"]), (a["loss"], b["loss"])
    assert abs(off[0]["grad_norm"] - on[0]["grad_norm"]) <= 1e-5 * off[0]["grad_norm"]
    assert table["losses_agree"] is True and table["loss_max_rel_diff"] <= 1e-5
    assert "Per-step losses packed vs unpacked agree" in (tmp_path / "seed_table.md").read_text()
