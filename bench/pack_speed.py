"""Packing speed on the 1-20-tile synthetic distribution: offline 1M samples and online buffer 1000.

    .venv/bin/python bench/pack_speed.py [--repeats 3]

Prints the sorted times of each repeat for our default and for greedy_knapsack (same lengths, same run).
"""

from __future__ import annotations

import argparse
import time

import numpy as np


from mmtrain.packing.buffered import BufferedPacker  # noqa: E402
from mmtrain.packing.policy import pack_samples  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--offline-samples", type=int, default=1_000_000)
    ap.add_argument("--online-samples", type=int, default=200_000)
    a = ap.parse_args()
    rng = np.random.default_rng(0)
    tiles = rng.integers(1, 21, a.offline_samples)
    lengths = tiles * 256 + rng.integers(16, 129, a.offline_samples)
    for alg in ("default", "greedy_knapsack"):
        times, res = [], None
        for _ in range(a.repeats):
            t0 = time.perf_counter()
            res = pack_samples(lengths, 8192, algorithm=alg, tiles=tiles)
            times.append(time.perf_counter() - t0)
        s = res.summary()
        print(f"offline {alg:16s} {a.offline_samples} samples: " + " / ".join(f"{t:.2f} s" for t in sorted(times))
              + f"  packs {s['packs']} efficiency {s['efficiency']:.4f}")
    m = a.online_samples
    for alg in ("default", "greedy_knapsack"):
        rates = []
        for _ in range(a.repeats):
            p = BufferedPacker(8192, 1000, alg)
            t0 = time.perf_counter()
            for i in range(m):
                p.add(i, int(lengths[i]), int(tiles[i]))
            p.flush()
            rates.append(m / (time.perf_counter() - t0))
        print(f"online  {alg:16s} buffer 1000: " + " / ".join(f"{r:,.0f}" for r in sorted(rates)) + " samples/s")


if __name__ == "__main__":
    main()
