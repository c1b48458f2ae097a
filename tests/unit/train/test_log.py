"""The run reporter: step lines (what they show, when, where), TensorBoard events that read back,
W&B through its API, nothing from ranks other than 0, handlers gone after the run."""

from __future__ import annotations

import logging
import sys
import types

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from mmtrain.config import compose
from mmtrain.train.log import LOGGER, RunLog, format_line, require_wandb


def _rec(step, loss=2.0, **kw):
    rec = {"step": step, "loss": loss, "grad_norm": 0.5, "lr": 1e-3, "samples": 8, "step_time_s": 0.5,
           "tokens_per_s": 4000.0, "padding_fraction": 0.25, "rank_compute_ms": [100.0, 120.0]}
    return rec | kw


def test_line_shows_what_the_record_holds():
    line = format_line([_rec(0)], 10)
    assert line.startswith("step 1/10 | loss 2.0000 | lr 1.000e-03 | grad norm 0.500 | 16.00 samples/s | "
                           "4.00k tokens/s | padding 25.0%")
    for absent in ("straggler", "MFU", "memory", "ETA", "data wait", "bubble"):
        assert absent not in line
    full = _rec(9, straggler_predicted=1.02, straggler_measured=1.1, predicted_bubble=0.125, mfu=0.351,
                data_wait_ms=1.5, max_memory_reserved_gb=64.3, skipped=True)
    line = format_line([full], 10, eta_s=3725)
    for part in ("step 10/10", "straggler predicted 1.020 measured 1.100", "bubble 12.5%", "MFU 35.1%",
                 "data wait 1.5 ms", "memory max_memory_reserved 64.30 GB", "update skipped", "ETA 1:02:05"):
        assert part in line, (part, line)


def test_interval_means_and_rates():
    a = _rec(3, loss=2.0, samples=8, step_time_s=1.0, tokens_per_s=1000.0, mfu=0.2, max_memory_allocated_bytes=2**30)
    b = _rec(4, loss=3.0, samples=8, step_time_s=3.0, tokens_per_s=3000.0, mfu=0.4, max_memory_allocated_bytes=3 * 2**30)
    line = format_line([a, b], 5)
    # loss and MFU: means of the steps; samples/s and tokens/s: totals over the total time; memory: the max
    assert "loss 2.5000" in line and "MFU 30.0%" in line
    assert "4.00 samples/s" in line and "2.50k tokens/s" in line
    assert "max_memory_allocated 3.00 GiB" in line and line.startswith("step 5/5")


def _cfg(**trainer):
    return compose([f"trainer.{k}={v}" for k, v in trainer.items()])


def _lines(text):
    return [line.split("] ", 1)[1] for line in text.splitlines() if "] step " in line]


def test_lines_at_interval_first_and_last_in_stdout_and_train_log(tmp_path, capsys):
    cfg = _cfg(log_interval=2, max_steps=5)
    with RunLog(cfg, tmp_path, is_rank0=True) as log:
        for s in range(5):
            log.step(_rec(s, loss=float(s)))
    out = _lines(capsys.readouterr().out)
    assert [x.split(" |")[0] for x in out] == ["step 1/5", "step 2/5", "step 4/5", "step 5/5"]
    assert "loss 2.5000" in out[2]  # steps 3 and 4 (losses 2 and 3)
    assert _lines((tmp_path / "train.log").read_text()) == out
    assert not logging.getLogger(LOGGER).handlers  # removed at exit


def test_tensorboard_events_read_back(tmp_path):
    cfg = _cfg(log_interval=0, max_steps=3)
    with RunLog(cfg, tmp_path, is_rank0=True) as log:
        for s in range(3):
            log.step(_rec(s, loss=1.0 + s, straggler_measured=1.5, rank_compute_ms=[10.0, 30.0]))
    ea = EventAccumulator(str(tmp_path))
    ea.Reload()
    tags = set(ea.Tags()["scalars"])
    assert {"train/loss", "train/lr", "throughput/samples_per_s", "balance/straggler_measured",
            "rank_compute_ms/rank1", "rank_compute_ms/max"} <= tags
    assert [(e.step, e.value) for e in ea.Scalars("train/loss")] == [(1, 1.0), (2, 2.0), (3, 3.0)]
    assert [e.value for e in ea.Scalars("rank_compute_ms/rank1")] == [30.0] * 3
    assert [e.value for e in ea.Scalars("throughput/samples_per_s")] == [16.0] * 3
    assert not (tmp_path / "train.log").read_text().strip()  # log_interval=0: no lines


def test_tensorboard_off_and_other_ranks_silent(tmp_path, capsys):
    with RunLog(_cfg(tensorboard="false"), tmp_path / "a", is_rank0=True) as log:
        log.step(_rec(0))
    assert not list((tmp_path / "a").glob("events.out.tfevents.*"))
    with RunLog(_cfg(), tmp_path / "b", is_rank0=False) as log:
        log.step(_rec(0))
        log.info("hello")
    assert not (tmp_path / "b").exists()
    assert "hello" not in capsys.readouterr().out


def test_wandb_when_asked(tmp_path, monkeypatch):
    calls = []

    class Run:
        def log(self, data, step):
            calls.append(("log", step, data["train/loss"]))

        def finish(self):
            calls.append(("finish",))

    def init(**kw):
        calls.append(("init", kw["project"], kw["dir"], kw["config"]["trainer"]["max_steps"]))
        return Run()

    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=init))
    cfg = _cfg(wandb="myproj", max_steps=2, tensorboard="false")
    with RunLog(cfg, tmp_path, is_rank0=True) as log:
        log.step(_rec(0, loss=4.0))
        log.step(_rec(1, loss=3.0))
    assert calls == [("init", "myproj", str(tmp_path), 2), ("log", 1, 4.0), ("log", 2, 3.0), ("finish",)]


def test_wandb_asked_but_missing_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import fails
    with pytest.raises(ValueError, match="needs the wandb package"):
        require_wandb(_cfg(wandb="p"))
    assert require_wandb(_cfg()) is None
