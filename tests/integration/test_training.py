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
    assert [p["step"] for p in packed] == [u["step"] for u in unpacked] == [0, 1, 2, 3]
    for p, u in zip(packed, unpacked, strict=True):
        assert len(p["sample_ids"]) == len(u["sample_ids"]) == 8 and sorted(p["sample_ids"]) == sorted(u["sample_ids"])
        assert p["samples"] == u["samples"] == 8 and p["loss_tokens"] == u["loss_tokens"] > 0
        assert abs(p["loss"] - u["loss"]) <= 1e-5 * abs(u["loss"]), (p["loss"], u["loss"])
        assert abs(p["grad_norm"] - u["grad_norm"]) <= 1e-4 * u["grad_norm"], (p["grad_norm"], u["grad_norm"])
        assert p["padding_fraction"] < u["padding_fraction"]
        for key in ("step", "loss", "grad_norm", "time_per_sample_ms", "tokens_per_s", "padding_fraction"):
            assert key in p
    assert packed[0]["packs"] < unpacked[0]["packs"]


@pytest.mark.parametrize(
    "override,message",
    [("trainer.max_stepz=3", "trainer.max_stepz: no such config key in trainer (did you mean trainer.max_steps?)"),
     ("+trainer.max_stepz=3", "trainer.max_stepz: no such config key in trainer (did you mean trainer.max_steps?)"),
     ("trainer.max_steps=abc", "trainer.max_steps: Value 'abc' of type 'str' could not be converted to Integer"),
     ("recipe=no_such_recipe", "recipe=no_such_recipe: no such recipe config (choose one of: h20_1gpu, h20_4gpu_dp4, llava7b_clip224_h20x1_tp1pp1dp1, llava7b_clip224_h20x4_tp1pp1dp4, qwen25vl7b_native_h100x8_tp2pp1dp4)"),
     ("packing.max_images_per_pack=4", "packing.max_images_per_pack was renamed or removed: use packing.max_tiles_per_pack")],
)
def test_config_errors_name_the_key(override, message):
    """Our own ConfigError, its message starting with the key: not Hydra's error (which would echo
    the override anyway), and a `+key` forced into the schema is refused, never carried and ignored."""
    from mmtrain.config import ConfigError, compose

    with pytest.raises(ConfigError) as err:
        compose([override])
    assert type(err.value) is ConfigError and str(err.value) == message


def test_oversize_sample_is_an_error_naming_it(tmp_path):
    """One record longer than packing.seq_length: the run stops before any step with an error that
    names its record id, its length (3 tiles x 16 tokens + 40 text = 88, counted here) and the keys
    that fix it; nothing is silently truncated or dropped."""
    table = tmp_path / "t.csv"
    table.write_text("id,tiles,text_tokens\nok-0,1,20\nok-1,0,30\nbig-2,3,40\nok-3,2,10\n")
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "mmtrain.train", "model=tiny", "data=lengths", f"data.source={table}",
           "packing.seq_length=64", "trainer.global_batch_size=2", "trainer.max_steps=1", f"trainer.output_dir={out}"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"})
    assert proc.returncode == 1, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("ValueError: ")]
    assert errors == [
        "ValueError: sample 'big-2' (index 2) is oversize: 88 tokens > 64 that fit a pack (capacity 64, segment_align 1, "
        "pack_align 1); raise packing.seq_length (now 64) to at least 88, or set packing.oversize_policy=truncate|drop"
    ], proc.stderr[-3000:]
    metrics = out / "metrics.jsonl"
    assert not metrics.exists() or metrics.read_text() == "", "a step ran before the error"


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
