"""Plan files: `mmtrain pack --dp R --micro-batches M` -> training runs exactly the plan (each step,
each rank, the plan's packs in its micro-batch order), resumes exactly, and refuses a plan made for
other data or another layout, naming both."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import defaultdict

import pytest

from mmtest_utils import REPO

from mmtrain.data.synthetic import stress_shapes, write_length_table

SMALL = ["model=tiny", "trainer.global_batch_size=4", "trainer.progress_bar=off"]


def run(args: list[str], env: dict | None = None, check: bool = True) -> subprocess.CompletedProcess:
    e = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", **(env or {})}
    proc = subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=600, env=e)
    if check and proc.returncode != 0:
        pytest.fail(f"{args} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return proc


def plan_by_step_rank(plan) -> dict:
    """(step, rank) -> record ids in micro-batch order, read straight from PLAN.jsonl."""
    lines = [json.loads(x) for x in plan.read_text().splitlines()]
    out: dict = defaultdict(list)
    for d in sorted(lines, key=lambda d: (d["step"], d["rank"], d["micro_batch"], d["pack"])):
        out[(d["step"], d["rank"])] += d["samples"]
    return out


@pytest.fixture(scope="module")
def table(tmp_path_factory):
    d = tmp_path_factory.mktemp("plan")
    tiles, text = stress_shapes("mixed_vlm", 70, 5, 16, 512)
    path = d / "table.csv"
    write_length_table(path, tiles, text, ids=[f"rec-{i:03d}" for i in range(len(tiles))])
    return path


@pytest.fixture(scope="module")
def plan(table):
    out = table.parent / "plan.jsonl"
    run(["-m", "mmtrain", "pack", str(table), "--dp", "1", "--micro-batches", "4", "--buffer-size", "40", "--out", str(out)])
    return out


def metrics(out) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def test_training_runs_the_plan_exactly_and_resumes_exactly(table, plan, tmp_path):
    want = plan_by_step_rank(plan)
    common = ["-m", "mmtrain.train", *SMALL, "data=lengths", f"data.source={table}", f"packing.plan={plan}",
              "trainer.max_steps=5", "trainer.log_sample_ids=true"]
    ref = tmp_path / "ref"
    run([*common, f"trainer.output_dir={ref}"])
    m = metrics(ref)
    steps = max(s for s, _ in want) + 1
    for r in m:
        assert r["rank_sample_ids"] == [want[(r["step"] % steps, 0)]], r["step"]
        assert r["packs"] == 4
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
    assert [r["rank_sample_ids"] for r in resumed] == [r["rank_sample_ids"] for r in m]
    assert [r["loss"] for r in resumed] == pytest.approx([r["loss"] for r in m], rel=1e-6)


def test_a_plan_for_other_data_is_refused(plan, tmp_path):
    other = tmp_path / "other.csv"
    tiles, text = stress_shapes("mixed_vlm", 71, 5, 16, 512)
    write_length_table(other, tiles, text)
    proc = run(["-m", "mmtrain.train", *SMALL, "data=lengths", f"data.source={other}", f"packing.plan={plan}",
                "trainer.max_steps=1", f"trainer.output_dir={tmp_path}"], check=False)
    assert proc.returncode != 0
    assert "fingerprint" in proc.stderr and "re-run `mmtrain pack`" in proc.stderr


def test_a_plan_for_another_layout_is_refused_naming_both(table, plan):
    from mmtrain.config import compose
    from mmtrain.steps.from_config import build_source, build_stream

    cfg = compose([*SMALL, "data=lengths", f"data.source={table}", f"packing.plan={plan}", "trainer.global_batch_size=8"])
    with pytest.raises(ValueError) as err:
        build_stream(cfg, build_source(cfg, 16), 16, dp=2, pp=1)
    msg = str(err.value)
    assert "made for DP 1 x 4 micro-batches" in msg and "this run has DP 2 x 4 micro-batches" in msg
