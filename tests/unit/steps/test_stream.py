"""The step stream training runs (no model): every step full, each sample once per epoch, the same
steps on every rank, the same samples per step at any DP size (resume DP1 -> DP2 -> DP4), strict
equivalence, plan files, online calibration, and the straggler on hard length distributions."""

from __future__ import annotations

import json

import numpy as np
import pytest

from mmtrain.config import compose
from mmtrain.data.synthetic import STRESS_KINDS, stress_shapes, write_length_table
from mmtrain.models.config import tokens_per_tile
from mmtrain.steps.from_config import build_source, build_stream
from mmtrain.steps.simulate import figures, run_steps


def _table(tmp_path, kind="mixed_vlm", n=300, seed=0, name="t.csv"):
    tiles, text = stress_shapes(kind, n, seed, 16, 512)
    path = tmp_path / name
    write_length_table(path, tiles, text, ids=[f"{kind}-{i:05d}" for i in range(n)])
    return path


def _cfg(table, *extra):
    return compose(["data=lengths", f"data.source={table}", "trainer.global_batch_size=8", *extra])


def _stream(cfg, dp, pp=1):
    tpt = tokens_per_tile(cfg.model)
    return build_stream(cfg, build_source(cfg, tpt), tpt, dp, pp)


def _by_epoch(steps):
    out: dict[int, list[int]] = {}
    for st in steps:
        out.setdefault(st.epoch, []).extend(st.sample_ids)
    return out


def test_every_step_full_and_each_sample_once_per_epoch(tmp_path):
    cfg = _cfg(_table(tmp_path, n=300))
    s = _stream(cfg, dp=4)
    steps = [s.next_step() for _ in range(60)]  # several epochs
    epochs = _by_epoch(steps)
    assert len(epochs) >= 3
    for e in sorted(epochs)[:-1]:  # every finished epoch: each of the 300 samples exactly once
        assert sorted(epochs[e]) == list(range(300)), e
    assert len(set(epochs[max(epochs)])) == len(epochs[max(epochs)])
    for st in steps:
        assert len(st.rows) == 8
        assert [sum(len(mb) for mb in r) for r in st.rank_micro_batches] == [2, 2, 2, 2]  # every rank, every step
        assert all(t <= 512 for t in st.row_tokens)
        assert sorted(i for r in st.rank_micro_batches for mb in r for i in mb) == list(range(8))


def test_every_rank_computes_the_same_steps(tmp_path):
    cfg = _cfg(_table(tmp_path))
    a, b = _stream(cfg, dp=4), _stream(cfg, dp=4)
    for _ in range(20):
        x, y = a.next_step(), b.next_step()
        assert (x.rows, x.rank_micro_batches, x.predicted_rank_cost) == (y.rows, y.rank_micro_batches, y.predicted_rank_cost)


def test_resume_at_another_dp_size_sees_the_same_samples_per_step(tmp_path):
    """DP1 for 7 steps, checkpoint (JSON), DP2 for 9, checkpoint, DP4 to the end: every step holds
    the samples (and packs) of an uninterrupted DP1 run; only the rank layout changes."""
    cfg = _cfg(_table(tmp_path, n=200))
    ref = _stream(cfg, dp=1)
    want = [ref.next_step() for _ in range(30)]
    got = []
    s = _stream(cfg, dp=1)
    got += [s.next_step() for _ in range(7)]
    state = json.loads(json.dumps(s.state_dict()))
    s = _stream(cfg, dp=2)
    s.load_state_dict(state)
    got += [s.next_step() for _ in range(9)]
    state = json.loads(json.dumps(s.state_dict()))
    s = _stream(cfg, dp=4)
    s.load_state_dict(state)
    got += [s.next_step() for _ in range(14)]
    assert [g.step for g in got] == list(range(30))
    for g, w in zip(got, want):
        assert sorted(map(sorted, g.rows)) == sorted(map(sorted, w.rows)), g.step
        assert g.epoch == w.epoch
    assert [len(g.rank_micro_batches) for g in got] == [1] * 7 + [2] * 9 + [4] * 14


@pytest.mark.parametrize("dp", [1, 2, 8])
def test_step_samples_do_not_depend_on_dp(tmp_path, dp):
    cfg = _cfg(_table(tmp_path, "skewed", 250))
    one, other = _stream(cfg, dp=1), _stream(cfg, dp=dp)
    for _ in range(25):
        a, b = one.next_step(), other.next_step()
        assert sorted(a.sample_ids) == sorted(b.sample_ids)


def test_strict_equivalence_steps_are_the_unpacked_steps(tmp_path):
    table = _table(tmp_path)
    strict = _stream(_cfg(table, "packing.strict_equivalence=true"), dp=4)
    unpacked = _stream(_cfg(table, "packing.enabled=false"), dp=4)
    for _ in range(40):
        a, b = strict.next_step(), unpacked.next_step()
        assert sorted(a.sample_ids) == sorted(b.sample_ids) and a.num_samples == 8
        assert len(a.rows) % 4 == 0 and all(len(r) >= 1 for r in a.rank_micro_batches)


def test_unpacked_steps_take_contiguous_slices(tmp_path):
    s = _stream(_cfg(_table(tmp_path), "packing.enabled=false"), dp=2)
    st = s.next_step()
    assert st.rows == [(i,) for i in st.sample_ids] and st.rank_micro_batches == [[[0], [1], [2], [3]], [[4], [5], [6], [7]]]


def test_a_sample_too_long_is_an_error_naming_its_record_id(tmp_path):
    path = tmp_path / "long.csv"
    write_length_table(path, [1, 2, 30], [10, 20, 100], ids=["a", "b", "too-long"])
    with pytest.raises(ValueError, match="too-long"):
        s = _stream(_cfg(path, "trainer.global_batch_size=2"), dp=1)
        s.next_step()


def test_text_only_rows_train_and_rows_without_text_are_refused_naming_them(tmp_path):
    path = tmp_path / "t.csv"
    write_length_table(path, [0, 0, 3, 2, 0], [40, 7, 0, 9, 0], ids=["x0", "x1", "x2", "x3", "x4"])
    with pytest.raises(ValueError, match="x2, x4"):
        build_source(_cfg(path), 16)
    src = build_source(_cfg(path, "data.bad_sample_policy=skip"), 16)
    assert src.ids == ["x0", "x1", "x3"] and src.skipped_samples == 2
    s = _stream(_cfg(path, "data.bad_sample_policy=skip", "trainer.global_batch_size=2"), dp=2)
    assert sorted(s.next_step().sample_ids) == [0, 1, 2]


def test_more_packs_per_step_than_samples_still_gives_every_rank_work(tmp_path):
    path = tmp_path / "t.csv"
    write_length_table(path, [0] * 5, [30] * 5)
    st = _stream(_cfg(path), dp=4).next_step()  # 5 samples, 8 packs per step: 5 single-sample packs
    assert sorted(st.sample_ids) == list(range(5)) and all(sum(map(len, r)) >= 1 for r in st.rank_micro_batches)


def test_plan_steps_drive_the_stream(tmp_path):
    """A plan from `mmtrain pack --dp 4 --micro-batches 2`: each step, each rank, the plan's packs
    in the plan's micro-batch order (read straight from the file)."""
    from collections import defaultdict

    from mmtrain.steps.pack_cli import main as pack

    table = _table(tmp_path, "skewed", 200)
    plan = tmp_path / "plan.jsonl"
    assert pack([str(table), "--dp", "4", "--micro-batches", "2", "--out", str(plan)]) == 0
    want = defaultdict(list)
    for d in sorted((json.loads(x) for x in plan.read_text().splitlines()),
                    key=lambda d: (d["step"], d["rank"], d["micro_batch"], d["pack"])):
        want[(d["step"], d["rank"])] += d["samples"]
    steps = max(s for s, _ in want) + 1
    cfg = _cfg(table, f"packing.plan={plan}")
    s = _stream(cfg, dp=4)
    ids = build_source(cfg, 16).ids
    for _ in range(steps + 2):  # into the second epoch: the plan's steps again
        st = s.next_step()
        got = [[ids[i] for i in st.rank_samples(r)] for r in range(4)]
        if st.step < steps:
            assert got == [want[(st.step, r)] for r in range(4)]
        else:
            assert sorted(map(sorted, got)) in [sorted(sorted(want[(k, r)]) for r in range(4)) for k in range(steps)]


def test_calibration_fits_uses_and_checkpoints_the_cost_model(tmp_path):
    cfg = _cfg(_table(tmp_path), "balancing.calibrate_steps=4")
    s = _stream(cfg, dp=4)
    flops = s.cost_model
    w = np.array([1.0, 5.0, 1.0, 5.0]) * 1e-12  # a device whose attention is 5x slower than its FLOPs say

    def seconds(st):
        return [float((s.pack_terms([(st.rows[i], tuple(int(s.lengths[j]) for j in st.rows[i])) for mb in r for i in mb])
                       * flops.coefficients).sum(axis=0) @ w) for r in st.rank_micro_batches]

    fits = []
    for _ in range(5):
        st = s.next_step()
        fits.append(s.observe(st, seconds(st)))
    assert fits[:4] == [None] * 4 and fits[4] is not None  # step 0 is warm-up, then 4 steps
    cm = s.cost_model
    assert cm.unit == "s" and fits[4]["cost_model"] == cm.to_dict()
    assert cm.decoder_attention / cm.decoder_token > 3 * flops.decoder_attention / flops.decoder_token
    # the calibrated model predicts the device's rank times better than the FLOP count
    err = {"flops": [], "calibrated": []}
    for _ in range(10):
        st = s.next_step()
        true = np.array(seconds(st))
        for name, model in (("flops", flops), ("calibrated", cm)):
            pred = np.array([s.pack_costs([(st.rows[i], tuple(int(s.lengths[j]) for j in st.rows[i])) for mb in r for i in mb],
                                          model).sum() for r in st.rank_micro_batches])
            err[name].append(np.abs(pred / pred.mean() - true / true.mean()).max())
    assert np.mean(err["calibrated"]) < 0.5 * np.mean(err["flops"])
    state = json.loads(json.dumps(s.state_dict()))
    t = _stream(cfg, dp=2)
    t.load_state_dict(state)
    assert t.cost_model == cm
    assert sorted(s.next_step().sample_ids) == sorted(t.next_step().sample_ids)


@pytest.mark.parametrize("kind", STRESS_KINDS)
def test_straggler_at_dp4_two_packs_per_rank_on_hard_distributions(tmp_path, kind):
    """DP4, two packs per rank, the default settings: mean predicted straggler <= 1.01 over an epoch
    and every rank busy in every step, on each stress distribution (600 samples)."""
    cfg = _cfg(_table(tmp_path, kind, 600, seed=3))
    steps, _ = run_steps(cfg, dp=4, epoch=True)
    fig = figures(steps, 512)
    assert fig["straggler"] <= 1.01, (kind, fig)
    assert sorted(_by_epoch(steps)[0]) == list(range(600))
    assert all(min(st.predicted_rank_cost) > 0 for st in steps)
