"""`mmtrain pack SOURCE --out PLAN.jsonl [options] [hydra overrides]`: a plan file for a length table.

The table is read as training reads it (`data=lengths`: image tokens = tiles x the model's tokens
per tile; a table without `tiles` is used as-is), with the training config's packing settings
unless a flag says otherwise. Packs the whole table at once (default) or in buffers of N samples.
With `--dp R --micro-batches M` the packs also go through the step assembler training uses: the
last packs are re-packed so every step holds exactly R x M x micro_batch_size packs, and every
line gets `step`, `rank`, `micro_batch`; training from the plan (`packing.plan=PLAN.jsonl`) runs
exactly that. Prints the summary JSON as the last stdout line; `seconds` is packing time only.
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np


def _parser() -> argparse.ArgumentParser:
    from mmtrain.packing.algorithms import ALGORITHMS
    from mmtrain.packing.policy import OVERSIZE_POLICIES

    p = argparse.ArgumentParser(prog="mmtrain pack", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                usage="mmtrain pack SOURCE --out PLAN.jsonl [options] [hydra overrides]")
    p.add_argument("words", nargs="+", metavar="SOURCE [OVERRIDE]",
                   help="length table (CSV / Parquet / NPY: id, tiles, text_tokens) or synthetic:N, then Hydra overrides")
    p.add_argument("--out", required=True, help="PLAN.jsonl (a PLAN.jsonl.meta.json sidecar is written too)")
    p.add_argument("--seq-length", type=int, default=None, help="pack capacity (default: packing.seq_length)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--offline", action="store_true", help="pack the whole table at once (default)")
    mode.add_argument("--buffer-size", type=int, default=None, help="pack consecutive buffers of N samples")
    p.add_argument("--no-carry", action="store_true", help="buffered: emit every buffer's tail pack (Megatron behaviour)")
    p.add_argument("--algorithm", default=None, choices=["default", *ALGORITHMS], help="default: packing.algorithm")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-tiles-per-pack", type=int, default=None, help="default: packing.max_tiles_per_pack")
    p.add_argument("--max-vision-patches-per-pack", type=int, default=None,
                   help="default: packing.max_vision_patches_per_pack")
    p.add_argument("--segment-align", type=int, default=None, help="default: packing.segment_align")
    p.add_argument("--pack-align", type=int, default=None, help="default: packing.align")
    p.add_argument("--oversize", choices=OVERSIZE_POLICIES, default=None, help="default: packing.oversize_policy")
    p.add_argument("--dp", type=int, default=None, help="data-parallel ranks: also assign packs to steps")
    p.add_argument("--micro-batches", type=int, default=None, help="micro-batches per rank per step")
    p.add_argument("--micro-batch-size", type=int, default=None, help="packs per micro-batch (default: trainer.micro_batch_size)")
    p.add_argument("--pp", type=int, default=None, help="pipeline stages whose 1F1B order to optimise (default: the config's)")
    p.add_argument("--balance", default=None, help="balancing.strategy: default | lpt | karmarkar_karp | none")
    p.add_argument("--window-steps", type=int, default=None, help="default: balancing.window_steps")
    return p


def _flags(args) -> list[str]:
    out = []
    for flag, key in (("seq_length", "packing.seq_length"), ("algorithm", "packing.algorithm"),
                      ("max_tiles_per_pack", "packing.max_tiles_per_pack"),
                      ("max_vision_patches_per_pack", "packing.max_vision_patches_per_pack"),
                      ("segment_align", "packing.segment_align"),
                      ("pack_align", "packing.align"), ("oversize", "packing.oversize_policy"),
                      ("micro_batch_size", "trainer.micro_batch_size"), ("balance", "balancing.strategy"),
                      ("window_steps", "balancing.window_steps")):
        v = getattr(args, flag)
        if v is not None:
            out.append(f"{key}={v}")
    return out


def _table(cfg, source: str):
    """(record ids, tiles, decoder lengths, text tokens, fingerprint, per-sample sum of squared ViT
    image lengths or None) as training would see the table."""
    from mmtrain.models.config import is_native, tokens_per_tile
    from mmtrain.packing.plan_file import fingerprint
    from mmtrain.steps.from_config import build_source, source_fingerprint, vision_sq

    tpt = tokens_per_tile(cfg.model)
    if cfg.data.name == "lengths" and not is_native(cfg.model):
        from mmtrain.data.lengths import load_length_table

        t = load_length_table(source, tpt)
        if not t.has_tiles:  # image tokens only: as-is, no tiles (analysis tables)
            img = np.asarray(t.image_tokens, np.int64)
            text = np.asarray(t.text_tokens, np.int64)
            tiles = np.zeros_like(text)
            return [str(i) for i in t.ids], tiles, img + text, text, fingerprint(img, text, tiles), None
    src = build_source(cfg, tpt)
    tiles = np.asarray(src.tiles, np.int64)
    text = np.asarray(src.text_tokens, np.int64)
    return list(src.ids), tiles, tiles * tpt + text, text, source_fingerprint(src, tpt), vision_sq(src)


def main(argv: list[str]) -> int:
    from mmtrain.packing.plan_file import write_plan
    from mmtrain.packing.policy import pack_samples
    from mmtrain.steps.from_config import split_source, tool_config, vision_unit_cap

    args = _parser().parse_intermixed_args(argv)
    if (args.dp is None) != (args.micro_batches is None):
        print("mmtrain pack: --dp and --micro-batches go together", file=sys.stderr)
        return 2
    source, overrides = split_source(args.words)
    if source is None:
        print("mmtrain pack: give a SOURCE (length table or synthetic:N)", file=sys.stderr)
        return 2
    try:
        cfg = tool_config(source, overrides, _flags(args))
        ids, tiles, lengths, text, fp, vsq = _table(cfg, source)
        p = cfg.packing
        result = pack_samples(
            lengths, p.seq_length, algorithm=p.algorithm, buffer_size=args.buffer_size, tiles=tiles,
            max_tiles_per_pack=vision_unit_cap(cfg), segment_align=max(p.segment_align, 1),
            pack_align=max(p.align, 1), oversize_policy=p.oversize_policy, text_tokens=text, seed=args.seed,
            carry_over=not args.no_carry,
        )
        extra, summary_extra = None, {}
        if args.dp is not None:
            extra, summary_extra = _assign(cfg, result, tiles, args, vsq)
    except (ValueError, FileNotFoundError) as e:
        print(f"mmtrain pack: {source}: {e}", file=sys.stderr)
        return 1
    summary = result.summary()
    summary.update(summary_extra)
    params = {
        "seq_length": p.seq_length, "buffer_size": args.buffer_size, "carry_over": not args.no_carry,
        "algorithm": result.algorithm, "seed": args.seed, "max_tiles_per_pack": p.max_tiles_per_pack,
        "max_vision_patches_per_pack": p.max_vision_patches_per_pack,
        "segment_align": p.segment_align, "pack_align": p.align, "oversize": p.oversize_policy,
        "dp": args.dp, "micro_batches": args.micro_batches,
        "micro_batch_size": cfg.trainer.micro_batch_size if args.dp is not None else None,
        "balance": cfg.balancing.strategy if args.dp is not None else None,
        "model": cfg.model.name,
    }
    meta = {
        "source": str(source), "fingerprint": fp, "samples_in": len(ids), "params": params, "summary": summary,
        "dropped": [ids[i] for i in result.dropped],
        "truncated": {ids[k]: int(v) for k, v in sorted(result.truncated.items())},
    }
    write_plan(args.out, [[ids[i] for i in pk] for pk in result.packs], result.pack_tokens(), meta, extra)
    print(json.dumps(summary))
    return 0


def _assign(cfg, result, tiles, args, vsq=None) -> tuple[list[dict], dict]:
    """Every pack's step, rank and micro-batch by the step assembler; the packs are reordered to run order."""
    from mmtrain.balancing.assemble import assemble, complete_steps, validate_shape
    from mmtrain.packing.algorithms import align_up, effective_capacity
    from mmtrain.steps.from_config import cost_model, vision_unit_cap

    p, t, b = cfg.packing, cfg.trainer, cfg.balancing
    mbs = t.micro_batch_size
    per_step = args.dp * args.micro_batches * mbs
    validate_shape(per_step, args.dp, mbs)
    model = cost_model(cfg)
    lengths = np.asarray(result.lengths, dtype=np.int64)
    sample_cost = model.tiled_costs(lengths, tiles, vision_sq=vsq)
    packs = complete_steps(result.packs, align_up(lengths, max(p.segment_align, 1)), sample_cost, per_step,
                           effective_capacity(p.seq_length, max(p.align, 1)), sample_tiles=tiles,
                           max_tiles_per_pack=vision_unit_cap(cfg))
    costs = np.array([sample_cost[q].sum() for q in packs])
    ptiles = np.array([tiles[q].sum() for q in packs], dtype=np.float64)
    pp = args.pp or cfg.parallel.pipeline_model_parallel_size
    steps = assemble(costs, per_step, args.dp, mbs, strategy=b.strategy if b.enabled else "none", pack_tiles=ptiles,
                     window=b.window_steps * per_step, num_stages=pp, pipeline_order=b.pipeline_order,
                     seed=args.seed)
    order, extra, ratios = [], [], []
    for s, st in enumerate(steps):
        loads = []
        for r, rank in enumerate(st.ranks):
            loads.append(float(sum(costs[i] for mb in rank for i in mb)))
            for j, mb in enumerate(rank):
                for i in mb:
                    order.append(i)
                    extra.append({"step": s, "rank": r, "micro_batch": j})
        ratios.append(max(loads) / (sum(loads) / len(loads)))
    result.packs = [packs[i] for i in order]
    return extra, {"steps": len(steps), "straggler": float(np.mean(ratios)), "cost_unit": model.unit}
