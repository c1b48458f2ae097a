"""`mmtrain analyze` end to end: outputs, exact seed-style figures, errors and --strict."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from mmtrain.analysis.stats import main


def _seed_like_table(n_in=99_400, n_low=200, n_mid=220, n_big=180) -> dict[str, np.ndarray]:
    """A LLaVA-Pretrain-shaped table: 99.4% in 500-1500 (edges included), 180 samples >= 3000."""
    rng = np.random.default_rng(0)
    image = np.concatenate(
        [
            np.r_[500, 1500, rng.integers(500, 1501, n_in - 2)],
            np.r_[499, rng.integers(1, 499, n_low - 1)],
            np.r_[1501, 2999, rng.integers(1501, 3000, n_mid - 2)],
            np.r_[3000, rng.integers(3000, 9000, n_big - 1)],
        ]
    )
    rng.shuffle(image)
    return {"image_tokens": image, "text_tokens": rng.integers(20, 80, image.size), "id": np.arange(image.size)}


def _write_table(tmp_path, cols, fmt):
    if fmt == "csv":
        p = tmp_path / "t.csv"
        names = list(cols)
        rows = np.stack([cols[k] for k in names], axis=1)
        np.savetxt(p, rows, fmt="%d", delimiter=",", header=",".join(names), comments="")
    elif fmt == "npy":
        p = tmp_path / "t.npy"
        arr = np.zeros(len(cols["image_tokens"]), dtype=[(k, np.int64) for k in cols])
        for k, v in cols.items():
            arr[k] = v
        np.save(p, arr)
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        p = tmp_path / "t.parquet"
        pq.write_table(pa.table(cols), p)
    return str(p)


@pytest.mark.parametrize("fmt", ["csv", "npy", "parquet"])
def test_length_table_seed_figures_exact(tmp_path, fmt):
    cols = _seed_like_table()
    src = _write_table(tmp_path, cols, fmt)
    out = tmp_path / "out"
    args = [src, "--out", str(out), "--ranges", "500-1500,1501-2999", "--thresholds", "3000,1501"]
    assert main(args + (["--no-plots"] if fmt != "csv" else [])) == 0
    stats = json.loads((out / "stats.json").read_text())
    img = stats["image_tokens"]
    assert img["count"] == 100_000
    assert img["ranges"]["500-1500"] == 0.994
    assert img["range_counts"] == {"500-1500": 99_400, "1501-2999": 220}
    assert img["at_least"] == {"3000": 180, "1501": 400}
    assert img["min"] == int(cols["image_tokens"].min()) and img["max"] == int(cols["image_tokens"].max())
    assert img["mean"] == pytest.approx(cols["image_tokens"].mean())
    assert img["percentiles"]["99.9"] == pytest.approx(np.percentile(cols["image_tokens"], 99.9))
    total = cols["image_tokens"] + cols["text_tokens"]
    assert stats["total_tokens"]["at_least"]["3000"] == int((total >= 3000).sum())
    assert stats["errors"] == {} and stats["samples"]["with_errors"] == 0
    if fmt == "csv":
        for q in ("image_tokens", "text_tokens", "total_tokens"):
            assert (out / f"{q}_hist.png").stat().st_size > 1000
        assert "0 with errors" not in (out / "summary.md").read_text()


def test_llava_cli_errors_and_strict(llava_dir, tmp_path):
    out = tmp_path / "out"
    args = [llava_dir["jsonl"], "--image-root", llava_dir["root"], "--out", str(out), "--no-plots"]
    assert main(args + ["--ranges", "1-100", "--thresholds", "500"]) == 0
    stats = json.loads((out / "stats.json").read_text())
    assert stats["samples"] == {"scanned": 13, "used": 4, "with_errors": 9}
    assert stats["image_tokens"]["range_counts"] == {"1-100": 3}
    assert stats["image_tokens"]["at_least"] == {"500": 1}
    assert stats["errors"]["multiple_images"] == {"count": 2, "first_ids": ["two", "twoph"]}
    assert stats["errors"]["malformed_json"]["first_ids"] == ["data.jsonl:4"]
    summary = (out / "summary.md").read_text()
    assert "excluded" in summary and "missing_image" in summary
    assert main(args + ["--strict"]) == 1
    assert main(["/nonexistent.jsonl", "--out", str(out)]) == 2


def test_cli_subprocess_dynamic_tiling(llava_dir, tmp_path):
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "mmtrain", "analyze", llava_dir["json"], "--image-root", llava_dir["root"]]
    cmd += ["--out", str(out), "--tiling", "dynamic", "--merge", "2", "--thumbnail", "--strict"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert r.returncode == 1, r.stderr  # the fixture has broken samples
    stats = json.loads((out / "stats.json").read_text())
    assert stats["accounting"]["mode"] == "dynamic"
    assert stats["image_tokens"]["min"] == 256 and stats["image_tokens"]["max"] == 13 * 256
    assert (out / "image_tokens_hist.png").exists() and (out / "summary.md").exists()
