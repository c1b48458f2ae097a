"""Human-facing outputs of `mmtrain analyze`: histogram PNGs and a Markdown summary.

Why separate from the statistics: matplotlib is slow to import and optional for the numbers, and
the figure layout (linear + log count panels, ranges shaded, thresholds dashed, the packing length
marked) mirrors the seed's data-analysis figure so results from different data sets can be compared
side by side.
"""

from __future__ import annotations

import os
from typing import Any, Optional

import numpy as np

QUANTITY_LABELS = {
    "image_tokens": "image tokens per sample",
    "text_tokens": "text tokens per sample",
    "total_tokens": "decoder tokens per sample (text + image - placeholders)",
    "tiles": "tiles per sample",
}


def _thousands(x: float, _pos: Any = None) -> str:
    return f"{x:,.0f}" if abs(x) >= 1 or x == 0 else f"{x:.2g}"


def histogram_png(values: np.ndarray, path: str, quantity: str, *args, **kwargs) -> None:
    from mmtrain.analysis.plot import save

    save(histogram_figure(values, quantity, *args, **kwargs), path)


def histogram_figure(
    values: np.ndarray,
    quantity: str,
    ranges: list[tuple[int, float]],
    thresholds: list[int],
    bins: int = 100,
    title: str = "",
    seq_length: Optional[int] = None,
) -> None:
    """Counts per bin on a linear and on a log scale, side by side; ranges shaded, thresholds dashed,
    `seq_length` (the packing length) as a solid line with the share of samples beyond it."""
    from matplotlib import ticker

    from mmtrain.analysis.plot import pyplot, style_axis

    plt = pyplot()
    values = np.asarray(values)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), constrained_layout=True)
    n = int(values.size)
    if n:
        # integer-aligned bins: token counts are integers, so every bin holds the same number of values
        lo, hi = int(values.min()), int(values.max())
        if seq_length is not None:
            hi = max(hi, int(seq_length))
        width = max(1, -(-(hi - lo + 1) // bins))
        edges = lo + width * np.arange(-(-(hi - lo + 1) // width) + 1, dtype=np.float64)
        counts, edges = np.histogram(values, bins=edges)
    else:
        counts, edges = np.zeros(1), np.array([0.0, 1.0])
    x_lo, x_hi = float(edges[0]), float(edges[-1])
    if seq_length is not None and seq_length >= x_hi - (x_hi - x_lo) * 0.02:  # keep the marker off the frame
        x_hi = seq_length + 0.03 * (seq_length - x_lo)
    for ax, scale in zip(axes, ("linear", "log")):
        ax.stairs(counts, edges, fill=True, alpha=0.8, color="tab:blue", label=f"samples per bin (n={n:,})")
        style_axis(ax, QUANTITY_LABELS.get(quantity, quantity), f"samples ({scale} scale)", log_y=scale == "log")
        ax.xaxis.set_major_formatter(ticker.FuncFormatter(_thousands))
        peak = max(float(counts.max()), 1.0)  # headroom above the bars for the legend
        ax.set_ylim(*((0.7, peak * 12) if scale == "log" else (0, peak * 1.4)))
        for r_lo, r_hi in ranges:  # only what falls inside the data's span (summary.md has them all)
            if r_lo > x_hi or r_hi < x_lo:
                continue
            inside = int(np.count_nonzero((values >= r_lo) & (values <= r_hi)))
            top = "" if r_hi == float("inf") else f"{int(r_hi):,}"
            ax.axvspan(max(r_lo, x_lo), min(r_hi, x_hi), color="tab:green", alpha=0.12,
                       label=f"{r_lo:,}-{top}: {100 * inside / max(n, 1):.1f}% of samples")
        for t in thresholds:
            if not x_lo <= t <= x_hi:
                continue
            at_least = int(np.count_nonzero(values >= t))
            ax.axvline(t, color="tab:red", linestyle="--", linewidth=1, label=f">= {t:,}: {at_least:,} samples")
        if seq_length is not None:
            over = int(np.count_nonzero(values > seq_length)) if n else 0
            ax.axvline(seq_length, color="black", linewidth=1.5,
                       label=f"packing.seq_length = {seq_length:,} ({over:,} samples longer)")
        ax.set_xlim(x_lo, x_hi)
        ax.legend(fontsize="small", loc="upper right")
    head = f"{title} — " if title else ""
    fig.suptitle(f"{head}{QUANTITY_LABELS.get(quantity, quantity)} (n={n:,})")
    return fig


def tiles_png(tiles: np.ndarray, path: str, **kwargs) -> None:
    from mmtrain.analysis.plot import save

    save(tiles_figure(tiles, **kwargs), path)


def tiles_figure(tiles: np.ndarray, title: str = "", tokens_per_tile: Optional[int] = None):
    """Samples per tile count (one bar per count), with the share of samples on each bar."""
    from mmtrain.analysis.plot import pyplot, style_axis

    plt = pyplot()
    tiles = np.asarray(tiles, dtype=np.int64)
    fig, ax = plt.subplots(figsize=(9, 4.5), constrained_layout=True)
    counts = np.bincount(tiles) if tiles.size else np.zeros(1, dtype=np.int64)
    ks = np.flatnonzero(counts)
    ax.bar(ks, counts[ks], color="tab:blue", width=0.8, label=f"samples (n={tiles.size:,})")
    if len(ks) <= 30:
        for k in ks:
            ax.annotate(f"{100 * counts[k] / tiles.size:.0f}%", (k, counts[k]), ha="center", va="bottom",
                        xytext=(0, 2), textcoords="offset points", fontsize="x-small")
    if tiles.size:
        ax.axvline(tiles.mean(), color="black", linestyle="--", linewidth=1, label=f"mean {tiles.mean():.2f} tiles")
    xlabel = "tiles per sample" + (f" ({tokens_per_tile} image tokens each)" if tokens_per_tile else "")
    style_axis(ax, xlabel, "samples", integer_x=True)
    ax.set_ylim(0, 1.12 * max(int(counts.max()), 1))
    ax.legend(fontsize="small")
    ax.set_title(f"{title} — tiles per sample" if title else "tiles per sample")
    return fig


# Common aspect ratios (width / height) marked on the aspect-ratio plot.
_ASPECTS = ((1 / 8, "1:8"), (1 / 4, "1:4"), (1 / 2, "1:2"), (3 / 4, "3:4"), (1.0, "1:1"), (4 / 3, "4:3"),
            (2.0, "2:1"), (4.0, "4:1"), (8.0, "8:1"))


def aspect_png(ratios: np.ndarray, path: str, **kwargs) -> None:
    from mmtrain.analysis.plot import save

    save(aspect_figure(ratios, **kwargs), path)


def aspect_figure(ratios: np.ndarray, title: str = "", bins: int = 60):
    """Image width / height on a log axis (portrait left of 1:1, landscape right)."""
    from matplotlib import ticker

    from mmtrain.analysis.plot import pyplot, style_axis

    plt = pyplot()
    r = np.asarray(ratios, dtype=np.float64)
    r = r[np.isfinite(r) & (r > 0)]
    fig, ax = plt.subplots(figsize=(9, 4.5), constrained_layout=True)
    lo, hi = (float(r.min()), float(r.max())) if r.size else (0.5, 2.0)
    lo, hi = min(lo, 0.9), max(hi, 1.1)
    edges = np.geomspace(lo, hi, bins + 1)
    counts, _ = np.histogram(r, bins=edges)
    ax.stairs(counts, edges, fill=True, alpha=0.8, color="tab:purple", label=f"images (n={r.size:,})")
    style_axis(ax, "aspect ratio (width / height, log scale)", "images")
    ax.yaxis.set_major_locator(ticker.MaxNLocator(integer=True))
    ax.set_xscale("log")
    marks = [(v, name) for v, name in _ASPECTS if lo <= v <= hi]
    ax.xaxis.set_major_locator(ticker.FixedLocator([v for v, _ in marks]))
    ax.xaxis.set_major_formatter(ticker.FixedFormatter([name for _, name in marks]))
    ax.xaxis.set_minor_formatter(ticker.NullFormatter())
    if r.size:
        portrait, landscape = int(np.count_nonzero(r < 1)), int(np.count_nonzero(r > 1))
        ax.axvline(1.0, color="black", linewidth=1,
                   label=f"square: {r.size - portrait - landscape:,}; portrait {portrait:,}; landscape {landscape:,}")
    ax.legend(fontsize="small")
    ax.set_title(f"{title} — image aspect ratio" if title else "image aspect ratio")
    return fig


def _fmt(x: Any) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.1f}" if x != int(x) else f"{int(x)}"
    return str(x)


def markdown_summary(stats: dict[str, Any], pngs: dict[str, str]) -> str:
    """A short, pasteable summary of stats.json."""
    s = stats["samples"]
    lines = [
        "# Token statistics",
        "",
        f"Source: {stats['source']}",
        "",
        f"Samples scanned: {s['scanned']}, used: {s['used']}, with errors: {s['with_errors']}"
        + (" (samples with errors are excluded from every statistic below)." if s["with_errors"] else "."),
        "",
    ]
    if stats.get("accounting"):
        acc = ", ".join(f"{k}={v}" for k, v in stats["accounting"].items())
        lines += [f"Accounting: {acc}; tokenizer: {stats.get('tokenizer')}", ""]
    lines += ["| quantity | min | mean | p50 | p90 | p99 | p99.9 | max |", "|---|---|---|---|---|---|---|---|"]
    for q in QUANTITY_LABELS:
        if q not in stats:
            continue
        st = stats[q]
        p = st["percentiles"] or {}
        row = [st["min"], st["mean"], p.get("50"), p.get("90"), p.get("99"), p.get("99.9"), st["max"]]
        lines.append(f"| {q} | " + " | ".join(_fmt(v) for v in row) + " |")
    lines.append("")
    for q in QUANTITY_LABELS:
        if q not in stats:
            continue
        st = stats[q]
        parts = [f"{100 * frac:.2f}% in [{key}]" for key, frac in st["ranges"].items()]
        parts += [f"{n} samples >= {key}" for key, n in st["at_least"].items()]
        if parts:
            lines.append(f"- {q}: " + "; ".join(parts))
    lines.append("")
    pk = stats.get("packing")
    if pk:
        unpadded = pk["padding_if_unpacked"]
        lines += [
            f"Packing at packing.seq_length={pk['seq_length']}: at least {pk['lower_bound_packs']} packs; "
            f"{pk['over_seq_length']} samples longer (oversize_policy={pk['oversize_policy']}"
            + (f", first: {', '.join(pk['over_seq_length_first_ids'])}" if pk["over_seq_length"] else "")
            + ")" + (f"; each sample padded to seq_length would be {100 * unpadded:.1f}% padding." if unpadded is not None else "."),
            "",
        ]
    if stats["errors"]:
        lines += ["## Errors", "", "| kind | count | first ids |", "|---|---|---|"]
        for kind, e in stats["errors"].items():
            lines.append(f"| {kind} | {e['count']} | {', '.join(e['first_ids'])} |")
        lines.append("")
    for note in stats.get("notes", []):
        lines.append(f"Note: {note}")
    if pngs:
        lines += [""] + [f"![{q}]({os.path.basename(p)})" for q, p in pngs.items()]
    return "\n".join(lines) + "\n"
