"""Lower bounds (validity vs brute force) and the minimum-slack DP builder of `fill`."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mmtrain.packing import fill_builders as F
from mmtrain.packing.algorithms import pack_lengths
from mmtrain.packing.baselines import greedy_knapsack
from mmtrain.packing.common import NO_TILE_LIMIT, KeyPool
from mmtrain.packing.search import FillOptions
from packing_checks import DATA, brute_min_packs, check, synth

from mmtrain.packing.bounds import best_lower_bound, floor_bound, l2_bound, lp_bound, volume_bound


@settings(max_examples=30, deadline=None)
@given(st.lists(st.integers(1, 60), min_size=1, max_size=6), st.integers(60, 120))
def test_bounds_never_exceed_optimum(lens, cap):
    opt = brute_min_packs(lens, cap)
    b = best_lower_bound(lens, cap, lp=True, time_limit=5.0)
    assert b["volume"] <= b["best"] <= opt
    assert max(b["l2"], b["floor"], b["lp"]) == b["best"]


def test_l2_counts_big_items():
    # three items just over L/2 need three packs; the volume bound says 2
    lens = [51, 51, 51]
    assert volume_bound(lens, 100) == 2
    assert l2_bound(lens, 100) == 3
    assert lp_bound(lens, 100)["bound"] == 3


def test_floor_bound_is_tile_bound_on_vlm_lengths():
    lens, tiles = synth(20000, 7)
    b, (q, s) = floor_bound(lens, 8192)
    assert b >= -(-int(tiles.sum()) // 31)  # <= 31 tiles of 256 tokens per pack (text >= 16 each)
    assert b >= volume_bound(lens, 8192)


def test_lp_bound_valid_and_farley_monotone():
    rng = np.random.default_rng(0)
    lens = rng.integers(20, 70, 40)
    r = lp_bound(lens, 100, time_limit=10)
    assert r["bound"] >= volume_bound(lens, 100)
    packs = pack_lengths(lens, 100)
    check(packs, lens, 100)
    assert r["bound"] <= len(packs)


def test_dp_builder_finds_exact_fill():
    # 10 = 6 + 4 = 5 + 3 + 2: every pack can be exactly full
    lens = [6, 4, 5, 3, 2] * 30
    pool = KeyPool(np.asarray(lens), None)
    used = F._build_dp_pattern(pool, 10, NO_TILE_LIMIT)
    assert sum(k * m for k, m in used.items()) == 10
    packs = pack_lengths(lens, 10)
    check(packs, lens, 10)
    assert len(packs) == sum(lens) // 10


@pytest.mark.parametrize("maxk", [4, 16, 256])
def test_dp_builder_valid_with_tiles_and_alignment(maxk):
    lens, tiles = synth(6000, 11)
    opts = FillOptions(builders=(lambda p, c, t: F._build_dp_pattern(p, c, t, maxk=maxk),))
    kw = dict(tiles=tiles, max_tiles_per_pack=24, segment_align=16, pack_align=128, fill_options=opts)
    p = pack_lengths(lens, 8192, "fill", **kw)
    check(p, lens, 8192, tiles, 24, 16, 128)
    assert p == pack_lengths(lens, 8192, "fill", **kw)


def test_fill_near_volume_bound_on_ai2d():
    from mmtrain.data.lengths import load_length_table

    lens = load_length_table(DATA / "ai2d_train_12k.csv").lengths
    packs = pack_lengths(lens, 8192)
    check(packs, lens, 8192)
    assert len(packs) <= volume_bound(lens, 8192) + 2  # efficiency >= 0.998


@pytest.mark.parametrize("tiles_limit", [None, 24])
def test_count_based_largest_fits_is_greedy_knapsack(tiles_limit):
    # repeating greedy's pack pattern while counts allow reproduces greedy_knapsack exactly
    lens, tiles = synth(4000, 21)
    lens = lens // 64 * 64  # many repeated lengths, so patterns repeat
    tl = tiles if tiles_limit else None
    tb = tiles_limit or NO_TILE_LIMIT
    got = F.fill_with(F._build_largest_fits, lens, 8192, tl, tb)
    want = greedy_knapsack(lens, 8192, tl, tiles_limit)
    assert sorted(map(sorted, got)) == sorted(map(sorted, want))


def test_dp_prefer_small_same_slack_smaller_items():
    lens = [60, 40, 30, 20, 10] * 3 + [100]
    for prefer_small in (False, True):
        pool = KeyPool(np.asarray(lens), None)
        used = F._build_dp_pattern(pool, 150, NO_TILE_LIMIT, prefer_small=prefer_small)
        assert sum(k * m for k, m in used.items()) == 150 and used[100] == 1
        if prefer_small:
            assert max(k for k in used if k != 100) <= 30


def test_dp_memo_respects_counts():
    # residual 4 recurs; after the 2s run out the cached {2: 2} must not be reused
    lens = [6] * 5 + [2] * 4 + [4] * 3
    packs = pack_lengths(lens, 10)
    check(packs, lens, 10)
    assert len(packs) == 5


def test_offline_fill_not_worse_than_buffered_with_carry():
    from mmtrain.packing.policy import pack_samples

    lens, _ = synth(12000, 5)
    off = pack_samples(lens, 8192)
    check(off.packs, lens, 8192)
    for b in FillOptions().offline_buffers:
        assert len(off.packs) <= len(pack_samples(lens, 8192, buffer_size=b).packs)


def test_docvqa_offline_at_least_buffered():
    from mmtrain.data.lengths import load_length_table
    from mmtrain.packing.policy import pack_samples

    lens = load_length_table(DATA / "docvqa_train_10k.csv").lengths
    off = pack_lengths(lens, 8192)
    check(off, lens, 8192)
    assert len(off) <= len(pack_samples(lens, 8192, buffer_size=1000).packs)


def test_buffered_carry_pack_counts_do_not_regress():
    # MAX_CARRIES 4 -> 6: chartqa b100 3042 -> 3032, docvqa b1000 1839 -> 1837 (bench/results/packing.md)
    from mmtrain.data.lengths import load_length_table
    from mmtrain.packing.policy import pack_samples

    for name, b, most in (("chartqa_train_18k", 100, 3032), ("docvqa_train_10k", 1000, 1837)):
        lens = load_length_table(DATA / f"{name}.csv").lengths
        r = pack_samples(lens, 8192, buffer_size=b)
        check(r.packs, lens, 8192)
        assert len(r.packs) <= most
