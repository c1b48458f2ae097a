"""`mmtrain pack --dp`: every step full (no idle rank), checked independently from PLAN.jsonl."""

from __future__ import annotations

import collections
import json

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from mmtrain.balancing.assign import split_remainder
from mmtrain.cli import main as cli


def cost(n: int) -> float:  # the anchors' cost model, recomputed here on purpose
    return 29e9 * n + 0.5e6 * n * n


@settings(max_examples=60, deadline=None)
@given(
    lengths=st.lists(st.integers(1, 900), min_size=1, max_size=120),
    slots=st.integers(1, 9),
    pack_size=st.integers(1, 6),
)
def test_split_remainder_keeps_every_sample_once_and_fills_steps(lengths, slots, pack_size):
    packs = [list(range(i, min(i + pack_size, len(lengths)))) for i in range(0, len(lengths), pack_size)]
    out = split_remainder(packs, lengths, [cost(n) for n in lengths], slots, capacity=4096)
    assert sorted(i for p in out for i in p) == list(range(len(lengths)))
    assert all(p for p in out)
    assert all(sum(lengths[i] for i in p) <= max(4096, sum(lengths[i] for i in packs[0])) for p in out)
    pool = sum(len(p) for p in sorted(packs, key=lambda p: sum(cost(lengths[i]) for i in p))[: len(packs) % slots])
    if len(packs) % slots and pool >= slots:
        assert len(out) % slots == 0


def test_pack_cli_with_dp_has_no_idle_rank_and_low_straggler(tmp_path):
    rng = np.random.default_rng(0)
    n = 6000
    tiles = rng.integers(1, 21, n)
    text = rng.integers(16, 129, n)
    table = tmp_path / "t.csv"
    table.write_text("tiles,image_tokens,text_tokens\n" + "".join(f"{t},{256 * t},{x}\n" for t, x in zip(tiles, text)))
    for dp in (4, 64):
        plan = tmp_path / f"p{dp}.jsonl"
        assert cli(["pack", str(table), "--seq-length", "8192", "--buffer-size", "1000", "--dp", str(dp),
                    "--micro-batches", "1", "--out", str(plan)]) == 0
        lengths = 256 * tiles + text
        steps: dict = collections.defaultdict(lambda: [0.0] * dp)
        seen = []
        for line in plan.read_text().splitlines():
            d = json.loads(line)
            assert d["tokens"] <= 8192
            steps[d["step"]][d["rank"]] += sum(cost(int(lengths[i])) for i in d["samples"])
            seen += d["samples"]
        assert sorted(seen) == list(range(n))
        ratios = [max(v) / (sum(v) / dp) for v in steps.values()]  # idle ranks count as 0
        assert min(min(v) for v in steps.values()) > 0, "a rank idles in some step"
        assert sum(ratios) / len(ratios) <= (1.005 if dp == 4 else 1.01), (dp, sum(ratios) / len(ratios))
