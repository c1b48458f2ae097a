"""Checkpoints, exact resume, preemption, faults, bad inputs (CPU, fp32, tiny model).

Black-box runs of `python -m mmtrain.train` (and torchrun), compared on the `sample_ids` and `loss`
of each metrics line against one uninterrupted reference run. A resume must prove it resumed: the
step it names (stderr, summary), the metrics lines before it kept byte for byte (a rerun from step
0 rewrites them, with other timings), and the final checkpoint's parameter and Adam-state digests
equal to the uninterrupted run's. Resumes at other TP / PP / DP: test_resharding.py.
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

from ckpt_checks import same_state, state
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


def lines(out: Path) -> list[str]:
    return (out / "metrics.jsonl").read_text().splitlines()


def digests(out: Path, step: int) -> dict[str, str]:
    from mmtrain.train import checkpoint as ck

    d = ck.digests(out / "checkpoints" / f"step_{step:08d}")
    assert any(k.startswith("optim/") for k in d) and any(k.endswith("/exp_avg_sq") for k in d)
    return d


def proves_resume(out: Path, proc: subprocess.CompletedProcess, start: int, kept: list[str]) -> None:
    """The run resumed at `start`: it says so, and the lines of the steps before it are untouched."""
    assert "resumed from" in proc.stderr and f"at step {start}" in proc.stderr, proc.stderr[-2000:]
    assert json.loads((out / "summary.json").read_text())["resumed_from_step"] == start
    assert lines(out)[:start] == kept[:start], "metrics lines before the resume point were rewritten"


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
    path = out / "checkpoints" / "step_00000012"
    meta = ck.read_meta(path)
    assert meta["step"] == STEPS and meta["layout"] == {"tp": 1, "pp": 1, "dp": 1, "world_size": 1}
    assert {"epoch", "cursor", "step", "pending", "queue", "packer"} <= set(meta["data"]["steps"])
    assert ck.validate(path) is None and set(meta["files"]) == {".metadata", "__0_0.distcp"}
    assert meta["bytes"] == sum((path / f).stat().st_size for f in meta["files"])
    stored = ck.stored_tensors(path)  # full tensors by global name
    assert stored["model/language_model.decoder.layers.1.mlp.linear_fc1.weight"][0] == (256, 64)
    assert stored["optim/language_model.decoder.layers.1.mlp.linear_fc1.weight/exp_avg"][0] == (256, 64)
    # every checkpoint is reported in the metrics line of its step, with its bytes and time
    saved = [x["checkpoint"] for x in m if "checkpoint" in x]
    assert [c["step"] for c in saved] == [3, 6, 9, 12] and all(c["bytes"] > 0 and c["save_s"] > 0 for c in saved)
    assert saved[-1]["bytes"] == meta["bytes"] and saved[-1]["reason"] == "final"


def test_sigterm_midway_then_resume_is_exact(ref, tmp_path):
    """External SIGTERM during training -> exit 75 with a checkpoint saved within
    trainer.preempt_save_budget_s (its time and bytes in the metrics); the resumed run logs the same
    samples and losses as the uninterrupted run, one line per step, and ends in the same state."""
    out = tmp_path / "run"
    cmd = [PY, "-m", "mmtrain.train", *BASE, f"trainer.output_dir={out}", "trainer.save_interval=3"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    mfile = out / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if mfile.exists() and len(mfile.read_text().splitlines()) >= 4:
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 75, err[-3000:]
    stopped = len(metrics(out))
    assert 4 <= stopped < STEPS
    assert (out / "checkpoints" / f"step_{stopped:08d}" / "meta.json").is_file()
    assert "SIGTERM" in err and "75" in err and f"checkpoint step_{stopped:08d} saved in" in err
    last = metrics(out)[-1]["checkpoint"]
    if isinstance(last, list):
        last = last[-1]
    assert last["reason"] == "preempt" and last["step"] == stopped and last["bytes"] > 0
    assert last["within_budget"] and last["save_s"] <= last["budget_s"] == 30.0
    kept = lines(out)
    r = run(out, "trainer.save_interval=3")  # trainer.resume=auto
    proves_resume(out, r, stopped, kept)
    same_run(metrics(out), ref[1])
    assert digests(out, STEPS) == digests(ref[0], STEPS), "final parameters / Adam state differ from the uninterrupted run"


def test_unpacked_resume_is_exact(tmp_path):
    """Packing off: SIGTERM (injected, so at a known step) at step 2, resume, compare."""
    base = [a for a in BASE if not a.startswith("trainer.max_steps")] + ["packing.enabled=false", "trainer.max_steps=5"]
    full = tmp_path / "full"
    run(full, base=base)
    out = tmp_path / "cut"
    p = run(out, base=base, env={"MMTRAIN_FAULT_INJECT": "sigterm@2"}, ok=False)
    assert p.returncode == 75, p.stderr[-3000:]
    assert len(metrics(out)) == 3
    kept = lines(out)
    r = run(out, base=base)
    proves_resume(out, r, 3, kept)
    same_run(metrics(out), metrics(full))
    assert digests(out, 5) == digests(full, 5)


@pytest.mark.multiproc
def test_rank_killed_during_async_save_resumes_from_the_previous_checkpoint(ref, tmp_path):
    """trainer.async_save: rank 1 is SIGKILLed while writing checkpoint step 6 in the background;
    torchrun --max-restarts=1 restarts both ranks, which skip the half-written step 6 and resume
    from step 3: every step logged once, the uninterrupted run's samples and losses, its final
    state (up to the DP2 reduction order)."""
    out = tmp_path / "kill"
    proc = torchrun(
        2,
        ["--max-restarts=1", "-m", "mmtrain.train", *BASE, f"trainer.output_dir={out}", "trainer.save_interval=3",
         "trainer.async_save=true", "trainer.keep_last=3"],
        env={"MMTRAIN_FAULT_INJECT": "kill_save_rank1@6", "PYTHONWARNINGS": "ignore"},
    )
    assert "resumed from" in proc.stderr and "step_00000003 at step 3" in proc.stderr, proc.stderr[-3000:]
    assert json.loads((out / "summary.json").read_text())["resumed_from_step"] == 3
    same_run(metrics(out), ref[1], rel=1e-5)
    names = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert names == ["step_00000006", "step_00000009", "step_00000012"], names  # step 6 written again, no .tmp left
    same_state(state(out / "checkpoints" / "step_00000012"), state(ref[0] / "checkpoints" / "step_00000012"))


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
    assert not (out / "checkpoints").exists(), "no checkpoint of a run that stops on NaN/Inf"


def test_checkpoint_config_mismatch_is_refused(ref, tmp_path):
    out = tmp_path / "mm"
    shutil.copytree(ref[0], out)
    p = run(out, "packing.seq_length=640", "trainer.max_steps=14", ok=False)
    assert p.returncode != 0
    assert "refusing to resume" in p.stderr and "packing.seq_length: checkpoint has 512, config has 640" in p.stderr
    p = run(out, "data.num_samples=80", "trainer.max_steps=14", ok=False)
    assert "data.num_samples" in p.stderr and "length table differs" in p.stderr


def test_auto_resume_skips_partial_and_corrupt_checkpoints(ref, tmp_path):
    """resume=auto: a half-written folder (`.tmp`) is never used and is cleaned up; a committed
    checkpoint whose data file was altered is skipped with a warning naming it; the run resumes from
    the previous one and ends exactly like the uninterrupted run."""
    out = tmp_path / "run"
    shutil.copytree(ref[0], out)
    root = out / "checkpoints"
    shutil.copytree(root / "step_00000012", root / "step_00000015.tmp")  # a save cut short before its commit
    (root / "step_00000015.tmp" / "meta.json").unlink()
    data = root / "step_00000012" / "__0_0.distcp"
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0xFF  # same size, one byte changed
    data.write_bytes(bytes(raw))
    kept = lines(out)
    r = run(out)
    assert f"skipping checkpoint {root / 'step_00000012'}" in r.stderr and "checksum" in r.stderr, r.stderr[-3000:]
    proves_resume(out, r, 9, kept)
    same_run(metrics(out), ref[1])
    assert digests(out, STEPS) == digests(ref[0], STEPS)
    assert sorted(p.name for p in root.iterdir()) == ["step_00000009", "step_00000012"]


def test_validate_names_what_is_wrong(ref, tmp_path):
    from mmtrain.train import checkpoint as ck

    src = ref[0] / "checkpoints" / "step_00000012"
    cases = {}
    for case in ("missing", "truncated", "no_meta", "other_step"):
        d = tmp_path / case / "checkpoints" / "step_00000012"
        shutil.copytree(src, d)
        cases[case] = d
    (cases["missing"] / "__0_0.distcp").unlink()
    with open(cases["truncated"] / "__0_0.distcp", "r+b") as f:
        f.truncate(100)
    (cases["no_meta"] / "meta.json").unlink()
    moved = cases["other_step"].with_name("step_00000013")
    cases["other_step"].rename(moved)
    assert ck.validate(cases["missing"]) == "__0_0.distcp is missing"
    assert ck.validate(cases["truncated"]).startswith("__0_0.distcp has 100 bytes")
    assert ck.validate(cases["no_meta"]) == "no meta.json (never committed)"
    assert ck.validate(moved) == "meta.json says step 12, the folder step 13"
    with pytest.raises(ck.CheckpointCorruptError, match="__0_0.distcp is missing"):
        ck.choose_checkpoint(str(cases["missing"]), tmp_path)  # an explicit path is used only if valid
    assert ck.choose_checkpoint("auto", tmp_path / "truncated") is None  # nothing valid: start fresh
    assert ck.choose_checkpoint("never", ref[0]) is None
    with pytest.raises(FileNotFoundError):
        ck.choose_checkpoint(str(tmp_path / "nope"), tmp_path)


def test_fault_spec_parsing():
    from mmtrain.train.faults import Fault, parse

    assert parse("nan_loss@3, kill_rank1@4,sigterm@2,sigterm_rank0@5,kill_save_rank1@6") == [
        Fault("nan_loss", 3), Fault("kill", 4, 1), Fault("sigterm", 2, None), Fault("sigterm", 5, 0), Fault("kill_save", 6, 1)]
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
    assert seen == {f"s{i}" for i in range(16)} - {"s3", "s5"}, "the 2 samples with bad headers are left out of the plan"
    assert m[-1]["skipped_samples"] == 2 and m[-1]["bad_samples"] >= 1
    summary = json.loads((out / "summary.json").read_text())
    assert summary["skipped_samples"] == 2 and summary["bad_samples"] == m[-1]["bad_samples"]
    report = [json.loads(line) for line in (out / "data_report.jsonl").read_text().splitlines()]
    by_id = {r["id"]: r for r in report}
    assert by_id["s3"]["action"] == "skipped" and "missing_image" in by_id["s3"]["reason"]
    assert by_id["s5"]["action"] == "skipped" and "img5.png" in by_id["s5"]["file"]
    assert by_id["s7"]["action"] == "bad_image" and "decode" in by_id["s7"]["reason"]  # seen in training
    assert len(report) == 3
