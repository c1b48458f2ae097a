"""mmtrain.launch.slurm: the generated script (dry run) and, on a real local Slurm, the DP4 CPU smoke
recipe submitted end to end plus a preemption -> exit 75 -> requeue -> finish round trip."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[3]
SLURM_PY = [sys.executable, "-m", "mmtrain.launch.slurm"]


def _slurm(args, timeout=120, env=None):
    return subprocess.run(SLURM_PY + args, cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          env=dict(os.environ, **(env or {})))


def test_dry_run_gpu_script():
    res = _slurm(["--recipe", "h20_4gpu_dp4", "--nodes", "2", "--partition", "h20", "--time", "01:00:00",
                  "--container-image", "nvcr.io/nvidia/pytorch:25.01-py3", "--dry-run",
                  "packing=disabled", "trainer.output_dir=/scratch/run 1", "+foo='a b'"])
    assert res.returncode == 0, res.stderr
    s = res.stdout
    assert s.startswith("#!/bin/bash\n")
    for line in ("#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=1", "#SBATCH --gpus-per-node=4",
                 "#SBATCH --partition=h20", "#SBATCH --time=01:00:00", "#SBATCH --signal=B:USR1@120",
                 "#SBATCH --requeue"):
        assert line in s
    assert 'MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)' in s
    assert "srun " in s and "-m mmtrain.launch.torchrun" in s and "--container-image=nvcr.io/nvidia/pytorch:25.01-py3" in s
    assert '--rdzv-endpoint "$MASTER_ADDR:$MASTER_PORT"' in s and "--nproc-per-node 4" in s
    assert "trap 'forward USR1' USR1" in s and "PREEMPT_EXIT_CODE=75" in s and "scontrol requeue" in s
    # overrides pass through unchanged (shell-quoted)
    assert "recipe=h20_4gpu_dp4 packing=disabled 'trainer.output_dir=/scratch/run 1' '+foo='\"'\"'a b'\"'\"''" in s
    assert subprocess.run(["bash", "-n"], input=s, text=True).returncode == 0


def test_dry_run_cpu_script_requests_no_gpus():
    res = _slurm(["--recipe", "h20_4gpu_dp4", "--dry-run", "model=tiny", "cluster=cpu"])
    assert res.returncode == 0, res.stderr
    assert "--gpus-per-node" not in res.stdout and "--nproc-per-node 4" in res.stdout


def test_dry_run_rejects_bad_overrides():
    res = _slurm(["--recipe", "h20_4gpu_dp4", "--dry-run", "trainer.max_stepz=3"])
    assert res.returncode != 0 and "trainer.max_stepz" in res.stderr


def _job_id(stdout: str) -> str:
    return stdout.split("submitted job ", 1)[1].split(":", 1)[0]


def _scontrol(job: str) -> dict:
    out = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True).stdout
    return dict(t.split("=", 1) for t in out.split() if "=" in t)


@pytest.mark.slurm
@pytest.mark.multiproc
def test_dp4_cpu_smoke_through_slurm(local_slurm, tmp_path):
    out = tmp_path / "run"
    res = _slurm(["--recipe", "h20_4gpu_dp4", "--time", "00:10:00", "--wait", "model=tiny", "cluster=cpu",
                  f"trainer.output_dir={out}"], timeout=400)
    logs = "".join(p.read_text() for p in (out / "slurm").glob("*.out")) if (out / "slurm").exists() else ""
    assert res.returncode == 0, res.stdout + res.stderr + logs[-4000:]
    job = _job_id(res.stdout)
    info = _scontrol(job)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", info
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["world_size"], summary["dp"], summary["tp"], summary["pp"]) == (4, 4, 1, 1)
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == list(range(summary["steps"])) and summary["steps"] == 4
    assert all(x["time_per_sample_ms"] > 0 and x["samples"] > 0 for x in lines)
    assert "[launch] worker exit codes: rank0=0 rank1=0 rank2=0 rank3=0" in logs


@pytest.mark.slurm
@pytest.mark.multiproc
def test_preemption_signal_requeues_and_finishes(local_slurm, tmp_path):
    """SIGUSR1 to the batch script (what --signal=B:USR1@120 does) -> ranks exit 75 -> requeue -> done."""
    out = tmp_path / "run"
    res = _slurm(["--recipe", "h20_4gpu_dp4", "--nodes", "1", "--gpus-per-node", "2", "--time", "00:10:00",
                  "--train-module", "tests.integration.launch.fake_train", "model=tiny", "cluster=cpu",
                  f"trainer.output_dir={out}"], env={"MMTRAIN_FAKE": "preempt"})
    assert res.returncode == 0, res.stderr
    job = _job_id(res.stdout)
    events = out / "events.txt"
    deadline = time.time() + 90
    while time.time() < deadline and (not events.exists() or events.read_text().count("ready") < 2):
        time.sleep(0.2)
    assert events.exists() and events.read_text().count("ready") == 2, _scontrol(job)
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], check=True)
    # Slurm holds a requeued job back ~2 minutes (BeginTime); release it as soon as it is requeued.
    deadline = time.time() + 120
    while time.time() < deadline:
        info = _scontrol(job)
        if info.get("Restarts") == "1" and info.get("JobState") == "PENDING":
            subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], check=False)
        if info.get("Restarts") == "1" and info.get("JobState") == "COMPLETED":
            break
        time.sleep(0.5)
    info = _scontrol(job)
    text = events.read_text()
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", (info, text)
    assert text.count("restart0 usr1") == 2 and text.count("restart1 done") == 2, text
    assert json.loads((out / "summary.json").read_text())["restart"] == 1
    log = "".join(p.read_text() for p in (out / "slurm").glob("*.out"))
    assert "[slurm] preempted: requeueing job" in log and "preempted: exiting 75" in log
