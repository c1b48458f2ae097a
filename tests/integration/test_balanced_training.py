"""DP4 training on a length table (tiny model, torchrun, gloo, 2 packs per rank), black-box from
metrics.jsonl: every rank works in every step, each sample once per epoch, the predicted straggler
is what `mmtrain simulate` prints for the same overrides (<= 1.01), the losses equal one process's;
and a DP4 run from a `mmtrain pack --dp 4 --micro-batches 2` plan runs each rank's planned samples."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import defaultdict

import numpy as np
import pytest

from mmtest_utils import REPO, torchrun

from mmtrain.data.synthetic import stress_shapes, write_length_table

STEPS = 6


@pytest.fixture(scope="module")
def table(tmp_path_factory):
    """A real-table-like mix (1-6 tiles, text-only rows, long-tailed text), record ids as strings."""
    d = tmp_path_factory.mktemp("balanced")
    tiles, text = stress_shapes("mixed_vlm", 100, 1, 16, 512)
    assert (tiles == 0).any()
    path = d / "table.csv"
    write_length_table(path, tiles, text, ids=[f"id-{i:03d}" for i in range(len(tiles))])
    return path


def overrides(table) -> list[str]:
    return ["model=tiny", "data=lengths", f"data.source={table}", "trainer.global_batch_size=8",
            "trainer.micro_batch_size=1", "trainer.log_sample_ids=true", "trainer.progress_bar=off"]


def mmtrain(*args: str) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, "-m", "mmtrain", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def metrics(out) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.multiproc
def test_dp4_every_rank_works_each_sample_once_straggler_equals_simulate(table, tmp_path):
    ovr = overrides(table)
    out = tmp_path / "dp4"
    torchrun(4, ["-m", "mmtrain.train", *ovr, f"trainer.max_steps={STEPS}", f"trainer.output_dir={out}"])
    m = metrics(out)
    assert [r["step"] for r in m] == list(range(STEPS))
    ids = [line.split(",")[0] for line in table.read_text().splitlines()[1:]]
    per_epoch: dict[int, list[str]] = defaultdict(list)
    for r in m:
        assert len(r["rank_sample_ids"]) == 4 and all(r["rank_sample_ids"]), "a rank idled"
        assert len(r["predicted_rank_cost"]) == 4 and min(r["predicted_rank_cost"]) > 0
        assert len(r["rank_compute_ms"]) == 4 and r["straggler_measured"] >= 1.0
        assert r["packs"] == 8 and r["samples"] == sum(map(len, r["rank_sample_ids"]))
        per_epoch[r["epoch"]] += [s for rank in r["rank_sample_ids"] for s in rank]
    assert len(per_epoch) == 2, "the run crosses an epoch"
    for e, seen in per_epoch.items():
        assert len(seen) == len(set(seen)), f"a sample ran twice in epoch {e}"
    assert sorted(per_epoch[0]) == sorted(ids), "epoch 0 ran every sample"
    ratios = [max(r["predicted_rank_cost"]) / np.mean(r["predicted_rank_cost"]) for r in m]
    assert [r["straggler_predicted"] for r in m] == pytest.approx(ratios)
    sim = json.loads(mmtrain("simulate", "--dp", "4", *ovr, f"trainer.max_steps={STEPS}").strip().splitlines()[-1])
    assert sim["steps"] == STEPS and sim["packs"] == 8 * STEPS
    assert sim["straggler"] == pytest.approx(float(np.mean(ratios)), rel=1e-12)
    assert sim["straggler"] <= 1.01
    # a step's samples do not depend on the DP size: one process computes the same losses
    one = tmp_path / "one"
    torchrun(1, ["-m", "mmtrain.train", *ovr, "trainer.max_steps=2", f"trainer.output_dir={one}"])
    for a, b in zip(metrics(one), m):
        assert sorted(a["rank_sample_ids"][0]) == sorted(s for rank in b["rank_sample_ids"] for s in rank)
        assert abs(a["loss"] - b["loss"]) <= 1e-5 * abs(a["loss"]), (a["loss"], b["loss"])
        assert abs(a["grad_norm"] - b["grad_norm"]) <= 1e-4 * a["grad_norm"]


@pytest.mark.multiproc
def test_dp4_from_a_plan_runs_each_ranks_planned_samples(table, tmp_path):
    plan = tmp_path / "plan.jsonl"
    summary = json.loads(mmtrain("pack", str(table), "--dp", "4", "--micro-batches", "2", "--out", str(plan)).splitlines()[-1])
    assert summary["straggler"] <= 1.01
    want: dict = defaultdict(list)
    for d in sorted((json.loads(x) for x in plan.read_text().splitlines()),
                    key=lambda d: (d["step"], d["rank"], d["micro_batch"], d["pack"])):
        want[(d["step"], d["rank"])] += d["samples"]
    out = tmp_path / "run"
    torchrun(4, ["-m", "mmtrain.train", *overrides(table), f"packing.plan={plan}", "trainer.max_steps=3",
                 f"trainer.output_dir={out}"])
    m = metrics(out)
    assert len(m) == 3
    for r in m:
        assert r["rank_sample_ids"] == [want[(r["step"], k)] for k in range(4)], r["step"]
