"""The training loop's own per-rank assignment, every DP rank simulated in one process: rank r's
`DataModule(dp_rank=r)` behind the loop's `StepFeed` (what `mmtrain.train.loop` runs on each rank)
over many steps at DP4 and DP8, on rows of the real length tables in tests/assets at the seed's
shapes (recipe h20_4gpu_dp4: LLaVA-7B's 256 tokens a tile, seq 8192, 2 packs per rank).

Read from the micro-batches each rank builds, not from the plan alone: every pack of a step goes to
exactly one rank, in the plan's micro-batch order; no rank idles; each sample runs once per epoch;
the predicted rank costs are the cost formula summed over what each rank really runs, and their
mean straggler (max / mean per step) is at or under 1.01 and under that of the same packs dealt to
the ranks in step order (what training would run without the balancer).
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch

from mmtrain.balancing.cost import CostModel
from mmtrain.config import compose
from mmtrain.models.config import tokens_per_tile
from mmtrain.steps.datamodule import DataModule
from mmtrain.steps.prefetch import StepFeed
from packing_checks import DATA

EPOCHS = 2


def _subset(tmp_path, name: str, n: int):
    """n rows of a real table (seeded pick, table order kept), record ids `<table>-<row>`."""
    rows = np.loadtxt(DATA / f"{name}.csv", delimiter=",", skiprows=1, dtype=np.int64)
    pick = np.sort(np.random.default_rng(0).choice(len(rows), n, replace=False))
    path = tmp_path / f"{name}.csv"
    path.write_text("id,tiles,text_tokens\n" + "".join(f"{name}-{i},{rows[i, 0]},{rows[i, 2]}\n" for i in pick))
    return path, [f"{name}-{i}" for i in pick], rows[pick, 0], rows[pick, 2]


@pytest.mark.parametrize("name,dp", [("docvqa_train_10k", 4), ("ai2d_train_12k", 4), ("chartqa_train_18k", 8)])
def test_every_pack_to_one_rank_no_rank_idle_each_sample_once_straggler_at_target(tmp_path, name, dp):
    path, ids, tiles, text = _subset(tmp_path, name, 600)
    cfg = compose(["recipe=h20_4gpu_dp4", "data=lengths", f"data.source={path}", f"trainer.global_batch_size={2 * dp}"])
    tpt = tokens_per_tile(cfg.model)
    assert (tpt, cfg.packing.seq_length, cfg.trainer.micro_batch_size) == (256, 8192, 1)
    modules = [DataModule(cfg, dp=dp, dp_rank=r, pp=1, first_stage=False, tokens_per_tile=tpt) for r in range(dp)]
    feeds = [StepFeed(m, torch.device("cpu"), prefetch=False) for m in modules]  # _build: what the feed thread runs
    try:
        _check(feeds, ids, tiles * tpt + text, tiles, CostModel.from_config(cfg.model), dp, name)
    finally:
        for f in feeds:
            f.close()


def _check(feeds, ids, lengths, tiles, cost, dp, name):
    """`lengths`: decoder tokens of each row, counted in the test; `cost`: the balancer's formula."""
    seen: dict[int, list[str]] = {}
    ratios, dealt_ratios = [], []
    steps = 0
    while True:
        ready = [f.next() for f in feeds]
        st = ready[0].plan
        if st.epoch >= EPOCHS:
            break
        steps += 1
        for r, x in enumerate(ready):  # every rank computed the same step by itself
            assert x.plan.step == st.step and x.plan.rows == st.rows and x.plan.rank_micro_batches == st.rank_micro_batches, r
        assert len(st.rows) == 2 * dp, "a step is global_batch_size packs"
        held = sorted(i for rank in st.rank_micro_batches for mb in rank for i in mb)
        assert held == list(range(len(st.rows))), f"step {st.step}: a pack on no rank or on two"
        rank_cost = []
        for r, x in enumerate(ready):
            want = [[s for i in mb for s in st.rows[i]] for mb in st.rank_micro_batches[r]]
            got = [list(mb.sample_ids) for mb in x.micro_batches]
            assert got == want, f"step {st.step}: rank {r} built other packs than its own"
            assert len(got) == 2 and all(got) and all(mb.num_real_tokens > 0 for mb in x.micro_batches), \
                f"step {st.step}: rank {r} idles"
            for mb in x.micro_batches:
                spans = [b - a for a, b in mb.sample_spans]
                assert spans == [int(lengths[s]) for s in mb.sample_ids], "a sample's tokens were cut or padded"
            mine = [s for mb in got for s in mb]
            rank_cost.append(float(cost.tiled_costs(lengths[mine], tiles[mine]).sum()))
            seen.setdefault(st.epoch, []).extend(ids[s] for s in mine)
        assert st.predicted_rank_cost == pytest.approx(rank_cost, rel=1e-9), st.step
        ratios.append(max(rank_cost) / np.mean(rank_cost))
        # the baseline the balancer must beat: the same packs dealt in step order, len / dp per rank
        k = len(st.rows) // dp
        dealt = [float(cost.tiled_costs(lengths[m], tiles[m]).sum())
                 for m in ([s for row in st.rows[r * k:(r + 1) * k] for s in row] for r in range(dp))]
        dealt_ratios.append(max(dealt) / np.mean(dealt))
    assert sorted(seen) == list(range(EPOCHS))
    for e, got in seen.items():
        twice = [k for k, c in Counter(got).items() if c > 1]
        assert not twice and sorted(got) == sorted(ids), f"epoch {e}: repeated {twice[:5]}, missing {sorted(set(ids) - set(got))[:5]}"
    assert steps >= 12, steps
    assert float(np.mean(ratios)) <= 1.01, (name, dp, float(np.mean(ratios)), max(ratios))
    assert float(np.mean(ratios)) < float(np.mean(dealt_ratios)), \
        f"{name} DP{dp}: straggler {np.mean(ratios):.4f} not under the packs dealt in order ({np.mean(dealt_ratios):.4f})"
