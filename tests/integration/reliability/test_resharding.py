"""Resume at another layout: a checkpoint written by ONE process (TP1 PP1 DP1) resumed at TP2, at
PP2 and at DP2 (distributed optimizer), then back at DP1 - with online packing and with an offline
plan; mostly-text batches at DP2 and PP2 with the ViT frozen. fp32 CPU, tiny model.

Every resume proves it resumed: the run says so at the checkpoint's step (summary and stderr), no
step before it was run again (a fresh output folder holds no line before it; a reused one keeps its
lines byte for byte), each later step sees the uninterrupted run's samples with its loss (1e-5), and
the final checkpoint's parameters and Adam state equal the uninterrupted run's, tensor by tensor.
All layouts run in one 2-process launch (tests/integration/reliability/resume_worker.py).
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch

from ckpt_checks import same_state, state
from mmtest_utils import PY, REPO, torchrun

from llava_data import make_dataset

STEPS = 6
COMMON = [
    "model=tiny",
    "trainer.precision=fp32",
    "data.num_samples=48",
    "data.max_tiles=6",
    "data.max_text_tokens=48",
    "trainer.global_batch_size=6",
    "trainer.log_sample_ids=true",
    "trainer.progress_bar=off",
    "trainer.log_interval=0",
    "trainer.tensorboard=false",
]
ONLINE = COMMON + ["packing.buffer_size=9"]  # != global batch: the packer's buffer carries across steps
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
ENV.pop("MMTRAIN_FAULT_INJECT", None)
LAYOUTS = {
    "tp2": ["parallel.tensor_model_parallel_size=2"],
    "pp2": ["parallel.pipeline_model_parallel_size=2"],
    "dp2": ["parallel.use_distributed_optimizer=true", "trainer.max_steps=4"],  # then DP1 again, to STEPS
}
# The DP2 runs assign packs to ranks with the balancer (online, the default) and round robin (plan).
DP2_BALANCING = {"online": [], "plan": ["balancing.enabled=false"]}


def run(args: list[str], env: dict | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run([PY, *args], cwd=REPO, env={**ENV, **(env or {})}, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        pytest.fail(f"{args[:3]} failed ({proc.returncode}):\n{proc.stderr[-5000:]}")
    return proc


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def final_state(out: Path, step: int = STEPS) -> dict[str, torch.Tensor]:
    return state(out / "checkpoints" / f"step_{step:08d}")


def check_resumed(out: Path, ref: list[dict], ref_state: dict, start: int, kept_lines: list[str] | None = None) -> None:
    summary = json.loads((out / "summary.json").read_text())
    assert summary["resumed_from_step"] == start, summary["resumed_from_step"]
    lines = (out / "metrics.jsonl").read_text().splitlines()
    got = [json.loads(x) for x in lines]
    if kept_lines is None:  # resumed into a fresh folder: no step before the checkpoint ran here
        assert got[0]["step"] == start, [g["step"] for g in got]
    else:
        assert lines[: len(kept_lines)] == kept_lines, "the lines before the resume point were rewritten"
    assert [g["step"] for g in got] == list(range(got[0]["step"], STEPS))
    for g in got:
        r = ref[g["step"]]
        assert g["sample_ids"] == r["sample_ids"], f"step {g['step']}: other samples"
        assert abs(g["loss"] - r["loss"]) <= 1e-5 * abs(r["loss"]), (g["step"], g["loss"], r["loss"])
    same_state(final_state(out), ref_state)


def text_heavy_dataset(root: Path) -> tuple[Path, set[str]]:
    """LLaVA records, 5 in 6 without an image (and short, so that packs hold 1-3 samples at
    seq_length 192 under the chat template); returns the file and the record ids that have one."""
    src = make_dataset(root, 48)  # more than 4 steps take: every sample at most once
    recs = [json.loads(x) for x in src.read_text().splitlines()]
    with_image = set()
    for i, r in enumerate(recs):
        if i % 6:
            r.pop("image")
            for turn in r["conversations"]:
                turn["value"] = turn["value"].replace("<image>\n", "")[:32]
        else:
            with_image.add(r["id"])
    src.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return src, with_image


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The uninterrupted single-process runs (online packing; offline plan), then every resume of
    their step-2 checkpoints at TP2 / PP2 / DP2 and the mostly-text runs in one 2-process launch,
    then DP1 again from the DP2 runs' step-4 checkpoints."""
    root = tmp_path_factory.mktemp("reshard")
    plan = root / "plan.jsonl"
    run(["-m", "mmtrain", "lengths", "--out", str(root / "table.csv"), *COMMON])
    run(["-m", "mmtrain", "pack", str(root / "table.csv"), "--seq-length", "512", "--offline", "--out", str(plan)])
    kinds = {"online": ONLINE, "plan": COMMON + [f"packing.plan={plan}"]}
    refs = {}
    for kind, base in kinds.items():
        ref = root / f"ref_{kind}"
        run(["-m", "mmtrain.train", *base, f"trainer.max_steps={STEPS}", "trainer.save_interval=2", "trainer.keep_last=0",
             f"trainer.output_dir={ref}"])
        refs[kind] = ref
    text_src, with_image = text_heavy_dataset(root / "text_heavy")
    jobs = []
    for kind, base in kinds.items():
        for layout, extra in LAYOUTS.items():
            if layout == "dp2":
                extra = extra + DP2_BALANCING[kind]
            jobs.append({"name": f"{kind}_{layout}", "overrides": [
                *base, f"trainer.max_steps={STEPS}", *extra, f"trainer.output_dir={root / f'{kind}_{layout}'}",
                f"trainer.resume={refs[kind] / 'checkpoints' / 'step_00000002'}"]})
    mixed = ["model=tiny", "data=llava_json", f"data.source={text_src}", "data.max_tiles=2", "model.freeze_vit=true",
             "trainer.global_batch_size=4", "packing.seq_length=192", "trainer.max_steps=4", "trainer.log_sample_ids=true",
             "trainer.save_final=false", "trainer.progress_bar=off", "trainer.tensorboard=false"]
    for layout, extra in (("dp2", []), ("pp2", ["parallel.pipeline_model_parallel_size=2"])):
        jobs.append({"name": f"mixed_{layout}", "overrides": [*mixed, *extra, f"trainer.output_dir={root / f'mixed_{layout}'}"]})
    (root / "jobs.json").write_text(json.dumps(jobs))
    torchrun(2, ["tests/integration/reliability/resume_worker.py", str(root / "jobs.json")], timeout=900)
    kept = {}
    back = []
    for kind, base in kinds.items():
        out = root / f"{kind}_dp2"
        kept[kind] = (out / "metrics.jsonl").read_text().splitlines() if (out / "metrics.jsonl").exists() else []
        back.append({"name": f"{kind}_dp1", "overrides": [*base, f"trainer.max_steps={STEPS}", f"trainer.output_dir={out}"]})
    (root / "back.json").write_text(json.dumps(back))
    run(["tests/integration/reliability/resume_worker.py", str(root / "back.json")])
    return {"root": root, "refs": refs, "kept": kept, "with_image": with_image}


def _job_ok(out: Path) -> None:
    st = json.loads((out / "job_status.json").read_text())
    assert st["ok"], st.get("traceback") or st


@pytest.mark.multiproc
@pytest.mark.parametrize("kind", ["online", "plan"])
@pytest.mark.parametrize("layout", ["tp2", "pp2"])
def test_single_process_checkpoint_resumes_at_tp2_and_pp2(world, kind, layout):
    out = world["root"] / f"{kind}_{layout}"
    _job_ok(out)
    ref = world["refs"][kind]
    check_resumed(out, metrics(ref), final_state(ref), start=2)


@pytest.mark.multiproc
@pytest.mark.parametrize("kind", ["online", "plan"])
def test_dp1_to_dp2_distributed_optimizer_and_back_to_dp1(world, kind):
    """Step-2 checkpoint of one process -> DP2 with the distributed optimizer (its Adam state split
    over DP ranks) to step 4 -> one process again to the end, in the same folder."""
    out = world["root"] / f"{kind}_dp2"
    _job_ok(out)
    ref = world["refs"][kind]
    kept = world["kept"][kind]
    assert [json.loads(x)["step"] for x in kept] == [2, 3], "the DP2 run ran steps 2 and 3"
    meta4 = json.loads((out / "checkpoints" / "step_00000004" / "meta.json").read_text())
    assert meta4["layout"]["dp"] == 2 and meta4["distributed_optimizer"] is True
    check_resumed(out, metrics(ref), final_state(ref), start=4, kept_lines=kept)


@pytest.mark.multiproc
@pytest.mark.parametrize("layout", ["dp2", "pp2"])
def test_mostly_text_batches_with_frozen_vit_run_to_the_end(world, layout):
    """5 of 6 samples without an image, packs of 1-3 samples: micro-batches (and whole steps)
    without any image on some ranks / stages; no hang, every step done, every sample once."""
    out = world["root"] / f"mixed_{layout}"
    _job_ok(out)
    m = metrics(out)
    assert [x["step"] for x in m] == [0, 1, 2, 3] and all(x["loss"] == x["loss"] for x in m)
    ids = [s for x in m for s in x["sample_ids"]]
    assert len(ids) == len(set(ids)) >= 16
    steps_without_image = [x["step"] for x in m if not set(x["sample_ids"]) & world["with_image"]]
    steps_with_image = [x["step"] for x in m if set(x["sample_ids"]) & world["with_image"]]
    assert steps_without_image and steps_with_image, (steps_without_image, steps_with_image)


@pytest.mark.multiproc
def test_checkpoint_files_are_sharded_by_writing_rank(world):
    """A 2-process checkpoint has one data file per writing rank, sizes and checksums in meta.json;
    at DP2 both replicas write about half."""
    from mmtrain.train import checkpoint as ck

    path = world["root"] / "online_tp2" / "checkpoints" / f"step_{STEPS:08d}"
    meta = ck.read_meta(path)
    data = sorted(f for f in meta["files"] if f.endswith(".distcp"))
    assert data == ["__0_0.distcp", "__1_0.distcp"], data
    assert all(b > 0 for b in meta["tensor_bytes_by_rank"]) and ck.validate(path) is None
    # DP replicas (and the distributed optimizer's shards) share the writing
    dp_meta = ck.read_meta(world["root"] / "online_dp2" / "checkpoints" / "step_00000004")
    per_rank = dp_meta["tensor_bytes_by_rank"]
    assert len(per_rank) == 2 and min(per_rank) > 0.6 * max(per_rank), per_rank
    ref = world["refs"]["online"] / "checkpoints"
    assert sorted(p.name for p in ref.iterdir()) == ["step_00000002", "step_00000004", "step_00000006"]  # keep_last=0
