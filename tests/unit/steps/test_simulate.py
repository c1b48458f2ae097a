"""`mmtrain simulate`: the steps training runs, the same figures; baselines in the same run; 1F1B."""

import json

import numpy as np
import pytest

from mmtrain.balancing.pipeline import bubble_fraction, order_microbatches, simulate_1f1b
from mmtrain.config import compose
from mmtrain.data.synthetic import stress_shapes, write_length_table
from mmtrain.steps.simulate import figures, run_steps


@pytest.fixture()
def table(tmp_path):
    tiles, text = stress_shapes("mixed_vlm", 400, 1, 16, 512)
    path = tmp_path / "t.csv"
    write_length_table(path, tiles, text)
    return path


def _simulate_json(capsys, argv):
    from mmtrain.steps.simulate_cli import simulate_main

    assert simulate_main(argv) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_simulate_is_the_steps_the_training_data_module_runs(table, capsys):
    """The straggler simulate prints is the mean over trainer.max_steps steps of max / mean of the
    predicted_rank_cost the training data module hands the loop (what metrics.jsonl logs)."""
    from mmtrain.steps.datamodule import DataModule

    ovr = ["data=lengths", f"data.source={table}", "trainer.global_batch_size=8", "trainer.max_steps=12"]
    out = _simulate_json(capsys, ["--dp", "4", *ovr])
    dm = DataModule(compose(ovr), dp=4, dp_rank=2, pp=1, first_stage=True, tokens_per_tile=16)
    steps = [dm.next_step() for _ in range(12)]
    ratios = [max(s.predicted_rank_cost) / np.mean(s.predicted_rank_cost) for s in steps]
    assert out["steps"] == 12 and out["packs"] == sum(len(s.rows) for s in steps) == 96
    assert out["straggler"] == pytest.approx(float(np.mean(ratios)), rel=1e-12)
    assert out["samples"] == sum(s.num_samples for s in steps)
    assert out["efficiency"] == pytest.approx(sum(sum(s.row_tokens) for s in steps) / (96 * 512))
    assert out["straggler"] <= 1.01
    # MFU's useful FLOPs are the balancer's costs (one formula): the step's predicted costs sum to them
    assert sum(dm.useful_flops(s) for s in steps) == pytest.approx(sum(sum(s.row_costs) for s in steps), rel=1e-12)


def test_table_mode_runs_an_epoch_and_beats_the_baselines(table, capsys):
    out = _simulate_json(capsys, [str(table), "--dp", "4", "--micro-batches", "2", "--strategies",
                                  "ours,lpt,karmarkar_karp,greedy_knapsack,no_packing"])
    rows = {r["strategy"]: r for r in out["rows"]}
    assert out["epoch"] is True and rows["ours"]["samples"] == 400 == rows["no_packing"]["samples"]
    assert rows["ours"]["straggler"] < min(rows[k]["straggler"] for k in ("lpt", "karmarkar_karp", "greedy_knapsack"))
    assert rows["ours"]["straggler"] <= 1.01 < rows["no_packing"]["straggler"]
    assert rows["ours"]["efficiency"] > rows["no_packing"]["efficiency"]


def test_pipeline_order_is_the_order_training_runs(table):
    """With PP = 2 each rank's micro-batches run in the order that shortens the simulated 1F1B
    schedule, and the predicted bubble of that order is what the step reports."""
    cfg = compose(["data=lengths", f"data.source={table}", "trainer.global_batch_size=16"])
    steps, _ = run_steps(cfg, dp=2, pp=2, steps=6)
    off, _ = run_steps(compose(["data=lengths", f"data.source={table}", "trainer.global_batch_size=16",
                                "balancing.pipeline_order=false"]), dp=2, pp=2, steps=6)
    for st, base in zip(steps, off):
        c = np.asarray(st.row_costs)
        for r in st.rank_micro_batches:
            by_index = sorted(r)
            order = order_microbatches([float(c[m].sum()) for m in by_index], 2)
            assert r == [by_index[i] for i in order]  # the simulator's order is the run order
        spans = [simulate_1f1b([float(c[m].sum()) for m in r], 2) for r in st.rank_micro_batches]
        assert st.predicted_bubble == pytest.approx(1 - c.sum() / 2 / sum(spans))
        assert sorted(map(sorted, st.rows)) == sorted(map(sorted, base.rows))  # order only, same packs
    assert figures(steps, 512, 2)["bubble"] <= figures(off, 512, 2)["bubble"] + 1e-12


def test_1f1b_equal_microbatches_textbook_bubble():
    for p, m in [(2, 4), (4, 8), (4, 1)]:
        assert bubble_fraction([1.0] * m, p) == pytest.approx((p - 1) / (m + p - 1))
    assert simulate_1f1b([2.0, 4.0], 1) == 6.0


def test_order_microbatches_never_worse_and_deterministic():
    rng = np.random.default_rng(0)
    for _ in range(5):
        c = rng.uniform(0.2, 3.0, 8)
        o = order_microbatches(c, 4)
        assert sorted(o) == list(range(8)) and o == order_microbatches(c.copy(), 4)
        assert simulate_1f1b(c[o], 4) <= simulate_1f1b(c, 4) + 1e-12
