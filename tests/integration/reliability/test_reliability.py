"""Issue 7: checkpoints, exact resume, preemption, faults, bad inputs (CPU, fp32, tiny model).

Black-box runs of `python -m mmtrain.train` (and torchrun), compared on the `sample_ids` and `loss`
of each metrics line against one uninterrupted reference run.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from mmtest_utils import PY, REPO, torchrun

from llava_data import make_dataset

STEPS = 12
BASE = [
    "model=tiny",
    "trainer.precision=fp32",
    "data.num_samples=64",
    "data.max_tiles=8",
    "data.max_text_tokens=48",
    "trainer.global_batch_size=8",
    "packing.buffer_size=12",  # != global batch: the online packer carries samples across steps
    "trainer.log_sample_ids=true",
    "trainer.progress_bar=off",
    f"trainer.max_steps={STEPS}",
]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
ENV.pop("MMTRAIN_FAULT_INJECT", None)


def run(out: Path, *overrides: str, env: dict | None = None, ok: bool = True, base=BASE) -> subprocess.CompletedProcess:
    cmd = [PY, "-m", "mmtrain.train", *base, f"trainer.output_dir={out}", *overrides]
    proc = subprocess.run(cmd, cwd=REPO, env={**ENV, **(env or {})}, capture_output=True, text=True, timeout=300)
    if ok and proc.returncode != 0:
        pytest.fail(f"run failed ({proc.returncode}):\n{proc.stderr[-5000:]}")
    return proc


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def same_run(got: list[dict], ref: list[dict], rel: float = 1e-6) -> None:
    assert [m["step"] for m in got] == list(range(len(ref))), "one metrics line per step, in order"
    for g, r in zip(got, ref):
        assert g["sample_ids"] == r["sample_ids"], f"step {r['step']}: samples differ"
        assert abs(g["loss"] - r["loss"]) <= rel * abs(r["loss"]), (r["step"], g["loss"], r["loss"])
    seen = [s for m in got for s in m["sample_ids"]]
    assert seen == [s for m in ref for s in m["sample_ids"]], "a sample was lost or repeated"


@pytest.fixture(scope="module")
def ref(tmp_path_factory) -> tuple[Path, list[dict]]:
    """Uninterrupted run; checkpoints every 3 steps, keep the last 2."""
    out = tmp_path_factory.mktemp("ref")
    run(out, "trainer.save_interval=3", "trainer.keep_last=2")
    return out, metrics(out)


def test_keep_last_and_complete_checkpoints(ref):
    from mmtrain.train import checkpoint as ck

    out, m = ref
    assert len(m) == STEPS
    names = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert names == ["step_00000009", "step_00000012"], names
    meta = ck.read_meta(out / "checkpoints" / "step_00000012")
    assert meta["step"] == STEPS and meta["layout"]["dp"] == 1
    assert {"epoch", "cursor", "step", "pending", "queue", "packer"} <= set(meta["data"]["steps"])


def test_sigterm_midway_then_resume_is_exact(ref, tmp_path):
    """External SIGTERM during training -> exit 75 with a checkpoint; the resumed run logs the same
    samples and losses as the uninterrupted run, one line per step."""
    out = tmp_path / "run"
    cmd = [PY, "-m", "mmtrain.train", *BASE, f"trainer.output_dir={out}"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    mfile = out / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if mfile.exists() and len(mfile.read_text().splitlines()) >= 3:
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 75, err[-3000:]
    stopped = len(metrics(out))
    assert 3 <= stopped < STEPS
    assert (out / "checkpoints" / f"step_{stopped:08d}" / "meta.json").is_file()
    assert "SIGTERM" in err and "75" in err
    r = run(out)  # trainer.resume=auto
    assert f"at step {stopped}" in r.stderr
    same_run(metrics(out), ref[1])
    assert json.loads((out / "summary.json").read_text())["resumed_from_step"] == stopped


def test_unpacked_resume_is_exact(tmp_path):
    """Packing off: SIGTERM (injected, so at a known step) at step 2, resume, compare."""
    base = [a for a in BASE if not a.startswith("trainer.max_steps")] + ["packing.enabled=false", "trainer.max_steps=5"]
    full = tmp_path / "full"
    run(full, base=base)
    out = tmp_path / "cut"
    p = run(out, base=base, env={"MMTRAIN_FAULT_INJECT": "sigterm@2"}, ok=False)
    assert p.returncode == 75, p.stderr[-3000:]
    assert len(metrics(out)) == 3
    run(out, base=base)
    same_run(metrics(out), metrics(full))


@pytest.mark.multiproc
def test_resume_on_a_different_dp_size(ref, tmp_path):
    """Checkpoint written by 1 process, resumed by 2 (DP=2): same sample sequence, same losses
    up to the DP reduction order."""
    out = tmp_path / "dp"
    run(out, "trainer.max_steps=4", "trainer.save_interval=4")
    torchrun(2, ["-m", "mmtrain.train", *BASE, f"trainer.output_dir={out}"], env={"PYTHONWARNINGS": "ignore"})
    same_run(metrics(out), ref[1], rel=1e-5)


@pytest.mark.multiproc
def test_torchrun_restarts_after_a_rank_dies(ref, tmp_path):
    """Rank 1 is SIGKILLed in step 7; torchrun --max-restarts=1 restarts both ranks, which resume
    from the step-6 checkpoint and finish: every step logged once, same samples as uninterrupted."""
    out = tmp_path / "kill"
    proc = torchrun(
        2,
        ["--max-restarts=1", "-m", "mmtrain.train", *BASE, f"trainer.output_dir={out}", "trainer.save_interval=3"],
        env={"MMTRAIN_FAULT_INJECT": "kill_rank1@7", "PYTHONWARNINGS": "ignore"},
    )
    assert "resumed from" in proc.stderr and "at step 6" in proc.stderr, proc.stderr[-3000:]
    same_run(metrics(out), ref[1], rel=1e-5)


def test_nan_loss_is_skipped_and_counted(ref, tmp_path):
    out = tmp_path / "nan"
    run(out, "trainer.max_steps=4", env={"MMTRAIN_FAULT_INJECT": "nan_loss@1"})
    m = metrics(out)
    assert m[0]["skipped_steps"] == 0 and "skipped" not in m[0]
    assert m[1]["skipped"] is True and m[1]["skipped_steps"] == 1 and m[1]["loss"] != m[1]["loss"]  # NaN
    assert m[3]["skipped_steps"] == 1
    assert m[0]["loss"] == ref[1][0]["loss"]
    # the skipped update left the parameters alone: step 2 sees step 1's model (not ref's step-2 model)
    assert m[2]["sample_ids"] == ref[1][2]["sample_ids"] and m[2]["loss"] != ref[1][2]["loss"]
    assert json.loads((out / "summary.json").read_text())["skipped_steps"] == 1


def test_consecutive_nonfinite_steps_stop_the_run(tmp_path):
    out = tmp_path / "nan3"
    p = run(out, "trainer.max_consecutive_nonfinite=3", env={"MMTRAIN_FAULT_INJECT": "nan_grad@1,nan_grad@2,inf_grad@3"}, ok=False)
    assert p.returncode != 0
    assert "3 consecutive steps with a NaN/Inf loss or gradient" in p.stderr
    assert "trainer.max_consecutive_nonfinite=3" in p.stderr
    assert [x.get("skipped", False) for x in metrics(out)] == [False, True, True, True]


def test_checkpoint_config_mismatch_is_refused(ref, tmp_path):
    out = tmp_path / "mm"
    shutil.copytree(ref[0], out)
    p = run(out, "packing.seq_length=640", "trainer.max_steps=14", ok=False)
    assert p.returncode != 0
    assert "refusing to resume" in p.stderr and "packing.seq_length: checkpoint has 512, config has 640" in p.stderr
    p = run(out, "data.num_samples=80", "trainer.max_steps=14", ok=False)
    assert "data.num_samples" in p.stderr and "length table differs" in p.stderr


def test_auto_resume_ignores_partial_checkpoints(tmp_path):
    from mmtrain.train import checkpoint as ck

    root = tmp_path / "checkpoints"
    for name, complete in (("step_00000002", True), ("step_00000004.tmp", True), ("step_00000006", False)):
        (root / name).mkdir(parents=True)
        if complete:
            (root / name / "meta.json").write_text("{}")
    assert ck.find_latest(tmp_path) == root / "step_00000002"
    assert ck.resolve_resume("auto", tmp_path) == root / "step_00000002"
    assert ck.resolve_resume("never", tmp_path) is None
    assert ck.resolve_resume(str(tmp_path), "/elsewhere") == root / "step_00000002"
    with pytest.raises(FileNotFoundError):
        ck.resolve_resume(str(tmp_path / "nope"), tmp_path)
    ck.clean_partial(tmp_path)
    assert sorted(p.name for p in root.iterdir()) == ["step_00000002"]


def test_fault_spec_parsing():
    from mmtrain.train.faults import Fault, parse

    assert parse("nan_loss@3, kill_rank1@4,sigterm@2,sigterm_rank0@5") == [
        Fault("nan_loss", 3), Fault("kill", 4, 1), Fault("sigterm", 2, None), Fault("sigterm", 5, 0)]
    with pytest.raises(ValueError, match="cannot parse"):
        parse("explode@1")


# ---- bad inputs: llava_json --------------------------------------------------------------------


def _llava_cfg(src: Path, policy: str):
    from mmtrain.config import compose

    return compose(["model=tiny", "data=llava_json", f"data.source={src}", f"data.bad_sample_policy={policy}"])


@pytest.mark.parametrize("broken,kind,file", [({"missing": (3,)}, "missing_image", "img3.png"),
                                              ({"corrupt_header": (5,)}, "not_an_image", "img5.png")])
def test_llava_bad_image_fails_naming_sample_and_file(tmp_path, broken, kind, file):
    from mmtrain.data.sources.llava_train import BadSampleError, LlavaJsonTrainSource

    src = make_dataset(tmp_path, 12, **broken)
    sid = "s" + file[3:-4]
    with pytest.raises(BadSampleError) as e:
        LlavaJsonTrainSource(_llava_cfg(src, "fail"), 16)
    msg = str(e.value)
    assert f"sample '{sid}'" in msg and file in msg and kind in msg and "data.bad_sample_policy=skip" in msg


def test_llava_decode_failure_under_fail_names_sample_and_file(tmp_path):
    from mmtrain.data.sources.llava_train import BadSampleError, LlavaJsonTrainSource

    src = make_dataset(tmp_path, 12, corrupt_body=(7,))
    s = LlavaJsonTrainSource(_llava_cfg(src, "fail"), 16)  # passes the header check
    s.sample(0, True)
    with pytest.raises(BadSampleError, match=r"sample 's7'.*img7\.png.*failed to decode"):
        s.sample(s.ids.index("s7"), True)


def test_llava_skip_policy_trains_and_counts(tmp_path):
    data = tmp_path / "data"
    src = make_dataset(data, 16, missing=(3,), corrupt_header=(5,), corrupt_body=(7,))
    out = tmp_path / "run"
    run(out, "data=llava_json", f"data.source={src}", "data.bad_sample_policy=skip", "trainer.max_steps=3",
        base=[a for a in BASE if not a.startswith(("data.", "trainer.max_steps"))])
    m = metrics(out)
    assert len(m) == 3 and all(x["loss"] == x["loss"] for x in m)
    seen = {s for x in m for s in x["sample_ids"]}
    assert seen == set(range(14)), "the 2 samples with bad headers are left out of the plan"
    assert m[-1]["skipped_samples"] == 2 and m[-1]["bad_samples"] >= 1
    summary = json.loads((out / "summary.json").read_text())
    assert summary["skipped_samples"] == 2 and summary["bad_samples"] == m[-1]["bad_samples"]
