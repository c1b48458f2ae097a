"""mmtrain.launch.torchrun: commands, exit codes (preemption code 75 survives torchrun), signals, DP4 smoke."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[3]
LAUNCH = [sys.executable, "-m", "mmtrain.launch.torchrun"]
FAKE = ["--module", "tests.integration.launch.fake_train"]


def _run(args, env=None, timeout=120):
    return subprocess.run(LAUNCH + args, cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          env=dict(os.environ, **(env or {})))


def test_dry_run_single_node_uses_recipe_shape():
    res = _run(["--recipe", "h20_4gpu_dp4", "--dry-run", "scale=smoke"])
    assert res.returncode == 0, res.stderr
    assert "world=4 TP=1 PP=1 DP=4" in res.stdout
    assert "--nproc-per-node=4" in res.stdout and "--standalone" in res.stdout
    assert "recipe=h20_4gpu_dp4 scale=smoke" in res.stdout


def test_dry_run_multi_node_c10d():
    res = _run(["--recipe", "h20_4gpu_dp4", "--dry-run", "--nnodes", "2", "--nproc-per-node", "8",
                "--rdzv-endpoint", "node0:29500", "--rdzv-id", "job7", "parallel=tp2"])
    assert res.returncode == 0, res.stderr
    assert "world=16 TP=2 PP=1 DP=8" in res.stdout
    for flag in ("--nnodes=2", "--rdzv-backend=c10d", "--rdzv-endpoint=node0:29500", "--rdzv-id=job7"):
        assert flag in res.stdout
    assert "--standalone" not in res.stdout


def test_bad_config_and_recipe_fail_clearly():
    res = _run(["--recipe", "h20_1gpu", "--dry-run", "trainer.max_steps=ten"])
    assert res.returncode != 0 and "trainer.max_steps" in res.stderr
    res = _run(["--recipe", "h20_9gpu", "--dry-run"])
    assert res.returncode != 0 and "h20_9gpu" in res.stderr
    res = _run(["--recipe", "h20_4gpu_dp4", "--dry-run", "--nproc-per-node", "3", "parallel=tp2"])
    assert res.returncode != 0 and "not a multiple" in res.stderr


@pytest.mark.multiproc
@pytest.mark.parametrize("code", [75, 3])
def test_worker_exit_code_survives_torchrun(tmp_path, code):
    res = _run(["--recipe", "h20_4gpu_dp4", "--nproc-per-node", "2", *FAKE, "scale=smoke",
                f"trainer.output_dir={tmp_path}"], env={"MMTRAIN_FAKE": f"exit:{code}"})
    assert res.returncode == code, res.stdout[-2000:] + res.stderr[-2000:]


@pytest.mark.multiproc
def test_usr1_reaches_every_rank_and_exits_75(tmp_path):
    env = dict(os.environ, MMTRAIN_FAKE="preempt")
    env.pop("SLURM_STEP_ID", None)
    proc = subprocess.Popen(LAUNCH + ["--recipe", "h20_4gpu_dp4", "--nproc-per-node", "2", *FAKE, "scale=smoke",
                                      f"trainer.output_dir={tmp_path}"],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    events = tmp_path / "events.txt"
    deadline = time.time() + 60
    while time.time() < deadline and (not events.exists() or events.read_text().count("ready") < 2):
        time.sleep(0.1)
    proc.send_signal(signal.SIGUSR1)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 75, out[-3000:]
    assert events.read_text().count(" usr1") == 2


@pytest.mark.multiproc
def test_dp4_cpu_smoke_with_torchrun(tmp_path):
    """The DP4 recipe's CPU smoke: 4 gloo ranks, tiny model."""
    res = _run(["--recipe", "h20_4gpu_dp4", "scale=smoke", f"trainer.output_dir={tmp_path}"],
               timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert (summary["world_size"], summary["dp"], summary["tp"], summary["pp"]) == (4, 4, 1, 1)
    assert summary["packing_enabled"] is True and summary["seq_length"] == 512
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == summary["steps"] == 4
    assert all(x["time_per_sample_ms"] > 0 for x in lines)


@pytest.mark.multiproc
def test_two_nodes_meet_at_one_c10d_endpoint(tmp_path):
    """Multi-node launch as on Slurm (one launcher per node, c10d rendezvous at the first node):
    two launchers on this host join one endpoint and train DP2 together."""
    from mmtest_utils import free_port

    port = free_port()
    args = ["--recipe", "h20_4gpu_dp4", "--nnodes", "2", "--nproc-per-node", "1", "--rdzv-endpoint", f"127.0.0.1:{port}",
            "--rdzv-id", "two-nodes", "scale=smoke", f"trainer.output_dir={tmp_path}", "trainer.max_steps=2"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    procs = [subprocess.Popen(LAUNCH + args, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(o[-3000:] for o in outs)
    assert all("--rdzv-backend=c10d" in o and "--nnodes=2" in o for o in outs)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert (summary["world_size"], summary["dp"], summary["steps"]) == (2, 2, 2)
