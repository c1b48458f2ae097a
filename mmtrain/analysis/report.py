"""Human-facing outputs of `mmtrain analyze`: one histogram PNG per quantity and a Markdown summary.

Why separate from the statistics: matplotlib is slow to import and optional for the numbers, and
the figure layout (linear + log count panels, ranges shaded, thresholds dashed) mirrors the seed's
data-analysis figure so results from different data sets can be compared side by side.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

QUANTITY_LABELS = {
    "image_tokens": "image tokens per sample",
    "text_tokens": "text tokens per sample",
    "total_tokens": "decoder tokens per sample (text + image - placeholders)",
}


def histogram_png(
    values: np.ndarray,
    path: str,
    quantity: str,
    ranges: list[tuple[int, float]],
    thresholds: list[int],
    bins: int = 100,
    title: str = "",
) -> None:
    """Counts per bin on a linear and on a log scale, side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    values = np.asarray(values)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4), constrained_layout=True)
    if values.size:
        lo, hi = int(values.min()), int(values.max())
        counts, edges = np.histogram(values, bins=bins, range=(lo, hi + 1 if hi == lo else hi))
    else:
        counts, edges = np.zeros(1), np.array([0.0, 1.0])
    for ax, scale in zip(axes, ("linear", "log")):
        ax.stairs(counts, edges, fill=True, alpha=0.8, color="tab:blue")
        ax.set_yscale(scale)
        ax.set_xlabel(QUANTITY_LABELS.get(quantity, quantity))
        ax.set_ylabel(f"samples ({scale} scale)")
        for r_lo, r_hi in ranges:
            ax.axvspan(r_lo, min(r_hi, edges[-1]), color="tab:green", alpha=0.12)
        for t in thresholds:
            ax.axvline(t, color="tab:red", linestyle="--", linewidth=1)
        ax.grid(alpha=0.3)
    fig.suptitle(f"{title} — {quantity} (n={values.size})" if title else f"{quantity} (n={values.size})")
    fig.savefig(path, dpi=100)
    plt.close(fig)


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
        st = stats[q]
        p = st["percentiles"] or {}
        row = [st["min"], st["mean"], p.get("50"), p.get("90"), p.get("99"), p.get("99.9"), st["max"]]
        lines.append(f"| {q} | " + " | ".join(_fmt(v) for v in row) + " |")
    lines.append("")
    for q in QUANTITY_LABELS:
        st = stats[q]
        parts = [f"{100 * frac:.2f}% in [{key}]" for key, frac in st["ranges"].items()]
        parts += [f"{n} samples >= {key}" for key, n in st["at_least"].items()]
        if parts:
            lines.append(f"- {q}: " + "; ".join(parts))
    lines.append("")
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
