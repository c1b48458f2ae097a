"""A run a user can watch without a terminal: per-step lines on stdout (a file, as in a Slurm log)
and in train.log, TensorBoard events in the run folder, `mmtrain plot` PNGs, few warning lines."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import numpy as np
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from mmtest_utils import REPO, free_port

STEP = re.compile(r"^\[[0-9: -]+\] step (\d+)/(\d+) \| loss ([0-9.]+) \| lr \S+ \| grad norm ([0-9.]+) \| "
                  r"[0-9.]+ samples/s \| \S+ tokens/s \| padding [0-9.]+% \| .*ETA \d+:\d\d:\d\d$")


def _step_lines(text: str) -> list[re.Match]:
    return [m for m in map(STEP.match, text.splitlines()) if m]


def _warning_lines(text: str) -> list[str]:
    return [x for x in text.splitlines() if re.search(r"warn", x, re.IGNORECASE)]


def _run(cmd: list[str], tmp_path, name: str) -> tuple[str, str]:
    """Run with stdout and stderr redirected to files: no terminal anywhere."""
    out, err = tmp_path / f"{name}.out", tmp_path / f"{name}.err"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"} | {"OMP_NUM_THREADS": "1"}
    with open(out, "w") as fo, open(err, "w") as fe:
        rc = subprocess.run(cmd, cwd=REPO, stdout=fo, stderr=fe, stdin=subprocess.DEVNULL, env=env, timeout=300).returncode
    assert rc == 0, out.read_text()[-3000:] + err.read_text()[-3000:]
    return out.read_text(), err.read_text()


def test_run_without_terminal_lines_tensorboard_plots(tmp_path):
    run = tmp_path / "run"
    stdout, stderr = _run([sys.executable, "-m", "mmtrain.train", "model=tiny", "data.num_samples=64",
                           "trainer.global_batch_size=8", "trainer.max_steps=5", "trainer.log_interval=2",
                           f"trainer.output_dir={run}"], tmp_path, "train")
    metrics = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 5
    lines = _step_lines(stdout)
    assert [int(m[1]) for m in lines] == [1, 2, 4, 5] and all(m[2] == "5" for m in lines)
    # each line's loss is the mean over the steps since the previous line; grad norm the last step's
    groups = [[0], [1], [2, 3], [4]]
    for m, g in zip(lines, groups):
        assert m[3] == f"{np.mean([metrics[i]['loss'] for i in g]):.4f}"
        assert m[4] == f"{metrics[g[-1]]['grad_norm']:.3f}"
    log = (run / "train.log").read_text()
    assert [m[0] for m in _step_lines(log)] == [m[0] for m in lines]
    assert "done: 5 steps" in log
    assert len(_warning_lines(stderr)) <= 3, stderr

    ea = EventAccumulator(str(run))
    ea.Reload()
    assert list(run.glob("events.out.tfevents.*"))
    losses = [(e.step, e.value) for e in ea.Scalars("train/loss")]
    assert [s for s, _ in losses] == [1, 2, 3, 4, 5]
    np.testing.assert_allclose([v for _, v in losses], [r["loss"] for r in metrics], rtol=1e-6)
    assert {"throughput/tokens_per_s", "data/padding_fraction", "rank_compute_ms/rank0"} <= set(ea.Tags()["scalars"])

    plots = tmp_path / "plots"
    stdout, stderr = _run([sys.executable, "-m", "mmtrain", "plot", str(run), "--out", str(plots)], tmp_path, "plot")
    names = {"loss.png", "throughput.png", "rank_compute.png", "padding.png"}
    assert {p.name for p in plots.iterdir()} == names and len(stdout.splitlines()) == 4
    for name in names:
        im = np.asarray(Image.open(plots / name).convert("RGB"))
        assert im.shape[0] >= 400 and im.shape[1] >= 800, name
        # non-trivial: drawn lines in several colours, not a blank canvas
        colours = len(np.unique(im.reshape(-1, 3), axis=0))
        inked = np.mean(im.min(axis=2) < 200)
        assert colours > 100 and 0.01 < inked < 0.6, (name, colours, inked)
    assert not _warning_lines(stderr)


def test_dp2_only_rank0_reports(tmp_path):
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
           "-m", "mmtrain.train", "model=tiny", "data.num_samples=32", "trainer.global_batch_size=8",
           "trainer.max_steps=2", "trainer.log_interval=1", f"trainer.output_dir={run}"]
    stdout, stderr = _run(cmd, tmp_path, "dp2")
    assert [int(m[1]) for m in _step_lines(stdout)] == [1, 2]  # once each, not once per rank
    assert [int(m[1]) for m in _step_lines((run / "train.log").read_text())] == [1, 2]
    assert len(list(run.glob("events.out.tfevents.*"))) == 1
    assert "world=2 (TP1 PP1 DP2)" in stdout
    assert len(_warning_lines(stderr)) <= 3, stderr
