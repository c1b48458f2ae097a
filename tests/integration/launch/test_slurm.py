"""mmtrain.launch.slurm: the generated script (dry run) and, on a real local Slurm, the DP4 CPU smoke
recipe submitted end to end plus a preemption -> exit 75 -> requeue -> finish round trip.

The requeue round trip releases Slurm's requeue hold (BeginTime ~2 min) itself, but only a few
seconds after the requeue: a job started again within the same second as its requeue gets its new
credential refused by slurmd ("Job credential revoked") and ends FAILED. Any terminal state other
than COMPLETED fails the test at once with slurmctld's and slurmd's logs."""

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
                  "packing=disabled", "trainer.output_dir=/scratch/run 1", "trainer.wandb='a b'"])
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
    assert "recipe=h20_4gpu_dp4 packing=disabled 'trainer.output_dir=/scratch/run 1' 'trainer.wandb='\"'\"'a b'\"'\"''" in s
    assert subprocess.run(["bash", "-n"], input=s, text=True).returncode == 0


def test_dry_run_cpu_script_requests_no_gpus():
    res = _slurm(["--recipe", "h20_4gpu_dp4", "--dry-run", "scale=smoke"])
    assert res.returncode == 0, res.stderr
    assert "--gpus-per-node" not in res.stdout and "--nproc-per-node 4" in res.stdout


def test_dry_run_resources_port_python_and_workdir():
    res = _slurm(["--recipe", "h20_4gpu_dp4", "--nodes", "2", "--exclusive", "--cpus-per-task", "16", "--mem", "0",
                  "--venv", ".venv", "--workdir", "/shared/mmtrain", "--dry-run", "scale=smoke"])
    assert res.returncode == 0, res.stderr
    s = res.stdout
    for line in ("#SBATCH --exclusive", "#SBATCH --cpus-per-task=16", "#SBATCH --mem=0", "#SBATCH --nodes=2"):
        assert line in s
    assert "MASTER_PORT=$(( 20000 + SLURM_JOB_ID % 10000 ))" in s  # per job: two jobs on a node do not collide
    assert "cd /shared/mmtrain " in s and "PYTHON=${MMTRAIN_PYTHON:-.venv/bin/python}" in s
    assert '"$PYTHON" -m mmtrain.launch.torchrun' in s and str(REPO) not in s.split("#SBATCH --output")[0]
    assert '--nnodes "$SLURM_JOB_NUM_NODES"' in s and '--rdzv-id "$SLURM_JOB_ID"' in s
    fixed = _slurm(["--recipe", "h20_4gpu_dp4", "--master-port", "29400", "--python", "/opt/py/bin/python3", "--dry-run"])
    assert "MASTER_PORT=29400" in fixed.stdout and "PYTHON=${MMTRAIN_PYTHON:-/opt/py/bin/python3}" in fixed.stdout
    both = _slurm(["--recipe", "h20_4gpu_dp4", "--python", "p", "--venv", "v", "--dry-run"])
    assert both.returncode != 0 and "not both" in both.stderr
    # the job's shell runs the script: it computes the port from the job id
    port = subprocess.run(["bash", "-c", "SLURM_JOB_ID=123457; echo $(( 20000 + SLURM_JOB_ID % 10000 ))"],
                          capture_output=True, text=True).stdout.strip()
    assert port == "23457"


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
    res = _slurm(["--recipe", "h20_4gpu_dp4", "--time", "00:10:00", "--wait", "scale=smoke",
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


BAD_END = {"FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "BOOT_FAIL", "OUT_OF_MEMORY", "DEADLINE", "PREEMPTED"}


def _tail(path: Path, n: int = 60) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-n:]) if path.is_file() else f"({path} absent)"


def _fail_with_logs(state: Path, out: Path, info: dict, why: str) -> None:
    job_logs = "".join(p.read_text(errors="replace") for p in (out / "slurm").glob("*.out")) if (out / "slurm").exists() else ""
    events = (out / "events.txt").read_text() if (out / "events.txt").exists() else ""
    pytest.fail(f"{why}\njob: {info}\n--- slurmctld.log ---\n{_tail(state / 'log' / 'slurmctld.log')}\n"
                f"--- slurmd.log ---\n{_tail(state / 'log' / 'slurmd.log', 30)}\n--- job output ---\n{job_logs[-3000:]}\n"
                f"--- events ---\n{events}", pytrace=False)


@pytest.mark.slurm
@pytest.mark.multiproc
def test_preemption_signal_requeues_and_finishes(local_slurm, tmp_path):
    """SIGUSR1 to the batch script (what --signal=B:USR1@120 does) -> ranks exit 75 -> requeue -> done."""
    out = tmp_path / "run"
    res = _slurm(["--recipe", "h20_4gpu_dp4", "--nodes", "1", "--gpus-per-node", "2", "--time", "00:10:00",
                  "--train-module", "tests.integration.launch.fake_train", "scale=smoke",
                  f"trainer.output_dir={out}"], env={"MMTRAIN_FAKE": "preempt"})
    assert res.returncode == 0, res.stderr
    job = _job_id(res.stdout)
    events = out / "events.txt"
    deadline = time.time() + 90
    while time.time() < deadline and (not events.exists() or events.read_text().count("ready") < 2):
        info = _scontrol(job)
        if info.get("JobState") in BAD_END:
            _fail_with_logs(local_slurm, out, info, "the job ended before its ranks were ready")
        time.sleep(0.2)
    if not events.exists() or events.read_text().count("ready") != 2:
        _fail_with_logs(local_slurm, out, _scontrol(job), "the ranks never became ready")
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], check=True)
    # Release the requeued job from Slurm's hold (BeginTime, ~2 min), a few seconds after its requeue.
    requeued_at = None
    released = False
    deadline = time.time() + 120
    while time.time() < deadline:
        info = _scontrol(job)
        state = info.get("JobState")
        if state in BAD_END:
            _fail_with_logs(local_slurm, out, info, f"the job ended {state} instead of being requeued and finishing")
        if info.get("Restarts") == "1":
            if state == "COMPLETED":
                break
            if state == "PENDING" and not released:
                requeued_at = requeued_at or time.time()
                if time.time() - requeued_at >= 3.0:
                    subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], check=False)
                    released = True
        time.sleep(0.5)
    info = _scontrol(job)
    if info.get("JobState") != "COMPLETED" or info.get("Restarts") != "1":
        _fail_with_logs(local_slurm, out, info, "the requeued job did not complete within 120 s")
    text = events.read_text()
    assert text.count("restart0 usr1") == 2 and text.count("restart1 done") == 2, text
    assert json.loads((out / "summary.json").read_text())["restart"] == 1
    log = "".join(p.read_text() for p in (out / "slurm").glob("*.out"))
    assert "[slurm] preempted: requeueing job" in log and "preempted: exiting 75" in log
