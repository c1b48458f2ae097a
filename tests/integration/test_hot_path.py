"""The GPU hot path, proved on the CPU in fp32: the sync-free packed rope, the fused bias-activation
and rope kernels, activation recompute and compiled layers at a static token count leave the packed
logits and gradients of one step where the plain path (megatron's thd rope, no fusion) puts them;
PP2 at a static token count without the per-send sync matches the unpacked run; a GPU recipe on a
machine without CUDA stops before building anything."""

from __future__ import annotations

import os
import subprocess
import time

import pytest
import torch

from equivalence_checks import check_same_updates
from mmtest_utils import PY, REPO, torchrun

BASE = ["model=tiny", "trainer.global_batch_size=8", "packing.buffer_size=8", "data.num_samples=32", "data.max_tiles=8",
        "data.max_text_tokens=48"]
PLAIN = "perf.rope=megatron perf.fuse=false"
VARIANTS = {
    "packed_rope": "perf.rope=packed perf.fuse=false",
    "fused": "perf.rope=packed perf.fuse=true",
    "recompute_full": "perf.fuse=false perf.recompute_granularity=full perf.recompute_num_layers=1",
    "recompute_selective": "perf.fuse=false perf.recompute_granularity=selective",
    "compiled_static": "perf.compile=layers packing.pad_to=seq_length perf.max_segments=16 perf.fuse=true model.attention_backend=dense",
}
EXACT = {"packed_rope", "recompute_full", "recompute_selective"}  # same kernels in the same order: bit-exact


# Variants run in two worker processes: the eager ones (seconds) and the two that compile kernels
# (about a minute on two cores); a test only starts the group it needs.
GROUPS = {"eager": ["packed_rope", "recompute_full", "recompute_selective"], "compiled": ["compiled_static", "fused"]}


@pytest.fixture(scope="module")
def run_group(tmp_path_factory):
    cache: dict[str, tuple[dict, dict]] = {}

    def run(group: str):
        if group not in cache:
            out = tmp_path_factory.mktemp(f"hot_{group}") / "variants.pt"
            spec = ";".join([PLAIN, *(VARIANTS[n] for n in GROUPS[group])])
            env = {**os.environ, "OMP_NUM_THREADS": "2", "PYTHONWARNINGS": "ignore"}
            proc = subprocess.run([PY, "tests/integration/perf_worker.py", str(out), spec, *BASE], cwd=REPO, env=env,
                                  capture_output=True, text=True, timeout=900)
            assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
            res = torch.load(out, weights_only=False)
            cache[group] = (res[PLAIN], {n: res[VARIANTS[n]] for n in GROUPS[group]})
        return cache[group]

    return run


def _group_of(name: str) -> str:
    return next(g for g, names in GROUPS.items() if name in names)


def _max_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


@pytest.mark.parametrize("name", list(VARIANTS))
def test_hot_path_keeps_packed_logits_and_grads(run_group, name):
    plain, group = run_group(_group_of(name))
    other = group[name]
    tol = 0.0 if name in EXACT else 1e-6
    assert plain["logits"].keys() == other["logits"].keys() and plain["logits"]
    for sid, ref in plain["logits"].items():
        d = float((other["logits"][sid] - ref).abs().max())
        assert d <= tol, f"{name}: logits of sample {sid} differ by {d:.2e}"
    assert plain["grads"].keys() == other["grads"].keys() and len(plain["grads"]) > 20
    for pname, ref in plain["grads"].items():
        r = _max_rel(other["grads"][pname], ref)
        assert r <= tol, f"{name}: gradient of {pname} differs by {r:.2e} (relative)"
    assert abs(other["loss"] - plain["loss"]) <= 1e-6 * abs(plain["loss"])


def test_the_variants_really_ran_differently(run_group):
    plain, v = run_group("eager")
    v = {**v, **run_group("compiled")[1]}
    assert plain["runtime"].rope == "megatron" and v["packed_rope"]["runtime"].rope == "packed"
    assert v["fused"]["runtime"].fuse and not plain["runtime"].fuse
    # recompute runs every decoder core attention again in the backward
    assert v["recompute_full"]["core_attention_calls"] == 2 * plain["core_attention_calls"] > 0
    assert v["recompute_selective"]["core_attention_calls"] == 2 * plain["core_attention_calls"]
    # static shapes: every micro-batch holds packing.seq_length tokens
    assert set(v["compiled_static"]["tokens"]) == {512} and len(set(plain["tokens"])) > 1
    assert v["compiled_static"]["backends"]["decoder"] == "dense"


@pytest.mark.multiproc
def test_pp2_static_tokens_without_p2p_sync_equals_unpacked(tmp_path):
    """Fixed micro-batch shapes turn megatron's per-micro-batch shape exchange off
    (variable_seq_lengths=False); batch_p2p_sync=false drops the sync after each send/recv."""
    out = tmp_path / "pp2"
    env = {"MMTRAIN_EQ_VARIANTS": "packing.enabled=true packing.strict_equivalence=true packing.pad_to=seq_length perf.batch_p2p_sync=false;packing.enabled=false"}
    ovr = BASE + ["trainer.precision=fp32", "packing.seq_length=512", "parallel.pipeline_model_parallel_size=2"]
    torchrun(2, ["tests/integration/dist_worker.py", "equivalence", str(out), *ovr], env=env)
    for r in range(2):
        res = torch.load(f"{out}.rank{r}.pt", weights_only=False)
        packed, unpacked = res["a"], res["b"]
        assert packed["samples"] == unpacked["samples"]
        assert abs(packed["loss"] - unpacked["loss"]) <= 1e-6 * abs(unpacked["loss"])
        assert packed["grads"].keys() == unpacked["grads"].keys() and packed["grads"]
        for name, ref in unpacked["grads"].items():
            assert _max_rel(packed["grads"][name], ref) <= 1e-5, name


@pytest.mark.multiproc
def test_dp2_overlapped_grad_reduce_with_an_imageless_rank_matches_dp1(tmp_path):
    """The decoder trains at DP2, so the DP gradient reduce overlaps the backward. Records alternate
    image (2 tiles) / text only, in order, two too long to share a 64-token pack; in the strict mode
    a step packs its two samples, one pack each, so every step one rank runs a micro-batch without tiles
    (its ViT and projector still get their zero gradients, which megatron's overlapped reduce waits
    for). Same reduced gradients, grad norm and update as DP1."""
    table = tmp_path / "t.csv"
    table.write_text("id,tiles,text_tokens\n" + "".join(f"img-{i},2,{20 + i}\ntxt-{i},0,{30 + i}\n" for i in range(4)))
    ovr = ["model=tiny", "data=lengths", f"data.source={table}", "data.shuffle=false", "trainer.precision=fp32",
           "trainer.max_steps=2", "trainer.global_batch_size=2", "packing.strict_equivalence=true", "packing.seq_length=64",
           "model.freeze_lm=false"]
    torchrun(1, ["tests/integration/dist_worker.py", "train", str(tmp_path / "dp1"), *ovr])
    torchrun(2, ["tests/integration/dist_worker.py", "train", str(tmp_path / "dp2"), *ovr])
    one = torch.load(f"{tmp_path}/dp1.rank0.pt", weights_only=False)
    two = [torch.load(f"{tmp_path}/dp2.rank{r}.pt", weights_only=False) for r in range(2)]
    assert not one["overlap_grad_reduce"] and all(t["overlap_grad_reduce"] for t in two)
    per_step = [sorted(x) for x in zip(*(t["tiles"] for t in two), strict=True)]
    assert one["tiles"] == [2, 2] and per_step == [[0, 2], [0, 2]], "every step, one DP2 rank without tiles"
    check_same_updates(one, two)


def test_gpu_recipe_without_cuda_stops_before_building(tmp_path):
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONWARNINGS": "ignore"}
    t0 = time.perf_counter()
    proc = subprocess.run([PY, "-m", "mmtrain.train", "recipe=h20_1gpu", f"trainer.output_dir={tmp_path / 'run'}"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    took = time.perf_counter() - t0
    text = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "a GPU cluster config (cluster.gpus_per_node > 0) but no CUDA device is visible" in text, text[-3000:]
    assert "scale=smoke" in text and "trainer.device=cpu" in text
    assert "run: model=" not in text and not (tmp_path / "run" / "metrics.jsonl").exists()
    assert took < 120, f"the refusal took {took:.0f} s: something was built first"
