"""`mmtrain compare`'s table from finished runs (fake summaries): the seed's layout, every number
taken from the summaries, the loss check, swapped runs refused, the bar chart written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mmtrain import compare


def _fake_run(path: Path, packed: bool, tps: float, losses=(2.5, 2.25), padding=0.0) -> Path:
    path.mkdir(parents=True)
    (path / "summary.json").write_text(json.dumps({
        "time_per_sample_ms": tps, "steps": 100, "packing_enabled": packed, "seq_length": 8192,
        "buffer_size": 100, "world_size": 4, "dp": 4, "tp": 1, "pp": 1, "model": "llava_mistral7b_clip224",
        "losses": list(losses), "final_loss": losses[-1], "padding_fraction": padding,
    }))
    return path


def test_table_from_fake_runs(tmp_path):
    off = _fake_run(tmp_path / "off", False, 800.0, losses=(2.5, 2.25), padding=0.66)
    on = _fake_run(tmp_path / "on", True, 320.0, losses=(2.5, 2.25 * (1 + 1e-7)), padding=0.0125)
    out = tmp_path / "table"
    rc = compare.main(["h20_4gpu_dp4", "--from-dirs", str(off), str(on), "--out", str(out), "--check-loss"])
    assert rc == 0
    table = json.loads((out / "seed_table.json").read_text())
    assert table["recipe"] == "h20_4gpu_dp4" and table["cluster"] == "h20" and table["dp"] == 4
    assert table["columns"] == ["Packing sequence", "Time per sample (ms)", "Buffer size",
                                "Packing sequence length", "Sequence length", "Speedup", "Final loss", "Padding"]
    r0, r1 = table["rows"]
    assert r0 == {"packing_sequence": False, "time_per_sample_ms": 800.0, "buffer_size": None,
                  "packing_seq_length": None, "seq_length": 8192, "speedup": 1.0,
                  "final_loss": 2.25, "padding_fraction": 0.66}
    assert r1 == {"packing_sequence": True, "time_per_sample_ms": 320.0, "buffer_size": 100,
                  "packing_seq_length": 8192, "seq_length": 8192, "speedup": 2.5,
                  "final_loss": 2.25 * (1 + 1e-7), "padding_fraction": 0.0125}
    assert table["losses_agree"] is True and table["loss_max_rel_diff"] == pytest.approx(1e-7, rel=1e-3)
    md = (out / "seed_table.md").read_text()
    assert ("| Packing sequence | Time per sample (ms) | Buffer size | Packing sequence length | Sequence length "
            "| Speedup | Final loss | Padding |") in md
    assert "| No | 800.00 | - | - | 8192 | 1.00x | 2.250000 | 66.0% |" in md
    assert "| Yes | 320.00 | 100 | 8192 | 8192 | 2.50x | 2.250000 | 1.2% |" in md
    assert "losses packed vs unpacked agree" in md
    assert (out / "compare.png").stat().st_size > 10_000


def test_check_loss_fails_when_losses_differ(tmp_path):
    off = _fake_run(tmp_path / "off", False, 800.0, losses=(2.5, 2.25))
    on = _fake_run(tmp_path / "on", True, 320.0, losses=(2.5, 2.3))
    out = tmp_path / "t"
    assert compare.main(["h20_1gpu", "--from-dirs", str(off), str(on), "--out", str(out)]) == 0
    assert compare.main(["h20_1gpu", "--from-dirs", str(off), str(on), "--out", str(out), "--check-loss"]) == 1
    table = json.loads((out / "seed_table.json").read_text())
    assert table["losses_agree"] is False
    assert table["loss_max_rel_diff"] == pytest.approx(0.05 / 2.25)
    assert "losses packed vs unpacked differ" in (out / "seed_table.md").read_text()


def test_swapped_runs_are_refused(tmp_path):
    off = _fake_run(tmp_path / "off", False, 800.0)
    on = _fake_run(tmp_path / "on", True, 320.0)
    with pytest.raises(SystemExit, match="unpacked"):
        compare.main(["--recipe", "h20_1gpu", "--from-dirs", str(on), str(off), "--out", str(tmp_path / "t")])


def test_unknown_recipe_names_the_choices(tmp_path):
    with pytest.raises(SystemExit, match="h20_1gpu"):
        compare.main(["h20_1gpx", "--from-dirs", "a", "b", "--out", str(tmp_path / "t")])
