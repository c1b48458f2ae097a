"""Packing benchmark: per dataset, algorithm x buffer -> packs, lower bound, efficiency, seconds.

    .venv/bin/python bench/pack_bench.py [--data DIR] [--seq-length 8192] [--big 1000000]

Baselines (greedy_knapsack = Megatron-LM's buffer packer, ffd, bfd) run on the same lengths in
the same process. `best_lb` = max of the volume, Martello-Toth L2 and floor-DFF bounds
(mmtrain.packing.bounds; with --lp also the column-generation LP bound); `vs_lb` = best_lb / packs,
i.e. efficiency relative to the best efficiency any plan could reach.
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import numpy as np

from mmtrain.data.lengths import load_length_table
from mmtrain.packing.algorithms import ALGORITHMS, DEFAULT_ALGORITHM
from mmtrain.packing.bounds import best_lower_bound
from mmtrain.packing.buffered import BufferedPacker
from mmtrain.packing.policy import pack_samples


def synthetic(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    tiles = rng.integers(1, 21, n)
    return tiles * 256 + rng.integers(16, 129, n), tiles


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default=str(Path(__file__).resolve().parents[1].parent / "shared" / "data"))
    ap.add_argument("--seq-length", type=int, default=8192)
    ap.add_argument("--big", type=int, default=1_000_000)
    ap.add_argument("--buffers", default="100,1000")
    ap.add_argument("--lp", action="store_true", help="also run the LP bound (slow: up to --lp-seconds per set)")
    ap.add_argument("--lp-seconds", type=float, default=60.0)
    args = ap.parse_args()
    L = args.seq_length
    print(f"machine: {platform.processor() or platform.machine()}, python {platform.python_version()}, "
          f"single process (1 core)\n")
    sets = {}
    for f in sorted(Path(args.data).glob("*.csv")):
        t = load_length_table(f)
        sets[f.stem] = (t.lengths, t.tiles)
    sets["synthetic_1-20tiles_100k"] = synthetic(100_000)
    order = [DEFAULT_ALGORITHM] + [a for a in sorted(ALGORITHMS) if a != DEFAULT_ALGORITHM]
    modes = [(None, True)] + [(int(b), c) for b in args.buffers.split(",") for c in (True, False)]
    bounds = {}
    for name, (lens, tiles) in sets.items():
        b = best_lower_bound(lens, L, lp=args.lp, time_limit=args.lp_seconds)
        bounds[name] = b["best"]
        info = b.get("lp_info", {})
        print(f"bounds {name}: volume {b['volume']}, L2 {b['l2']}, floor {b['floor']} (q, s = {b['floor_qs']}), "
              f"lp {b.get('lp', '-')} {({k: info[k] for k in ('lp', 'farley', 'iters', 'optimal')} if info else '')}; "
              f"best {b['best']} -> max efficiency {lens.sum() / (b['best'] * L):.4f}", flush=True)
    print()
    print("| dataset | algorithm | buffer | carry | packs | volume lb | best_lb | efficiency | vs_lb | seconds |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, (lens, tiles) in sets.items():
        best_lb = bounds[name]
        for buf, carry in modes:
            for alg in order:
                r = pack_samples(lens, L, algorithm=alg, buffer_size=buf, carry_over=carry)
                s = r.summary()
                print(f"| {name} | {alg} | {buf or 'offline'} | {carry if buf else '-'} | {s['packs']} | "
                      f"{s['lower_bound_packs']} | {best_lb} | {s['efficiency']:.4f} | {best_lb / s['packs']:.4f} | "
                      f"{s['seconds']:.3f} |",
                      flush=True)
    lens, _ = synthetic(args.big, 1)
    print(f"\nspeed, synthetic {args.big:,} samples:")
    for alg in (DEFAULT_ALGORITHM, "greedy_knapsack", "ffd"):
        r = pack_samples(lens, L, algorithm=alg)
        s = r.summary()
        print(f"  offline {alg}: {s['seconds']:.3f} s, packs {s['packs']}, lb {s['lower_bound_packs']}, eff {s['efficiency']:.4f}")
    n = 200_000
    for alg in (DEFAULT_ALGORITHM, "greedy_knapsack", "ffd"):
        bp = BufferedPacker(L, 1000, alg)
        ls = lens[:n].tolist()
        t0 = time.perf_counter()
        packs = 0
        for i, x in enumerate(ls):
            packs += len(bp.add(i, x))
        packs += len(bp.flush())
        dt = time.perf_counter() - t0
        print(f"  online BufferedPacker({alg}, buffer 1000): {n / dt:,.0f} samples/s ({packs} packs)")


if __name__ == "__main__":
    main()
