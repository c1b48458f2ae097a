"""`mmtrain analyze`: token statistics of a data source, before choosing packing settings.

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
    out["errors"] = result.errors.to_dict()
    out["notes"] = list(result.notes)
    if result.errors.total:
        out["notes"].append(f"{result.errors.total} samples with errors are excluded from the statistics")
    return out


# --- command line -----------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mmtrain analyze",
        description="Token statistics and histograms of a data source (LLaVA JSON/JSONL, WebDataset tars, "
        "length table CSV/Parquet/NPY, image folder, or synthetic:KEY=VALUE,...).",
    )
    p.add_argument("source")
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


def analyze(args: argparse.Namespace) -> tuple[dict[str, Any], int]:
    """Scan, write outputs, return (stats, number of samples with errors)."""
    from mmtrain.data.sources import LengthTableSource, ScanOptions, open_source
    from mmtrain.data.text import load_tokenizer

    ranges = parse_ranges(args.ranges)
    thresholds = parse_thresholds(args.thresholds)
    accounting = _accounting(args)
    source = open_source(args.source, image_root=args.image_root)
    is_table = isinstance(source, LengthTableSource)
    tokenizer = None if is_table else load_tokenizer(args.tokenizer)
    options = ScanOptions(
        accounting=accounting,
        tokenizer=tokenizer,
        workers=args.workers,
        progress=not args.no_progress and sys.stderr.isatty(),
        max_images=args.max_images,
    )
    t0 = time.perf_counter()
    result = source.scan(options)
    scan_s = time.perf_counter() - t0
    stats: dict[str, Any] = {
        "source": source.describe(),
        "source_kind": source.kind,
        "accounting": None if is_table else dataclasses.asdict(accounting),
        "tokenizer": None if is_table else options.resolved().tokenizer.name,
    }
    stats |= compute_stats(result, ranges, thresholds)
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
        from mmtrain.analysis.report import histogram_png

        finite = [(lo, hi) for _, lo, hi in ranges]
        for q in QUANTITIES:
            pngs[q] = os.path.join(args.out, f"{q}_hist.png")
            histogram_png(getattr(result, q), pngs[q], q, finite, thresholds, bins=args.bins, title=source.kind)
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
    for kind, e in stats["errors"].items():
        print(f"  {kind}: {e['count']} (first: {', '.join(e['first_ids'][:3])})", file=sys.stderr)
    if args.strict and n_errors:
        print(f"mmtrain analyze: --strict: {n_errors} samples with errors", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
