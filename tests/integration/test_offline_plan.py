"""Offline plans: `mmtrain lengths` -> `mmtrain pack` -> training from PLAN.jsonl; refusal and exact resume."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from mmtest_utils import REPO

DATA = ["data.num_samples=48", "data.max_tiles=6", "trainer.global_batch_size=6"]


def run(args: list[str], env: dict | None = None, check: bool = True) -> subprocess.CompletedProcess:
    e = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", **(env or {})}
    proc = subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=600, env=e)
    if check and proc.returncode != 0:
        pytest.fail(f"{args} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return proc


@pytest.fixture(scope="module")
def plan(tmp_path_factory):
    d = tmp_path_factory.mktemp("plan")
    run(["-m", "mmtrain", "lengths", "--out", str(d / "table.csv"), *DATA])
    run(["-m", "mmtrain", "pack", str(d / "table.csv"), "--seq-length", "512", "--offline", "--out", str(d / "plan.jsonl")])
    return d / "plan.jsonl"


def metrics(out) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def test_training_follows_the_plan_and_resumes_exactly(plan, tmp_path):
    packs = [json.loads(x)["samples"] for x in plan.read_text().splitlines()]
    common = ["-m", "mmtrain.train", *DATA, f"packing.plan={plan}", "trainer.max_steps=5", "trainer.log_sample_ids=true"]
    ref = tmp_path / "ref"
    run([*common, f"trainer.output_dir={ref}"])
    m = metrics(ref)
    stream = [s for p in packs for s in p]
    seen = [s for r in m for s in r["sample_ids"]]
    assert seen == stream[: len(seen)], "steps must take the plan's packs in order"
    assert all(r["samples"] >= 6 for r in m)

    cut = tmp_path / "cut"
    proc = run([*common, f"trainer.output_dir={cut}"], env={"MMTRAIN_FAULT_INJECT": "sigterm@2"}, check=False)
    assert proc.returncode == 75, proc.stderr[-3000:]
    kept = (cut / "metrics.jsonl").read_text().splitlines()
    proc = run([*common, f"trainer.output_dir={cut}", "trainer.resume=auto"])
    assert "at step 3" in proc.stderr and json.loads((cut / "summary.json").read_text())["resumed_from_step"] == 3
    assert (cut / "metrics.jsonl").read_text().splitlines()[:3] == kept[:3], "steps before the resume were run again"
    from mmtrain.train import checkpoint as ck

    assert ck.digests(cut / "checkpoints" / "step_00000005") == ck.digests(ref / "checkpoints" / "step_00000005")
    resumed = metrics(cut)
    assert [r["sample_ids"] for r in resumed] == [r["sample_ids"] for r in m]
    assert [r["loss"] for r in resumed] == pytest.approx([r["loss"] for r in m], rel=1e-6)


def test_a_plan_for_other_data_is_refused(plan, tmp_path):
    proc = run(
        ["-m", "mmtrain.train", "data.num_samples=49", "data.max_tiles=6", f"packing.plan={plan}", "trainer.max_steps=1",
         f"trainer.output_dir={tmp_path}"],
        check=False,
    )
    assert proc.returncode != 0
    assert "fingerprint" in proc.stderr and "re-run `mmtrain pack`" in proc.stderr
