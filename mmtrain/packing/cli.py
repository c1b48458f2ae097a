"""`mmtrain pack SOURCE --seq-length L ... --out PLAN.jsonl`: plan packs for a length table.

Prints the summary JSON as the last stdout line; `seconds` is packing time only (no I/O).
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np

from mmtrain.packing.algorithms import ALGORITHMS
from mmtrain.packing.policy import OVERSIZE_POLICIES, plan_packs


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mmtrain pack", description=__doc__)
    p.add_argument("source", help="length table: CSV / Parquet / NPY with image_tokens,text_tokens[,tiles,id]")
    p.add_argument("--seq-length", type=int, required=True, help="pack capacity L in tokens")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--offline", action="store_true", help="pack the whole table at once (default)")
    mode.add_argument("--buffer-size", type=int, default=None, help="pack consecutive buffers of N samples")
    p.add_argument("--no-carry", action="store_true", help="buffered: emit every buffer's tail pack (Megatron behaviour)")
    p.add_argument("--algorithm", default="default", choices=["default", *ALGORITHMS])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-tiles-per-pack", type=int, default=None)
    p.add_argument("--segment-align", type=int, default=1)
    p.add_argument("--pack-align", type=int, default=1)
    p.add_argument("--oversize", choices=OVERSIZE_POLICIES, default="error")
    p.add_argument("--out", required=True, help="PLAN.jsonl (a PLAN.jsonl.meta.json sidecar is written too)")
    p.add_argument("--dp", type=int, default=None, help="data-parallel ranks: also assign packs to steps")
    p.add_argument("--micro-batches", type=int, default=None)
    p.add_argument("--no-full-steps", action="store_true",
                   help="with --dp: keep a partial last step (some ranks idle) instead of re-packing the "
                        "remainder into dp x micro-batches smaller packs")
    p.add_argument("--balance", default=None, help="balancing strategy (mmtrain.balancing.assign)")
    return p


def _assign(result, tiles, args) -> list[dict]:
    from mmtrain.balancing.assign import assign_packs_to_steps, split_remainder
    from mmtrain.balancing.cost import CostModel
    from mmtrain.packing.algorithms import align_up, effective_capacity

    model = CostModel.default()
    if not args.no_full_steps:  # no rank idles in the last step: re-pack the remainder into dp*M packs
        lengths = np.asarray(result.lengths, dtype=np.int64)
        result.packs = split_remainder(
            result.packs,
            align_up(lengths, args.segment_align),
            model.sample_costs(lengths, np.asarray(tiles)),
            args.dp * args.micro_batches,
            effective_capacity(args.seq_length, args.pack_align),
            sample_tiles=tiles,
            max_tiles_per_pack=args.max_tiles_per_pack,
        )
    costs = [model.pack_cost([int(result.lengths[i]) for i in p], [int(tiles[i]) for i in p]) for p in result.packs]
    kw = {} if args.balance is None else {"strategy": args.balance}
    where = assign_packs_to_steps(costs, dp=args.dp, micro_batches=args.micro_batches, **kw)
    return [{"step": int(s), "rank": int(r), "micro_batch": int(m)} for s, r, m in where]


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    if (args.dp is None) != (args.micro_batches is None):
        print("mmtrain pack: --dp and --micro-batches go together", file=sys.stderr)
        return 2
    from mmtrain.data.lengths import load_length_table
    from mmtrain.packing.plan_file import write_plan

    table = load_length_table(args.source)
    try:
        result = plan_packs(
            table.lengths, args.seq_length, algorithm=args.algorithm, buffer_size=args.buffer_size,
            tiles=table.tiles, max_tiles_per_pack=args.max_tiles_per_pack, segment_align=args.segment_align,
            pack_align=args.pack_align, oversize_policy=args.oversize, text_tokens=table.text_tokens,
            seed=args.seed, carry_over=not args.no_carry,
        )
    except ValueError as e:
        print(f"mmtrain pack: {args.source}: {e}", file=sys.stderr)
        return 1
    extra = _assign(result, table.tiles, args) if args.dp is not None else None
    summary = result.summary()
    params = {
        "seq_length": args.seq_length, "buffer_size": args.buffer_size, "carry_over": not args.no_carry,
        "algorithm": result.algorithm, "seed": args.seed, "max_tiles_per_pack": args.max_tiles_per_pack,
        "segment_align": args.segment_align, "pack_align": args.pack_align, "oversize": args.oversize,
        "dp": args.dp, "micro_batches": args.micro_batches, "balance": args.balance,
    }
    meta = {
        "format": "mmtrain.plan/1", "source": str(args.source), "fingerprint": table.fingerprint(),
        "samples_in": len(table), "params": params, "summary": summary,
        "dropped": [int(i) for i in result.dropped],
        "truncated": {str(k): int(v) for k, v in sorted(result.truncated.items())},
    }
    write_plan(args.out, result.packs, result.pack_tokens(), meta, extra)
    print(json.dumps(summary))
    return 0
