"""Packing engine: validity, constraints, policies, determinism, optimality on tiny inputs."""

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mmtrain.packing.algorithms import ALGORITHMS, DEFAULT_ALGORITHM, pack_lengths
from mmtrain.packing.buffered import BufferedPacker
from mmtrain.packing.plan_file import PlanMismatchError, load_plan
from mmtrain.packing.policy import pack_samples

from packing_checks import brute_min_packs, check, synth  # noqa: E402

ALGS = sorted(ALGORITHMS)


@pytest.mark.parametrize("alg", ALGS)
def test_valid_and_deterministic(alg):
    lens, tiles = synth(3000)
    a = pack_lengths(lens, 8192, alg)
    check(a, lens, 8192)
    assert a == pack_lengths(lens, 8192, alg)
    assert len(a) >= -(-lens.sum() // 8192)


@pytest.mark.parametrize("alg", ALGS)
def test_constraints_tiles_and_alignment(alg):
    lens, tiles = synth(2000, 1)
    p = pack_lengths(lens, 8192, alg, tiles=tiles, max_tiles_per_pack=24, segment_align=16, pack_align=128)
    check(p, lens, 8192, tiles, 24, 16, 128)


@pytest.mark.parametrize("alg", ALGS)
def test_empty_and_single(alg):
    assert pack_lengths([], 100, alg) == []
    assert pack_lengths([7], 100, alg) == [[0]]


def test_default_beats_baselines_on_synthetic():
    lens, _ = synth(20000, 2)
    d = len(pack_lengths(lens, 8192))
    assert d <= len(pack_lengths(lens, 8192, "ffd"))
    assert d <= len(pack_lengths(lens, 8192, "greedy_knapsack"))
    assert DEFAULT_ALGORITHM in ALGORITHMS


def test_greedy_knapsack_matches_definition():
    # ascending sort, take the largest that fits, new pack when nothing fits
    lens = [5, 1, 4, 3, 3, 2]
    packs = pack_lengths(lens, 7, "greedy_knapsack")
    assert [sorted(lens[i] for i in p) for p in packs] == [[2, 5], [3, 4], [1, 3]]


@settings(max_examples=25, deadline=None)
@given(st.lists(st.integers(1, 60), min_size=1, max_size=6), st.integers(60, 120))
def test_default_optimal_on_small_instances(lens, cap):
    packs = pack_lengths(lens, cap)
    check(packs, lens, cap)
    assert len(packs) == brute_min_packs(lens, cap)


@settings(max_examples=40, deadline=None)
@given(
    st.lists(st.integers(1, 500), min_size=0, max_size=300),
    st.sampled_from(ALGS),
    st.sampled_from([1, 2, 8]),
    st.sampled_from([1, 4, 64]),
)
def test_property_valid(lens, alg, sa, pa):
    packs = pack_lengths(lens, 1024, alg, segment_align=sa, pack_align=pa)
    check(packs, lens, 1024, sa=sa, pa=pa)


def test_oversize_policies():
    lens = np.array([100, 900, 50, 2000])
    text = np.array([100, 100, 50, 1500])
    with pytest.raises(ValueError, match="sample 3"):
        pack_samples(lens, 1000, algorithm="default")
    with pytest.raises(ValueError, match="sample 3"):
        pack_lengths(lens, 1000)
    r = pack_samples(lens, 1000, oversize_policy="drop")
    assert r.dropped == [3] and r.summary()["dropped"] == 1
    check(r.packs, lens, 1000, n=3)
    r = pack_samples(lens, 1000, oversize_policy="truncate", text_tokens=text)
    assert r.truncated == {3: 1000} and r.summary()["truncated"] == 1
    # image part (1800) longer than the pack: never cut, dropped instead
    r = pack_samples(lens, 1000, oversize_policy="truncate", text_tokens=np.array([100, 100, 50, 200]))
    assert r.dropped == [3] and not r.truncated


def test_buffered_equals_online_and_checkpoint():
    lens, tiles = synth(5000, 3)
    res = pack_samples(lens, 8192, buffer_size=700)
    check(res.packs, lens, 8192)
    bp = BufferedPacker(8192, 700)
    online, state_at = [], None
    for i, (l, t) in enumerate(zip(lens.tolist(), tiles.tolist())):
        if i == 2345:
            state_at = json.loads(json.dumps(bp.state_dict()))
            n_before = len(online)
        online += bp.add(i, l, t)
    online += bp.flush()
    assert [list(p.sample_ids) for p in online] == res.packs
    resumed = BufferedPacker(8192, 700)
    resumed.load_state_dict(state_at)
    tail = []
    for i in range(2345, 5000):
        tail += resumed.add(i, int(lens[i]), int(tiles[i]))
    tail += resumed.flush()
    assert tail == online[n_before:]


def test_buffered_no_carry_is_independent_chunks():
    lens, _ = synth(2500, 4)
    res = pack_samples(lens, 8192, algorithm="greedy_knapsack", buffer_size=1000, carry_over=False)
    want = []
    for s in range(0, 2500, 1000):
        want += [[s + i for i in p] for p in pack_lengths(lens[s : s + 1000], 8192, "greedy_knapsack")]
    assert res.packs == want


def test_cli_and_plan_roundtrip(tmp_path):
    from mmtrain.steps.pack_cli import main

    src = tmp_path / "t.csv"
    lens, tiles = synth(500, 5)
    rows = "\n".join(f"{t},{t * 256},{l - t * 256}" for l, t in zip(lens, tiles))
    src.write_text("tiles,image_tokens,text_tokens\n" + rows + "\n")
    out = tmp_path / "PLAN.jsonl"
    # image tokens = tiles x the model's 256 tokens per tile, as in the table
    assert main([str(src), "--seq-length", "8192", "--out", str(out), "model=llava_mistral7b_clip224"]) == 0
    from mmtrain.data.lengths import load_length_table

    table = load_length_table(src)
    plan = load_plan(out, expected_fingerprint=table.fingerprint())
    check([[int(i) for i in p] for p in plan.packs], lens, 8192)  # record ids: the row numbers
    assert set(plan.lines[0]) == {"pack", "samples", "tokens"}
    with pytest.raises(PlanMismatchError, match="fingerprint"):
        load_plan(out, expected_fingerprint="sha256:other")
    with pytest.raises(ValueError, match="text_tokens"):
        bad = tmp_path / "bad.csv"
        bad.write_text("tiles,image_tokens\n1,256\n")
        load_length_table(bad)
    with pytest.raises(ValueError, match="tokens per tile"):  # tiles but no image_tokens: the model decides
        bad.write_text("tiles,text_tokens\n1,256\n")
        load_length_table(bad)
    assert load_length_table(bad, 16).image_tokens.tolist() == [16]
