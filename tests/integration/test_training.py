"""Black-box runs of `python -m mmtrain.train`: learning, packed == unpacked, metrics, config errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from mmtest_utils import REPO

SMALL = ["model=tiny", "data.num_samples=96", "data.max_tiles=4", "trainer.global_batch_size=8"]


def train(tmp_path, name: str, *overrides: str) -> list[dict]:
    out = tmp_path / name
    cmd = [sys.executable, "-m", "mmtrain.train", *SMALL, f"trainer.output_dir={out}", *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_thirty_steps_lower_the_loss(tmp_path):
    m = train(tmp_path, "learn", "trainer.max_steps=30", "trainer.lr=3e-3")
    assert len(m) == 30
    first, last = sum(r["loss"] for r in m[:3]) / 3, sum(r["loss"] for r in m[-3:]) / 3
    assert last < first - 1.0, f"loss did not drop: first {first:.3f}, last {last:.3f}"


def test_cli_packed_and_unpacked_losses_agree(tmp_path):
    """In the strict-equivalence mode a packed step holds exactly an unpacked step's samples."""
    packed = train(tmp_path, "p", "trainer.max_steps=4", "packing.enabled=true", "packing.strict_equivalence=true",
                   "trainer.log_sample_ids=true")
    unpacked = train(tmp_path, "u", "trainer.max_steps=4", "packing.enabled=false", "trainer.log_sample_ids=true")
    for p, u in zip(packed, unpacked):
        assert sorted(p["sample_ids"]) == sorted(u["sample_ids"])
        assert abs(p["loss"] - u["loss"]) <= 1e-5 * abs(u["loss"]), (p["loss"], u["loss"])
        assert p["padding_fraction"] < u["padding_fraction"]
        for key in ("step", "loss", "grad_norm", "time_per_sample_ms", "tokens_per_s", "padding_fraction"):
            assert key in p
    assert packed[0]["packs"] < unpacked[0]["packs"]


@pytest.mark.parametrize(
    "override,message",
    [("trainer.max_stepz=3", "max_stepz"), ("trainer.max_steps=abc", "max_steps"), ("recipe=no_such_recipe", "no_such_recipe"),
     ("packing.max_images_per_pack=4", "packing.max_tiles_per_pack")],
)
def test_config_errors_name_the_key(override, message):
    from mmtrain.config import compose

    with pytest.raises(Exception, match=message):
        compose([override])


def test_oversize_sample_is_an_error_naming_it(tmp_path):
    cmd = [sys.executable, "-m", "mmtrain.train", *SMALL, "packing.seq_length=64", "trainer.max_steps=1", f"trainer.output_dir={tmp_path}"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "sample" in proc.stderr and "seq_length" in proc.stderr


def test_online_calibration_is_logged_and_used(tmp_path):
    """balancing.calibrate_steps=2: after steps 1-2 (step 0 is warm-up) the cost model is fitted to the
    run's own per-rank times, logged, written to the metrics line, and costs are in seconds after."""
    m = train(tmp_path, "cal", "trainer.max_steps=4", "balancing.calibrate_steps=2", "trainer.log_interval=1")
    fitted = [r for r in m if "calibrated_cost_model" in r]
    assert [r["step"] for r in fitted] == [2]
    cm = fitted[0]["calibrated_cost_model"]
    assert cm["unit"] == "s" and cm["decoder_token"] > 0
    flops = m[0]["predicted_rank_cost"][0]
    assert m[3]["predicted_rank_cost"][0] < 1e-3 * flops  # seconds, not FLOPs, once calibrated
    assert "cost model calibrated on 2 rank-steps" in (tmp_path / "cal" / "train.log").read_text()
