"""`mmtrain plot RUN_DIR --out DIR`: PNGs of a finished (or running) run from its metrics.jsonl, and
the figure style every mmtrain PNG shares (analyze histograms, the compare bar chart).

Figures: loss.png (per step, with a moving average when there are many steps), throughput.png
(samples/s and tokens/s, the mean after warm-up dashed), rank_compute.png (each rank's forward +
backward time per step from `rank_compute_ms`, and the max / mean ratio over ranks next to the
balancer's predicted one when the run logged it), padding.png (padding share of computed tokens).
Steps are counted as in the log lines: step 1 is the first optimizer step.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

# --- shared style -----------------------------------------------------------------------------


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def si(x: float, _pos: Any = None) -> str:
    """Tick label: 1234 -> '1.2k', 3e6 -> '3M', small values plain; never '2x10^0'."""
    a = abs(x)
    for div, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if a >= div:
            return f"{x / div:.3g}{suffix}"
    if a == 0 or a >= 1:
        return f"{x:.4g}"
    return f"{x:.2g}"


def style_axis(ax, xlabel: str, ylabel: str, *, integer_x: bool = False, percent_y: bool = False,
               log_y: bool = False, categorical_x: bool = False) -> None:
    """Labelled axes with plain tick labels (SI suffixes, integer steps, percentages)."""
    from matplotlib import ticker

    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if log_y:
        ax.set_yscale("log")
        ax.yaxis.set_major_locator(ticker.LogLocator(base=10, numticks=12))
        ax.yaxis.set_minor_formatter(ticker.NullFormatter())
    if percent_y:
        ax.yaxis.set_major_formatter(ticker.PercentFormatter(xmax=1.0, decimals=None))
    else:
        ax.yaxis.set_major_formatter(ticker.FuncFormatter(si))
    if categorical_x:  # bar charts: keep the category names, grid lines across only
        ax.grid(axis="y", alpha=0.3)
        return
    if integer_x:
        ax.xaxis.set_major_locator(ticker.MaxNLocator(integer=True))
    ax.xaxis.set_major_formatter(ticker.FuncFormatter(si))
    ax.grid(alpha=0.3)


def save(fig, path: Path) -> Path:
    fig.savefig(path, dpi=110)
    pyplot().close(fig)
    return path


# --- run plots --------------------------------------------------------------------------------


def read_metrics(run_dir: Path) -> list[dict]:
    """metrics.jsonl records, one per step (a line cut short by a kill is skipped); for a resumed
    run the last record of each step wins."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: RUN_DIR must be a run's trainer.output_dir")
    by_step: dict[int, dict] = {}
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict) and isinstance(rec.get("step"), int):
            by_step[rec["step"]] = rec
    if not by_step:
        raise ValueError(f"{path} holds no step records yet")
    return [by_step[k] for k in sorted(by_step)]


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _series(recs: list[dict], key: str) -> tuple[list[int], list[float]]:
    xs, ys = [], []
    for r in recs:
        v = r.get(key)
        if _finite(v):
            xs.append(r["step"] + 1)
            ys.append(float(v))
    return xs, ys


def _marker(n: int) -> dict:
    return {"marker": "o", "markersize": 4} if n <= 40 else {}


def _moving_average(ys: list[float], window: int) -> list[float]:
    out, acc = [], 0.0
    for i, y in enumerate(ys):
        acc += y
        if i >= window:
            acc -= ys[i - window]
        out.append(acc / min(i + 1, window))
    return out


def _title(run_dir: Path, summary: Optional[dict], what: str) -> str:
    desc = []
    if summary:
        desc = [f"model={summary.get('model')}", f"packing={'on' if summary.get('packing_enabled') else 'off'}"]
        if summary.get("world_size"):
            desc.append(f"TP{summary.get('tp')} PP{summary.get('pp')} DP{summary.get('dp')}")
    return f"{what} — {run_dir.name}" + (f" ({', '.join(desc)})" if desc else "")


def _warmup(summary: Optional[dict], n: int) -> int:
    w = (summary or {}).get("warmup_steps_excluded")
    return int(w) if isinstance(w, int) else min(1, max(n - 1, 0))


def plot_loss(recs, run_dir, summary, out: Path) -> Path:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.5), constrained_layout=True)
    xs, ys = _series(recs, "loss")
    ax.plot(xs, ys, color="tab:blue", linewidth=1.2, label="loss per step", **_marker(len(xs)))
    if len(xs) >= 20:
        w = max(5, len(xs) // 20)
        ax.plot(xs, _moving_average(ys, w), color="tab:orange", linewidth=2, label=f"moving average ({w} steps)")
    skipped = [(r["step"] + 1, r["loss"]) for r in recs if r.get("skipped") and isinstance(r.get("loss"), float)
               and math.isfinite(r["loss"])]
    if skipped:
        ax.scatter(*zip(*skipped), color="tab:red", zorder=3, label="update skipped (non-finite)")
    style_axis(ax, "optimizer step", "loss (per-token mean, nats)", integer_x=True)
    ax.set_title(_title(run_dir, summary, "Training loss"))
    ax.legend()
    return save(fig, out / "loss.png")


def plot_throughput(recs, run_dir, summary, out: Path) -> Path:
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), constrained_layout=True)
    warm = _warmup(summary, len(recs))
    timed = [r for r in recs if _finite(r.get("step_time_s")) and r["step_time_s"] > 0]
    panels = (
        (axes[0], "samples", "samples / s", "tab:blue"),
        (axes[1], "tokens", "real (non-padding) tokens / s", "tab:green"),
    )
    for ax, what, label, color in panels:
        amount = {r["step"]: (r.get("samples", 0) if what == "samples" else r.get("tokens_per_s", 0) * r["step_time_s"])
                  for r in timed}
        xs = [r["step"] + 1 for r in timed]
        ys = [amount[r["step"]] / r["step_time_s"] for r in timed]
        ax.plot(xs, ys, color=color, linewidth=1.2, label=label, **_marker(len(xs)))
        after = [r for r in timed if r["step"] + 1 > warm]
        if after:  # total over total time, as summary.json's time_per_sample_ms
            mean = sum(amount[r["step"]] for r in after) / sum(r["step_time_s"] for r in after)
            ax.axhline(mean, color="black", linestyle="--", linewidth=1,
                       label=f"after {warm} warm-up step{'s' if warm != 1 else ''}: {si(mean)}")
        if warm and xs:
            ax.axvspan(min(xs) - 0.5, warm + 0.5, color="grey", alpha=0.15, label="warm-up (excluded)")
        style_axis(ax, "optimizer step", label, integer_x=True)
        ax.set_ylim(bottom=0)
        ax.legend(loc="lower right")
    axes[0].set_title("Samples per second")
    axes[1].set_title("Tokens per second")
    fig.suptitle(_title(run_dir, summary, "Throughput"))
    return save(fig, out / "throughput.png")


def plot_rank_compute(recs, run_dir, summary, out: Path) -> Optional[Path]:
    rows = [(r["step"] + 1, r["rank_compute_ms"]) for r in recs if isinstance(r.get("rank_compute_ms"), list)
            and r["rank_compute_ms"]]
    if not rows:
        return None
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5), constrained_layout=True)
    steps = [s for s, _ in rows]
    ranks = max(len(v) for _, v in rows)
    ax = axes[0]
    if ranks <= 16:
        cmap = plt.get_cmap("tab10" if ranks <= 10 else "tab20")
        for k in range(ranks):
            ys = [v[k] if k < len(v) else float("nan") for _, v in rows]
            ax.plot(steps, ys, color=cmap(k), linewidth=1.2, label=f"rank {k}", **_marker(len(steps)))
        ax.legend(ncol=2 if ranks > 4 else 1, fontsize="small")
        style_axis(ax, "optimizer step", "forward + backward time (ms)", integer_x=True)
        ax.set_ylim(bottom=0)
    else:  # too many lines to tell apart: ranks x steps as an image
        import numpy as np

        grid = np.full((ranks, len(rows)), np.nan)
        for j, (_, v) in enumerate(rows):
            grid[: len(v), j] = v
        im = ax.imshow(grid, aspect="auto", origin="lower", interpolation="nearest",
                       extent=(steps[0] - 0.5, steps[-1] + 0.5, -0.5, ranks - 0.5))
        fig.colorbar(im, ax=ax, label="forward + backward time (ms)")
        style_axis(ax, "optimizer step", "rank", integer_x=True)
    ax.set_title("Per-rank compute time (before the DP all-reduce)")

    ax = axes[1]
    mx, meas = _series(recs, "straggler_measured")
    label = "measured (straggler_measured)"
    if not mx:
        mx = steps
        meas = [max(v) / (sum(v) / len(v)) if sum(v) > 0 else float("nan") for _, v in rows]
        label = "measured: max / mean of rank_compute_ms"
    ax.plot(mx, meas, color="tab:red", linewidth=1.4, label=label, **_marker(len(mx)))
    px, py = _series(recs, "straggler_predicted")
    if not px:  # the balancer's per-rank predicted costs, reduced the same way
        costs = [(r["step"] + 1, r["predicted_rank_cost"]) for r in recs
                 if isinstance(r.get("predicted_rank_cost"), list) and r["predicted_rank_cost"]]
        pts = [(s, max(c) / (sum(c) / len(c))) for s, c in costs if sum(c) > 0]
        px, py = (list(t) for t in zip(*pts)) if pts else ([], [])
    if px:
        ax.plot(px, py, color="tab:purple", linestyle="--", linewidth=1.4,
                label="predicted: max / mean of the balancer's rank costs", **_marker(len(px)))
    ax.axhline(1.0, color="black", linewidth=0.8, label="perfect balance (1.0)")
    style_axis(ax, "optimizer step", "straggler ratio (max / mean over ranks)", integer_x=True)
    ax.set_ylim(bottom=min([0.95] + [y for y in meas + list(py) if math.isfinite(y)]))
    ax.set_title("Straggler: slowest rank vs the average")
    ax.legend(fontsize="small")
    fig.suptitle(_title(run_dir, summary, "Per-rank compute"))
    return save(fig, out / "rank_compute.png")


def plot_padding(recs, run_dir, summary, out: Path) -> Optional[Path]:
    xs, ys = _series(recs, "padding_fraction")
    if not xs:
        return None
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), constrained_layout=True)
    ax = axes[0]
    ax.plot(xs, ys, color="tab:brown", linewidth=1.2, label="padding per step", **_marker(len(xs)))
    mean = sum(ys) / len(ys)
    ax.axhline(mean, color="black", linestyle="--", linewidth=1, label=f"mean: {100 * mean:.1f}%")
    style_axis(ax, "optimizer step", "padding (share of computed tokens)", integer_x=True, percent_y=True)
    ax.set_ylim(0, max(1.05 * max(ys), 0.05))
    ax.set_title("Padding tokens computed")
    ax.legend()
    ax = axes[1]
    px, py = _series(recs, "packs")
    sx, sy = _series(recs, "samples")
    ax.plot(px, py, color="tab:cyan", linewidth=1.2, label="rows computed (packs, or padded samples)", **_marker(len(px)))
    ax.plot(sx, sy, color="tab:gray", linestyle="--", linewidth=1.2, label="samples", **_marker(len(sx)))
    style_axis(ax, "optimizer step", "per step (count)", integer_x=True)
    ax.set_ylim(bottom=0)
    ax.set_title("Rows and samples per step")
    ax.legend(loc="lower right")
    fig.suptitle(_title(run_dir, summary, "Padding and packing"))
    return save(fig, out / "padding.png")


def plot_run(run_dir: Path, out: Path) -> list[Path]:
    """All figures of one run; returns the PNGs written."""
    run_dir, out = Path(run_dir), Path(out)
    recs = read_metrics(run_dir)
    summary_path = run_dir / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else None
    out.mkdir(parents=True, exist_ok=True)
    paths = [plot_loss(recs, run_dir, summary, out), plot_throughput(recs, run_dir, summary, out),
             plot_rank_compute(recs, run_dir, summary, out), plot_padding(recs, run_dir, summary, out)]
    return [p for p in paths if p is not None]


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="mmtrain plot", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", help="a run's trainer.output_dir (holds metrics.jsonl)")
    p.add_argument("--out", default=None, help="folder for the PNGs (default RUN_DIR/plots)")
    args = p.parse_args(list(sys.argv[1:] if argv is None else argv))
    out = Path(args.out) if args.out else Path(args.run_dir) / "plots"
    try:
        paths = plot_run(Path(args.run_dir), out)
    except (FileNotFoundError, ValueError) as e:
        print(f"mmtrain plot: error: {e}", file=sys.stderr)
        return 2
    for path in paths:
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
