"""Local-search repair (mmtrain.packing.repair): `top_up` per buffer (carry mode) and
`repair_packs` on finished offline plans."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mmtrain.packing.algorithms import align_up, effective_capacity, pack_function, pack_lengths
from mmtrain.packing.baselines import ffd
from mmtrain.packing.buffered import BufferedPacker
from mmtrain.packing.buffering import CarryOptions, pack_buffer
from mmtrain.packing.policy import pack_samples
from mmtrain.packing.search import FillOptions
from mmtrain.packing.repair import repair_packs, top_up
from packing_checks import DATA, check, synth


def _tokens(packs, lens):
    return sum(int(lens[i]) for p in packs for i in p)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("sa,pa,max_tiles", [(1, 1, None), (8, 1, None), (1, 64, None), (16, 128, 24), (1, 1, 20)])
def test_pack_buffer_top_up_valid_and_only_raises_emitted_tokens(seed, sa, pa, max_tiles):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(50, 400))
    lens, tiles = synth(n, seed)
    lens = lens // int(rng.integers(1, 4))
    o = CarryOptions()
    carry = rng.integers(0, o.max_carries + 1, n)
    kw = dict(tiles=tiles if max_tiles else None, max_tiles_per_pack=max_tiles, segment_align=sa, pack_align=pa,
              carry=carry, buffer_size=n, top_up_held=True)
    emitted, held = pack_buffer(lens, 8192, pack_function("fill"), **kw)
    emitted0, held0 = pack_buffer(lens, 8192, pack_function("fill"), options=CarryOptions(top_up=False), **kw)
    assert sorted([i for p in emitted for i in p] + held) == list(range(n))  # exactly once
    cap = effective_capacity(8192, pa)
    eff = align_up(lens, sa)
    for p in emitted:
        assert eff[p].sum() <= cap
        if max_tiles:
            assert tiles[p].sum() <= max_tiles
    assert len(emitted) == len(emitted0)
    assert _tokens(emitted, eff) >= _tokens(emitted0, eff)
    assert len(held) <= int(n * o.carry_fraction)
    assert all(carry[i] < o.max_carries for i in held)
    assert held == sorted(held)


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.integers(1, 900), min_size=2, max_size=60),
    st.lists(st.integers(1, 900), min_size=1, max_size=30),
    st.integers(0, 4),
    st.one_of(st.none(), st.integers(4, 12)),
)
def test_top_up_property(pack_lens, held_lens, slack_seed, max_tiles):
    cap = 1000
    lens = pack_lens + held_lens
    tls = [(x * 7 + slack_seed) % 5 for x in lens]
    # packs: greedy over pack_lens (valid under cap and the tile limit)
    packs, cur, r, t = [], [], cap, max_tiles or 1 << 62
    for i, x in enumerate(pack_lens):
        if x > r or tls[i] > t:
            packs.append(cur)
            cur, r, t = [], cap, max_tiles or 1 << 62
        if tls[i] > t:
            continue
        cur.append(i)
        r -= x
        t -= tls[i]
    if cur:
        packs.append(cur)
    packs = [p for p in packs if p]
    inside = {i for p in packs for i in p}
    held = [i for i in range(len(lens)) if i not in inside]
    before = _tokens(packs, lens)
    out, out_held = top_up(packs, held, lens, cap, tls, max_tiles, max_held=len(held) + 3)
    again = top_up(packs, held, lens, cap, tls, max_tiles, max_held=len(held) + 3)
    assert (out, out_held) == again  # deterministic
    assert len(out) == len(packs)
    assert sorted([i for p in out for i in p] + out_held) == list(range(len(lens)))
    for p in out:
        assert sum(lens[i] for i in p) <= cap
        if max_tiles is not None:
            assert sum(tls[i] for i in p) <= max_tiles
    assert _tokens(out, lens) >= before
    assert len(out_held) <= len(held) + 3


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(1, 1000), min_size=2, max_size=80), st.one_of(st.none(), st.integers(6, 15)),
       st.integers(1, 6))
def test_repair_packs_property(lens, max_tiles, k):
    cap = 1000
    tls = [(x * 3) % 6 for x in lens]
    arr = np.asarray(lens)
    base = ffd(arr, cap, np.asarray(tls) if max_tiles else None, max_tiles)
    out = repair_packs(base, lens, cap, tls if max_tiles else None, max_tiles, max_k=k, work=50_000)
    assert out == repair_packs(base, lens, cap, tls if max_tiles else None, max_tiles, max_k=k, work=50_000)
    assert len(out) <= len(base)
    check(out, lens, cap, tls, max_tiles)


def test_repair_packs_removes_a_pack_by_exchange():
    # [600, 200] and [700, 100] have 200 free each, but 250 fits neither: exchanging the 200 for
    # the 250 frees the 200, which then fills the second pack -> 2 packs instead of 3
    lens = [600, 200, 700, 100, 250]
    out = repair_packs([[0, 1], [2, 3], [4]], lens, 1000)
    assert len(out) == 2
    check(out, lens, 1000)
    # with a 4-tile limit the freed 200 (2 tiles) cannot join [700, 100] (4 tiles): nothing changes
    assert repair_packs([[0, 1], [2, 3], [4]], lens, 1000, [2, 2, 2, 2, 1], 4) == [[0, 1], [2, 3], [4]]


@pytest.mark.parametrize("sa,pa,max_tiles", [(1, 1, None), (16, 128, 40)])
def test_fill_offline_with_repair_valid(sa, pa, max_tiles):
    lens, tiles = synth(6000, 7)
    packs = pack_lengths(lens, 8192, "fill", tiles=tiles, max_tiles_per_pack=max_tiles, segment_align=sa, pack_align=pa)
    check(packs, lens, 8192, tiles, max_tiles, sa, pa)
    assert packs == pack_lengths(lens, 8192, "fill", tiles=tiles, max_tiles_per_pack=max_tiles, segment_align=sa,
                                 pack_align=pa)


def test_offline_repair_never_increases_pack_count():
    lens, tiles = synth(6000, 11)
    with_repair = pack_lengths(lens, 8192, "fill", tiles=tiles, max_tiles_per_pack=60)
    without = pack_lengths(lens, 8192, "fill", tiles=tiles, max_tiles_per_pack=60, fill_options=FillOptions(repair=False))
    assert len(with_repair) <= len(without)


@pytest.mark.parametrize("buf", [100, 1000])
def test_buffered_top_up_online_equals_offline_with_limits(buf):
    lens, tiles = synth(4000, 5)
    kw = dict(max_tiles_per_pack=40, segment_align=8, pack_align=64)
    res = pack_samples(lens, 8192, buffer_size=buf, tiles=tiles, **kw)
    check(res.packs, lens, 8192, tiles, 40, 8, 64)
    bp = BufferedPacker(8192, buf, **kw)
    online = []
    for i, (x, t) in enumerate(zip(lens.tolist(), tiles.tolist())):
        online += bp.add(i, x, t)
    online += bp.flush()
    assert [list(p.sample_ids) for p in online] == res.packs
    assert res.packs == pack_samples(lens, 8192, buffer_size=buf, tiles=tiles, **kw).packs


def test_repair_pack_counts_on_bench_sets():
    # bench/results/packing.md: docvqa b1000 1837 -> 1834, offline 1835 -> 1827; chartqa b100 3032 -> 3020,
    # offline 2927 -> 2922 (the LNS step)
    from mmtrain.data.lengths import load_length_table

    for name, b, most in (("docvqa_train_10k", 1000, 1835), ("chartqa_train_18k", 100, 3020),
                          ("docvqa_train_10k", None, 1827), ("chartqa_train_18k", None, 2922)):
        lens = load_length_table(DATA / f"{name}.csv").lengths
        r = pack_samples(lens, 8192, buffer_size=b)
        check(r.packs, lens, 8192)
        assert len(r.packs) <= most, (name, b, len(r.packs))


def test_offline_lns_and_repair_same_with_and_without_extension():
    # the LNS refill of a many-key input takes the buffer path (C when built): packings must not differ
    lens, tiles = synth(6000, 13)
    with_ext = pack_lengths(lens, 8192, "fill", tiles=tiles, max_tiles_per_pack=50, segment_align=8)
    assert pack_lengths(lens, 8192, "fill", tiles=tiles, max_tiles_per_pack=50, segment_align=8,
                        fill_options=FillOptions(use_extension=False)) == with_ext


def test_offline_lns_few_keys_valid_and_not_worse():
    # few distinct keys (VLM-like: tiles * 256 + short text): the LNS refills with the full builders
    rng = np.random.default_rng(3)
    tiles = rng.choice([1, 3, 5, 5, 5, 5], 7000)
    lens = tiles * 256 + rng.integers(30, 140, 7000)
    got = pack_lengths(lens, 8192, "fill", tiles=tiles, max_tiles_per_pack=30, pack_align=16)
    check(got, lens, 8192, tiles, 30, 1, 16)
    assert len(got) <= len(pack_lengths(lens, 8192, "fill", tiles=tiles, max_tiles_per_pack=30, pack_align=16,
                                        fill_options=FillOptions(lns_sizes=())))
