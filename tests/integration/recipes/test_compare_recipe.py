"""`mmtrain compare` end to end on the 1-GPU recipe's CPU smoke: both runs, then a table whose every
number is the runs' own summary.json value."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]


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
    for variant in ("packing_disabled", "packing_enabled"):
        lines = (tmp_path / variant / "metrics.jsonl").read_text().splitlines()
        assert len(lines) == 3 and all("time_per_sample_ms" in json.loads(x) for x in lines)
    md = (tmp_path / "seed_table.md").read_text()
    assert md.count("\n| ") == 3
    assert f"| No | {off['time_per_sample_ms']:.2f} | - | - | 512 | 1.00x | {off['final_loss']:.6f} |" in md
    assert (tmp_path / "compare.png").stat().st_size > 10_000
