"""Packed vs unpacked (fp32, tiny VLM) at TP1, TP2, PP2, DP2; DP1 vs DP2 updates; TP/PP/DP via torchrun+gloo.

In the strict-equivalence mode (`packing.strict_equivalence=true`) one global batch goes through the
same model twice: packed (a step packs exactly the samples an unpacked step sees) and each sample
padded on its own. Logits of every real token, the global per-token loss, and every parameter
gradient must agree. DP1 vs DP2 runs in the default (balanced) mode: the samples of a step do not
depend on the DP size, so the updates agree too.
"""

from __future__ import annotations

import pytest
import torch

from equivalence_checks import check_same_updates, rel
from mmtest_utils import torchrun

BASE = [
    "model=tiny",
    "trainer.precision=fp32",
    "trainer.global_batch_size=8",
    "packing.strict_equivalence=true",
    "packing.seq_length=512",
    "data.num_samples=64",
    "data.max_tiles=8",
    "data.max_text_tokens=48",
]


def check_equivalence(results: list[dict], logits: bool) -> None:
    for res in results:
        p, u = res["a"], res["b"]
        assert p["samples"] == u["samples"], "packed and unpacked steps must see the same samples"
        assert abs(p["loss"] - u["loss"]) <= 1e-6 * abs(u["loss"]), (p["loss"], u["loss"])
        assert p["grads"].keys() == u["grads"].keys() and p["grads"]
        for name in u["grads"]:
            r = rel(p["grads"][name], u["grads"][name])
            assert r <= 1e-5, f"gradient of {name} differs: rel {r:.2e}"
    if logits:  # DP ranks hold different samples: compare the union, keyed by (tp rank, sample id)
        packed = {k: v for res in results for k, v in res["a"]["logits"].items()}
        unpacked = {k: v for res in results for k, v in res["b"]["logits"].items()}
        assert packed.keys() == unpacked.keys() and packed
        for key, ref in unpacked.items():
            d = float((packed[key] - ref).abs().max())
            assert d <= 1e-5, f"logits of sample {key[1]} (tp rank {key[0]}) differ by {d:.2e}"


@pytest.mark.multiproc
@pytest.mark.parametrize(
    "nproc,tp,pp",
    [(1, 1, 1), (2, 2, 1), (2, 1, 2), (2, 1, 1)],
    ids=["TP1", "TP2", "PP2", "DP2"],
)
def test_packed_equals_unpacked(tmp_path, nproc, tp, pp):
    out = tmp_path / "eq"
    ovr = BASE + [f"parallel.tensor_model_parallel_size={tp}", f"parallel.pipeline_model_parallel_size={pp}"]
    torchrun(nproc, ["tests/integration/dist_worker.py", "equivalence", str(out), *ovr])
    results = [torch.load(f"{out}.rank{r}.pt", weights_only=False) for r in range(nproc)]
    check_equivalence(results, logits=pp == 1)
    # the global loss is the same number on every rank
    assert len({round(r["a"]["loss"], 12) for r in results}) == 1


@pytest.mark.multiproc
@pytest.mark.parametrize("nproc,tp,pp", [(2, 1, 1), (2, 1, 2)], ids=["DP2", "PP2"])
def test_balancing_on_and_off_give_the_same_loss_and_grads(tmp_path, nproc, tp, pp):
    """Balancing only moves packs between ranks / reorders micro-batches: same loss, same gradients."""
    out = tmp_path / "bal"
    ovr = BASE + [
        "packing.enabled=true",
        "trainer.global_batch_size=16",
        f"parallel.tensor_model_parallel_size={tp}",
        f"parallel.pipeline_model_parallel_size={pp}",
    ]
    env = {"MMTRAIN_EQ_VARIANTS": "balancing.enabled=true;balancing.enabled=false balancing.pipeline_order=false"}
    torchrun(nproc, ["tests/integration/dist_worker.py", "equivalence", str(out), *ovr], env=env)
    results = [torch.load(f"{out}.rank{r}.pt", weights_only=False) for r in range(nproc)]
    check_equivalence(results, logits=pp == 1)
    # the layouts really differ (otherwise this test could not fail)
    assert any(r["a"]["layout"] != r["b"]["layout"] for r in results)


@pytest.mark.multiproc
def test_segment_aligned_packing_equals_unpacked(tmp_path):
    """cu_seqlens_padded (per-sample alignment padding, as CP/FP8 need) changes nothing for real tokens."""
    out = tmp_path / "seg"
    env = {"MMTRAIN_EQ_VARIANTS": "packing.enabled=true packing.segment_align=8 packing.align=16;packing.enabled=false"}
    torchrun(1, ["tests/integration/dist_worker.py", "equivalence", str(out), *BASE], env=env)
    check_equivalence([torch.load(f"{out}.rank0.pt", weights_only=False)], logits=True)


@pytest.mark.multiproc
def test_dp1_and_dp2_give_the_same_update(tmp_path):
    ovr = [a for a in BASE if "strict" not in a] + ["trainer.max_steps=2", "packing.enabled=true"]
    torchrun(1, ["tests/integration/dist_worker.py", "train", str(tmp_path / "dp1"), *ovr])
    torchrun(2, ["tests/integration/dist_worker.py", "train", str(tmp_path / "dp2"), *ovr])
    one = torch.load(f"{tmp_path}/dp1.rank0.pt", weights_only=False)
    two = [torch.load(f"{tmp_path}/dp2.rank{r}.pt", weights_only=False) for r in range(2)]
    check_same_updates(one, two)
