"""The distributed optimizer (megatron's GPU default) on CPU/gloo: same losses as the plain optimizer,
and an exact resume through its DP-sharded state (incl. torch Adam's per-param step): the resumed
run names its step, keeps the lines before it, and ends with the same parameter and Adam-state
digests as the uninterrupted run."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from mmtest_utils import REPO, free_port

ARGS = ["-m", "mmtrain.train", "trainer.max_steps=5", "data.num_samples=64", "data.max_tiles=8",
        "trainer.global_batch_size=8", "trainer.log_sample_ids=true"]


def torchrun(out, *extra, env=None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
           *ARGS, f"trainer.output_dir={out}", *extra]
    e = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", **(env or {})}
    return subprocess.run(cmd, cwd=REPO, env=e, capture_output=True, text=True, timeout=600)


def metrics(out) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.multiproc
def test_distributed_optimizer_matches_and_resumes_exactly(tmp_path):
    plain = torchrun(tmp_path / "plain")
    assert plain.returncode == 0, plain.stderr[-3000:]
    ref = torchrun(tmp_path / "ref", "parallel.use_distributed_optimizer=true")
    assert ref.returncode == 0, ref.stderr[-3000:]
    a, b = metrics(tmp_path / "plain"), metrics(tmp_path / "ref")
    assert [r["loss"] for r in b] == pytest.approx([r["loss"] for r in a], rel=1e-6)

    cut = tmp_path / "cut"
    stopped = torchrun(cut, "parallel.use_distributed_optimizer=true", env={"MMTRAIN_FAULT_INJECT": "sigterm@2"})
    assert stopped.returncode != 0 and (cut / "checkpoints" / "step_00000003").is_dir()
    kept = (cut / "metrics.jsonl").read_text().splitlines()
    assert len(kept) == 3
    resumed = torchrun(cut, "parallel.use_distributed_optimizer=true")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "at step 3" in resumed.stderr and json.loads((cut / "summary.json").read_text())["resumed_from_step"] == 3
    assert (cut / "metrics.jsonl").read_text().splitlines()[:3] == kept, "steps before the resume were run again"
    c = metrics(cut)
    assert [r["sample_ids"] for r in c] == [r["sample_ids"] for r in b]
    assert [r["loss"] for r in c] == [r["loss"] for r in b]  # bit-identical after the resume
    from mmtrain.train import checkpoint as ck

    final = [d / "checkpoints" / "step_00000005" for d in (cut, tmp_path / "ref")]
    got, want = ck.digests(final[0]), ck.digests(final[1])
    assert any(k.endswith("/exp_avg_sq") for k in want) and got == want
