"""The seed table writer (on fake runs) and the runner end to end on the 1-GPU recipe's CPU smoke."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(REPO / "recipes"))
import seed_table  # noqa: E402


def _fake_run(path: Path, packed: bool, tps: float) -> Path:
    path.mkdir(parents=True)
    (path / "summary.json").write_text(json.dumps({
        "time_per_sample_ms": tps, "steps": 100, "packing_enabled": packed, "seq_length": 8192,
        "buffer_size": 100, "world_size": 4, "dp": 4, "tp": 1, "pp": 1, "model": "llava_mistral7b_clip224",
    }))
    return path


def test_table_from_fake_runs(tmp_path):
    off = _fake_run(tmp_path / "off", False, 800.0)
    on = _fake_run(tmp_path / "on", True, 320.0)
    out = tmp_path / "table"
    rc = seed_table.main(["--recipe", "h20_4gpu_dp4", "--from-dirs", str(off), str(on), "--out", str(out)])
    assert rc == 0
    table = json.loads((out / "seed_table.json").read_text())
    assert table["recipe"] == "h20_4gpu_dp4" and table["cluster"] == "h20" and table["dp"] == 4
    assert table["columns"] == ["Packing sequence", "Time per sample (ms)", "Buffer size",
                                "Packing sequence length", "Sequence length", "Speedup"]
    r0, r1 = table["rows"]
    assert r0 == {"packing_sequence": False, "time_per_sample_ms": 800.0, "buffer_size": None,
                  "packing_seq_length": None, "seq_length": 8192, "speedup": 1.0}
    assert r1 == {"packing_sequence": True, "time_per_sample_ms": 320.0, "buffer_size": 100,
                  "packing_seq_length": 8192, "seq_length": 8192, "speedup": 2.5}
    md = (out / "seed_table.md").read_text()
    assert "| Packing sequence | Time per sample (ms) | Buffer size | Packing sequence length | Sequence length | Speedup |" in md
    assert "| No | 800.00 | - | - | 8192 | 1.00x |" in md
    assert "| Yes | 320.00 | 100 | 8192 | 8192 | 2.50x |" in md


def test_swapped_runs_are_refused(tmp_path):
    off = _fake_run(tmp_path / "off", False, 800.0)
    on = _fake_run(tmp_path / "on", True, 320.0)
    with pytest.raises(SystemExit, match="unpacked"):
        seed_table.main(["--recipe", "h20_1gpu", "--from-dirs", str(on), str(off), "--out", str(tmp_path / "t")])


def test_runner_on_cpu_smoke(tmp_path):
    """Both packing variants of h20_1gpu with model=tiny cluster=cpu, then the table."""
    res = subprocess.run([sys.executable, "recipes/seed_table.py", "--recipe", "h20_1gpu", "model=tiny",
                          "cluster=cpu", "trainer.max_steps=3", "--out", str(tmp_path)],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    table = json.loads((tmp_path / "seed_table.json").read_text())
    off, on = table["rows"]
    assert off["packing_sequence"] is False and on["packing_sequence"] is True
    assert on["buffer_size"] == 16 and on["packing_seq_length"] == 512
    assert off["time_per_sample_ms"] > 0 and on["time_per_sample_ms"] > 0 and off["speedup"] == 1.0
    for variant in ("packing_disabled", "packing_enabled"):
        lines = (tmp_path / variant / "metrics.jsonl").read_text().splitlines()
        assert len(lines) == 3 and all("time_per_sample_ms" in json.loads(x) for x in lines)
    assert (tmp_path / "seed_table.md").read_text().count("\n| ") == 3
