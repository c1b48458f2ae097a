"""Shared checks for the packing tests: plan validity, synthetic lengths, brute-force optimum."""

import itertools
from pathlib import Path

import numpy as np

from mmtrain.packing.algorithms import align_up

DATA = Path(__file__).resolve().parent / "assets"  # real length tables (see assets/README.md)


def check(packs, lengths, cap, tiles=None, max_tiles=None, sa=1, pa=1, n=None):
    n = len(lengths) if n is None else n
    flat = sorted(i for p in packs for i in p)
    assert flat == list(range(n)), "every sample exactly once"
    lengths = np.asarray(lengths)
    for p in packs:
        assert p, "no empty packs"
        used = int(align_up(align_up(lengths[p], sa).sum(), pa))
        assert used <= cap
        if max_tiles is not None:
            assert int(np.asarray(tiles)[p].sum()) <= max_tiles


def synth(n, seed=0):
    rng = np.random.default_rng(seed)
    tiles = rng.integers(1, 21, n)
    return tiles * 256 + rng.integers(16, 129, n), tiles


def brute_min_packs(lens, cap):
    n = len(lens)
    best = n
    for assign in itertools.product(range(n), repeat=n):
        if max(assign) + 1 >= best or any(assign[i] > max(assign[:i], default=-1) + 1 for i in range(n)):
            continue
        sums = [0] * n
        for i, b in enumerate(assign):
            sums[b] += lens[i]
        if max(sums) <= cap:
            best = max(assign) + 1
    return best
