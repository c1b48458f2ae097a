"""Training on a real GPU: the tiny VLM trains on CUDA in bf16 by default (torch_varlen attention,
fused kernels, sync-free rope, the step feed pinning and copying on a side stream), and the hot-path
switches give the same losses as the plain path. Each run is a fresh `python -m mmtrain.train`
process. 2-process runs skip on a one-GPU machine. Run by bench/gpu_check.sh."""

from __future__ import annotations

import json
import os
import subprocess

import pytest
import torch

from mmtest_utils import PY, REPO, free_port

pytestmark = pytest.mark.gpu

TINY = ["model=tiny", "trainer.max_steps=4", "trainer.global_batch_size=8", "packing.buffer_size=8", "data.num_samples=64",
        "trainer.log_interval=1", "trainer.save_final=false", "trainer.tensorboard=false", "trainer.lr=0"]


def _train(tmp_path, name, extra, nproc=1, timeout=240):
    out = tmp_path / name
    args = [*TINY, f"trainer.output_dir={out}", *extra]
    if nproc == 1:
        cmd = [PY, "-m", "mmtrain.train", *args]
    else:
        cmd = [PY, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={free_port()}", "-m", "mmtrain.train", *args]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert proc.returncode == 0, f"{name} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((out / "summary.json").read_text())
    return recs, summary, proc.stdout + proc.stderr


def _losses(recs):
    return [r["loss"] for r in recs]


def _close(a, b, rel):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert abs(x - y) <= rel * abs(y), (a, b)


def test_tiny_run_on_cuda_defaults_to_bf16_fast_path(tmp_path):
    recs, summary, log = _train(tmp_path, "default", [])
    assert summary["device"].startswith("cuda") and summary["precision"] == "bf16"
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in recs)
    assert all("data_wait_ms" in r for r in recs)
    assert "attention=torch_varlen" in log or "attention=flash_attn" in log, log[-2000:]  # not sdpa / reference


def test_hot_path_switches_keep_the_losses(tmp_path):
    """lr=0: every step sees the initial model, so the losses compare step by step (bf16 noise)."""
    fast, _, _ = _train(tmp_path, "fast", [])
    plain, _, _ = _train(tmp_path, "plain", ["perf.rope=megatron", "perf.fuse=false", "perf.prefetch=false"])
    _close(_losses(fast), _losses(plain), 2e-2)


def test_compiled_layers_at_a_static_token_count(tmp_path):
    comp, _, log = _train(tmp_path, "compiled", ["perf.compile=layers", "packing.pad_to=seq_length"], timeout=420)
    eager, _, _ = _train(tmp_path, "eager", ["packing.pad_to=seq_length"])
    _close(_losses(comp), _losses(eager), 2e-2)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="gpu: DP2 needs two CUDA devices")
def test_dp2_on_two_gpus_matches_one(tmp_path):
    one, _, _ = _train(tmp_path, "dp1", [])
    two, _, _ = _train(tmp_path, "dp2", [], nproc=2)
    _close(_losses(two), _losses(one), 2e-2)
