"""`mmtrain analyze`: token statistics of a data source, before choosing packing settings.

Two modes:
* training config: `mmtrain analyze --out DIR [hydra overrides]` (e.g. `model=... data=llava_json
  data.source=...`) opens the source exactly as `python -m mmtrain.train` would and reports the
  lengths training will see (mmtrain/analysis/training.py), with `packing.seq_length` marked;
* a file: `mmtrain analyze SOURCE --out DIR [accounting flags]` counts tokens by the flags given
  (native resolution by default), for data not yet wired into a training config.

Why exact counts: `ranges` (inclusive) and `at_least` are integer counts over integer token
counts, so a data set's published figures (e.g. LLaVA-Pretrain: share of samples with 500-1500
image tokens, number with >= 3000) are reproduced exactly; percentiles use numpy's default linear
interpolation. Samples with errors are excluded from the statistics and listed under `errors`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from typing import Any, Sequence

import numpy as np

PERCENTILES = (50.0, 90.0, 99.0, 99.9)
QUANTITIES = ("image_tokens", "text_tokens", "total_tokens")
DEFAULT_RANGES = "500-1500"
DEFAULT_THRESHOLDS = "3000"


# --- statistics -------------------------------------------------------------------------------


def parse_ranges(text: str) -> list[tuple[str, int, float]]:
    """'500-1500,3000-' -> [(key, lo, hi)], inclusive; 'LO-' has no upper end."""
    out = []
    for item in filter(None, (p.strip() for p in text.split(","))):
        lo, sep, hi = item.partition("-")
        if not sep or not lo.strip():
            raise ValueError(f"range {item!r} is not LO-HI")
        lo_i = int(lo)
        hi_v: float = float("inf") if not hi.strip() else int(hi)
        if hi_v < lo_i:
            raise ValueError(f"range {item!r} is empty (HI < LO)")
        out.append((f"{lo_i}-{'' if hi_v == float('inf') else int(hi_v)}", lo_i, hi_v))
    return out


def parse_thresholds(text: str) -> list[int]:
    return [int(p) for p in (q.strip() for q in text.split(",")) if p]


def _num(x: Any) -> int | float:
    """JSON-friendly number: integral values as int."""
    x = float(x)
    return int(x) if x.is_integer() else x


def quantity_stats(
    values: np.ndarray, ranges: list[tuple[str, int, float]], thresholds: list[int]
) -> dict[str, Any]:
    """count/min/max/mean/percentiles plus exact range fractions and threshold counts."""
    v = np.asarray(values, dtype=np.int64)
    n = int(v.size)
    range_counts = {key: int(np.count_nonzero((v >= lo) & (v <= hi))) for key, lo, hi in ranges}
    if n:
        pct = np.percentile(v, PERCENTILES)
        base = {
            "count": n,
            "min": int(v.min()),
            "max": int(v.max()),
            "mean": float(v.mean()),
            "percentiles": {f"{q:g}": _num(p) for q, p in zip(PERCENTILES, pct)},
        }
    else:
        base = {"count": 0, "min": None, "max": None, "mean": None, "percentiles": None}
    return base | {
        "ranges": {key: (c / n if n else 0.0) for key, c in range_counts.items()},
        "range_counts": range_counts,
        "at_least": {str(t): int(np.count_nonzero(v >= t)) for t in thresholds},
    }


def compute_stats(result, ranges, thresholds) -> dict[str, Any]:
    """stats.json's body for a ScanResult (without source/accounting metadata)."""
    out: dict[str, Any] = {
        "samples": {
            "scanned": int(result.num_scanned),
            "used": len(result),
            "with_errors": int(result.errors.total),
        }
    }
    for q in QUANTITIES:
        out[q] = quantity_stats(getattr(result, q), ranges, thresholds)
    if len(result) and np.any(np.asarray(result.tiles) > 0):
        out["tiles"] = quantity_stats(result.tiles, [], [])
    out["errors"] = result.errors.to_dict()
    out["notes"] = list(result.notes)
    if result.errors.total:
        out["notes"].append(f"{result.errors.total} samples with errors are excluded from the statistics")
    return out


# --- command line -----------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mmtrain analyze",
        description="Token statistics and histograms. With Hydra overrides only (`mmtrain analyze --out DIR "
        "model=... data=...`): the lengths training will see, from the training config. With a SOURCE "
        "(LLaVA JSON/JSONL, WebDataset tars, length table CSV/Parquet/NPY, image folder, or "
        "synthetic:KEY=VALUE,...): counted by the accounting flags below.",
        usage="mmtrain analyze --out DIR [hydra overrides]  |  mmtrain analyze SOURCE --out DIR [options]",
    )
    p.add_argument("inputs", nargs="*", metavar="SOURCE | OVERRIDE",
                   help="a data source, or Hydra overrides of the training config (KEY=VALUE ...)")
    p.add_argument("--image-root", default=None, help="folder that LLaVA `image` paths are relative to")
    p.add_argument("--out", required=True, help="output folder (stats.json, *.png, summary.md)")
    p.add_argument("--ranges", default=DEFAULT_RANGES, help="inclusive ranges, e.g. 500-1500,1501-3000,3000-")
    p.add_argument("--thresholds", default=DEFAULT_THRESHOLDS, help="count samples >= each, e.g. 3000,4096")
    acc = p.add_argument_group("image-token accounting (ignored for length tables)")
    acc.add_argument("--patch-size", type=int, default=14)
    acc.add_argument("--rounding", choices=("ceil", "floor"), default="ceil")
    acc.add_argument("--merge", type=int, choices=(1, 2), default=1, help="spatial merge per side (2 = 2x2)")
    acc.add_argument("--class-token", action="store_true", help="one extra token per image / tile")
    acc.add_argument("--tiling", choices=("native", "dynamic"), default="native")
    acc.add_argument("--tile-size", type=int, default=448)
    acc.add_argument("--min-tiles", type=int, default=1)
    acc.add_argument("--max-tiles", type=int, default=12)
    acc.add_argument("--thumbnail", action="store_true", help="dynamic: add a thumbnail tile when tiles > 1")
    acc.add_argument("--tokens-per-tile", type=int, default=None, help="override (tile/patch/merge)^2")
    acc.add_argument("--tokenizer", default=None, help="local HF tokenizer folder or tokenizer.json (default: bytes)")
    acc.add_argument("--max-images", type=int, default=1, help="images allowed per sample")
    run = p.add_argument_group("run")
    run.add_argument("--workers", type=int, default=None, help="header-reading threads (default: 4 per core, at most 16)")
    run.add_argument("--seq-length", type=int, default=None,
                     help="SOURCE mode: mark this packing length (training-config mode: packing.seq_length)")
    run.add_argument("--bins", type=int, default=100)
    run.add_argument("--no-plots", action="store_true", help="skip the PNG histograms")
    run.add_argument("--no-progress", action="store_true")
    run.add_argument("--strict", action="store_true", help="exit 1 if any sample has an error")
    return p


def _accounting(args):
    from mmtrain.data.accounting import TokenAccounting

    return TokenAccounting(
        mode=args.tiling,
        patch_size=args.patch_size,
        rounding=args.rounding,
        merge=args.merge,
        class_token=args.class_token,
        tile_size=args.tile_size,
        min_tiles=args.min_tiles,
        max_tiles=args.max_tiles,
        thumbnail=args.thumbnail,
        tokens_per_tile=args.tokens_per_tile,
    )


def is_training_config(inputs: Sequence[str]) -> bool:
    """No SOURCE given, or only KEY=VALUE words that are not paths: the training-config mode."""
    return all("=" in w and not w.startswith("synthetic:") and not os.path.exists(w) for w in inputs)


# Flags of the SOURCE mode; in the training-config mode the config decides them.
_FILE_ONLY = ("image_root", "patch_size", "rounding", "merge", "class_token", "tiling", "tile_size", "min_tiles",
              "max_tiles", "thumbnail", "tokens_per_tile", "tokenizer", "max_images", "seq_length")


def _file_flags_given(args: argparse.Namespace) -> list[str]:
    defaults = build_parser()
    return [f"--{d.replace('_', '-')}" for d in _FILE_ONLY if getattr(args, d) != defaults.get_default(d)]


def _scan_training(args: argparse.Namespace) -> tuple[Any, dict[str, Any], dict[str, Any]]:
    from mmtrain.analysis.training import packing_stats, training_view

    given = _file_flags_given(args)
    if given:
        raise ValueError(f"{', '.join(given)}: the training config decides this (model.vision.image_size, "
                         "data.min_tiles/max_tiles, data.image_root, packing.seq_length); give a SOURCE to count "
                         "by flags instead")
    try:
        view = training_view(list(args.inputs))
    except (FileNotFoundError, ValueError):
        raise
    except Exception as e:  # hydra / omegaconf composition errors name the offending key
        raise ValueError(f"invalid training config ({type(e).__name__}): {e}") from None
    meta = {"source": view.description, "source_kind": "training-config", "accounting": view.accounting,
            "tokenizer": "training's (bytes of the conversation text)"}
    extra: dict[str, Any] = {"seq_length": view.seq_length, "aspect_ratios": view.aspect_ratios,
                             "packing": packing_stats(view), "notes": view.notes,
                             "tokens_per_tile": view.accounting["tokens_per_tile"]}
    if view.vit_patches_per_image is not None:  # native resolution: no tiles, ViT lengths instead
        extra["tiles"] = False
        extra["vit_patches"] = {"vit_patches_per_image": view.vit_patches_per_image,
                                "vit_patches_per_sample": view.vit_patches_per_sample}
    return view.result, meta, extra


def _scan_file(args: argparse.Namespace) -> tuple[Any, dict[str, Any], dict[str, Any]]:
    from mmtrain.data.sources import LengthTableSource, ScanOptions, open_source
    from mmtrain.data.text import load_tokenizer

    if len(args.inputs) != 1:
        raise ValueError(f"expected one SOURCE, got {args.inputs}; for the training config give only KEY=VALUE overrides")
    accounting = _accounting(args)
    source = open_source(args.inputs[0], image_root=args.image_root)
    is_table = isinstance(source, LengthTableSource)
    tokenizer = None if is_table else load_tokenizer(args.tokenizer)
    options = ScanOptions(
        accounting=accounting,
        tokenizer=tokenizer,
        workers=args.workers,
        progress=not args.no_progress and sys.stderr.isatty(),
        max_images=args.max_images,
    )
    result = source.scan(options)
    meta = {
        "source": source.describe(),
        "source_kind": source.kind,
        "accounting": None if is_table else dataclasses.asdict(accounting),
        "tokenizer": None if is_table else options.resolved().tokenizer.name,
    }
    notes = []
    if not is_table:
        notes.append(f"tokens counted by --tiling {accounting.mode}; training tiles each image at "
                     "model.vision.image_size: for the lengths a training run sees, run "
                     "`mmtrain analyze --out DIR model=... data=... data.source=...`")
    extra = {"seq_length": args.seq_length, "aspect_ratios": None, "notes": notes,
             "tokens_per_tile": accounting.tile_tokens if accounting.mode == "dynamic" else None,
             "tiles": is_table or accounting.mode == "dynamic"}  # native resolution has no tiles
    return result, meta, extra


def analyze(args: argparse.Namespace) -> tuple[dict[str, Any], int]:
    """Scan, write outputs, return (stats, number of samples with errors)."""
    ranges = parse_ranges(args.ranges)
    thresholds = parse_thresholds(args.thresholds)
    t0 = time.perf_counter()
    scan = _scan_training if is_training_config(args.inputs) else _scan_file
    result, meta, extra = scan(args)
    scan_s = time.perf_counter() - t0
    stats: dict[str, Any] = dict(meta)
    stats |= compute_stats(result, ranges, thresholds)
    stats["notes"] += extra["notes"]
    if not extra.get("tiles", True):
        stats.pop("tiles", None)
    if extra.get("packing"):
        stats["packing"] = extra["packing"]
    for key, values in (extra.get("vit_patches") or {}).items():
        stats[key] = quantity_stats(values, [], [])
    aspect = extra["aspect_ratios"]
    if aspect is not None and aspect.size:
        stats["aspect_ratio"] = {"count": int(aspect.size), "min": float(aspect.min()), "max": float(aspect.max()),
                                 "mean": float(aspect.mean()),
                                 "percentiles": {f"{q:g}": float(v) for q, v in zip(PERCENTILES, np.percentile(aspect, PERCENTILES))},
                                 "portrait": int(np.count_nonzero(aspect < 1)),
                                 "landscape": int(np.count_nonzero(aspect > 1))}
    stats["scan_seconds"] = round(scan_s, 3)

    os.makedirs(args.out, exist_ok=True)
    pngs: dict[str, str] = {}
    plots = not args.no_plots
    if plots:
        try:
            import matplotlib  # noqa: F401  (an optional dependency: the numbers need no plots)
        except ImportError:
            plots = False
            stats["notes"].append("matplotlib is not installed: no PNG histograms written")
    if plots:
        from mmtrain.analysis.report import aspect_png, histogram_png, tiles_png

        finite = [(lo, hi) for _, lo, hi in ranges]
        title = stats["source_kind"]
        for q in QUANTITIES:
            pngs[q] = os.path.join(args.out, f"{q}_hist.png")
            histogram_png(getattr(result, q), pngs[q], q, finite, thresholds, bins=args.bins, title=title,
                          seq_length=extra["seq_length"] if q == "total_tokens" else None)
        if "tiles" in stats:
            pngs["tiles"] = os.path.join(args.out, "tiles_hist.png")
            tiles_png(result.tiles, pngs["tiles"], title=title, tokens_per_tile=extra["tokens_per_tile"])
        if "aspect_ratio" in stats:
            pngs["aspect_ratio"] = os.path.join(args.out, "aspect_ratio_hist.png")
            aspect_png(aspect, pngs["aspect_ratio"], title=title)
    from mmtrain.analysis.report import markdown_summary

    with open(os.path.join(args.out, "stats.json"), "w") as f:
        json.dump(stats, f, indent=2)
        f.write("\n")
    with open(os.path.join(args.out, "summary.md"), "w") as f:
        f.write(markdown_summary(stats, pngs))
    return stats, result.errors.total


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        stats, n_errors = analyze(args)
    except (FileNotFoundError, ValueError, ImportError) as e:
        print(f"mmtrain analyze: error: {e}", file=sys.stderr)
        return 2
    s = stats["samples"]
    print(f"{s['used']} samples analysed ({s['with_errors']} with errors) -> {args.out}/stats.json")
    t = stats["total_tokens"]
    if t["count"]:
        line = f"  decoder tokens per sample: mean {t['mean']:.1f}, p99 {t['percentiles']['99']:.0f}, max {t['max']}"
        pk = stats.get("packing")
        if pk:
            line += f"; {pk['over_seq_length']} longer than packing.seq_length={pk['seq_length']}"
        print(line)
    for kind, e in stats["errors"].items():
        print(f"  {kind}: {e['count']} (first: {', '.join(e['first_ids'][:3])})", file=sys.stderr)
    if args.strict and n_errors:
        print(f"mmtrain analyze: --strict: {n_errors} samples with errors", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
