"""`mmtrain compare [RECIPE] [overrides]`: train with packing off and on, then write the seed's
experiment table (Markdown + JSON) and a bar chart.

    mmtrain compare h20_1gpu                                  # the seed's 1 x H20 experiment
    mmtrain compare h20_4gpu_dp4                              # 4 processes via mmtrain.launch.torchrun
    mmtrain compare h20_4gpu_dp4 scale=smoke                  # its CPU smoke
    mmtrain compare model=tiny trainer.max_steps=8 --check-loss   # no recipe (what `make demo` runs)
    mmtrain compare h20_1gpu --from-dirs RUN_OFF RUN_ON       # the table from two finished runs

"Off" is `packing=disabled` (every sample padded to packing.seq_length, the seed's baseline), "on"
is `packing=default` (our default algorithm; with --check-loss in the strict-equivalence mode, so
that each packed step holds exactly the unpacked step's samples); the other arguments are Hydra
overrides given to both.
A recipe of more than one process runs through mmtrain.launch.torchrun. Runs go to
<out>/packing_disabled and <out>/packing_enabled, the table to <out>/seed_table.{md,json} and the
chart to <out>/compare.png (default <out>: outputs/compare/<recipe>/<cluster>). Every number in the
table is the runs' summary.json value (time per sample: the mean after the warm-up step).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Optional, Sequence

from mmtrain.launch.common import REPO

VARIANTS = (("disabled", "packing=disabled"), ("enabled", "packing=default"))
COLUMNS = ("Packing sequence", "Time per sample (ms)", "Buffer size", "Packing sequence length",
           "Sequence length", "Speedup", "Final loss", "Padding")
LOSS_RTOL = 1e-5  # per-step losses packed vs unpacked "agree" within this relative difference


def load_summary(run_dir: Path) -> dict:
    path = Path(run_dir) / "summary.json"
    if not path.is_file():
        raise SystemExit(f"error: {path} not found (did the run finish?)")
    return json.loads(path.read_text())


def loss_agreement(unpacked: dict, packed: dict) -> Optional[float]:
    """Largest relative difference of the per-step losses (None when the runs' steps differ)."""
    a, b = unpacked.get("losses") or [], packed.get("losses") or []
    if not a or len(a) != len(b):
        return None
    return max(abs(x - y) / max(abs(x), 1e-12) for x, y in zip(a, b))


def build_table(unpacked: dict, packed: dict, meta: dict | None = None) -> dict:
    """The seed's table from the two runs' summary.json contents (values unrounded)."""
    base = float(unpacked["time_per_sample_ms"])
    rows = []
    for summary, on in ((unpacked, False), (packed, True)):
        t = float(summary["time_per_sample_ms"])
        rows.append({
            "packing_sequence": on,
            "time_per_sample_ms": t,
            "buffer_size": summary.get("buffer_size") if on else None,
            "packing_seq_length": summary.get("seq_length") if on else None,
            "seq_length": summary.get("seq_length"),
            "speedup": base / t if t > 0 else None,
            "final_loss": summary.get("final_loss"),
            "padding_fraction": summary.get("padding_fraction"),
        })
    info = {k: packed.get(k) for k in ("model", "world_size", "dp", "tp", "pp", "steps", "precision",
                                      "algorithm", "device")}
    diff = loss_agreement(unpacked, packed)
    return {**(meta or {}), **{k: v for k, v in info.items() if v is not None}, "columns": list(COLUMNS),
            "rows": rows, "loss_max_rel_diff": diff,
            "losses_agree": None if diff is None else bool(diff <= LOSS_RTOL)}


def _cell(v, fmt: str = "{}") -> str:
    return "-" if v is None else fmt.format(v)


def to_markdown(table: dict) -> str:
    desc = ", ".join(f"{k}={table[k]}" for k in ("recipe", "cluster", "model", "world_size", "tp", "pp", "dp",
                                                 "steps", "precision") if table.get(k) is not None)
    lines = [f"# Seed table: {table.get('recipe') or 'no recipe'}", "", desc, "",
             "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in table["rows"]:
        lines.append("| " + " | ".join([
            "Yes" if r["packing_sequence"] else "No",
            f"{r['time_per_sample_ms']:.2f}",
            _cell(r["buffer_size"]),
            _cell(r["packing_seq_length"]),
            _cell(r["seq_length"]),
            _cell(r["speedup"], "{:.2f}x"),
            _cell(r.get("final_loss"), "{:.6f}"),
            _cell(None if r.get("padding_fraction") is None else 100 * r["padding_fraction"], "{:.1f}%"),
        ]) + " |")
    diff = table.get("loss_max_rel_diff")
    if diff is not None:
        verdict = "agree" if table["losses_agree"] else "differ"
        lines += ["", f"Per-step losses packed vs unpacked {verdict} (largest relative difference {diff:.2e}, "
                      f"tolerance {LOSS_RTOL:g}). They agree when both runs see the same samples per step "
                      "(packing.strict_equivalence=true, which --check-loss sets)."]
    return "\n".join(lines) + "\n"


def bar_chart(table: dict, path: Path) -> Path:
    """Time per sample and padding, packing off vs on, side by side."""
    from mmtrain.analysis.plot import pyplot, save, style_axis

    plt = pyplot()
    rows = table["rows"]
    names = ["packing off", "packing on"]
    colors = ["tab:gray", "tab:blue"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.5), constrained_layout=True)
    ax = axes[0]
    times = [r["time_per_sample_ms"] for r in rows]
    bars = ax.bar(names, times, color=colors, width=0.6)
    for bar, r in zip(bars, rows):
        label = f"{r['time_per_sample_ms']:.2f} ms"
        if r["packing_sequence"] and r["speedup"]:
            label += f"\n{r['speedup']:.2f}x faster" if r["speedup"] >= 1 else f"\n{1 / r['speedup']:.2f}x slower"
        ax.annotate(label, (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom",
                    xytext=(0, 3), textcoords="offset points")
    style_axis(ax, "", "time per sample (ms, lower is better)", categorical_x=True)
    ax.set_ylim(0, 1.25 * max(times))
    ax.set_title("Time per sample")
    ax = axes[1]
    pads = [r.get("padding_fraction") or 0.0 for r in rows]
    bars = ax.bar(names, pads, color=colors, width=0.6)
    for bar, p in zip(bars, pads):
        ax.annotate(f"{100 * p:.1f}%", (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center",
                    va="bottom", xytext=(0, 3), textcoords="offset points")
    style_axis(ax, "", "padding (share of computed tokens)", percent_y=True, categorical_x=True)
    ax.set_ylim(0, max(1.25 * max(pads), 0.05))
    ax.set_title("Padding computed")
    what = table.get("recipe") or table.get("model", "")
    shape = f"TP{table.get('tp')} PP{table.get('pp')} DP{table.get('dp')}" if "dp" in table else ""
    fig.suptitle(f"Packing off vs on — {what} ({table.get('cluster', '')}, {shape}, {table.get('steps')} steps)")
    return save(fig, path)


def write_table(table: dict, out: Path) -> tuple[Path, Path]:
    out.mkdir(parents=True, exist_ok=True)
    md, js = out / "seed_table.md", out / "seed_table.json"
    md.write_text(to_markdown(table))
    js.write_text(json.dumps(table, indent=2) + "\n")
    return md, js


def run_variant(recipe: str | None, overrides: list[str], variant_override: str, run_dir: Path, world: int) -> None:
    args = ([f"recipe={recipe}"] if recipe else []) + [*overrides, *variant_override.split(), f"trainer.output_dir={run_dir}"]
    module = "mmtrain.launch.torchrun" if world > 1 else "mmtrain.train"
    cmd = [sys.executable, "-m", module, *args]
    print(f"[compare] {' '.join(cmd)}", flush=True)
    rc = subprocess.run(cmd, cwd=REPO, env=dict(os.environ)).returncode
    if rc != 0:
        raise SystemExit(f"error: run {run_dir} failed with exit code {rc}")


def _split(words: list[str], recipe: str | None) -> tuple[str | None, list[str]]:
    """A leading word without '=' is the recipe; the rest are Hydra overrides."""
    if words and "=" not in words[0] and recipe is None:
        return words[0], words[1:]
    return recipe, words


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="mmtrain compare", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", default=None, help="same as the leading RECIPE word")
    p.add_argument("--out", help="output folder (default outputs/compare/<recipe>/<cluster>)")
    p.add_argument("--from-dirs", nargs=2, metavar=("UNPACKED_RUN", "PACKED_RUN"),
                   help="do not run: build the table from two finished runs' output folders")
    p.add_argument("--check-loss", action="store_true",
                   help=f"exit 1 unless the per-step losses of both runs agree to {LOSS_RTOL:g} (relative)")
    p.add_argument("words", nargs="*", metavar="[RECIPE] OVERRIDE", help="recipe name, then Hydra overrides for both runs")
    args = p.parse_intermixed_args(list(sys.argv[1:] if argv is None else argv))
    recipe, overrides = _split(args.words, args.recipe)

    from mmtrain.launch.common import compose_shape

    shape = compose_shape(recipe, overrides)
    out = Path(args.out) if args.out else REPO / "outputs" / "compare" / (recipe or "default") / shape.cluster
    if args.from_dirs:
        dirs = [Path(d) for d in args.from_dirs]
    else:
        dirs = []
        for name, override in VARIANTS:
            run_dir = (out / f"packing_{name}").resolve()
            if args.check_loss and name == "enabled":
                override += " packing.strict_equivalence=true"
            run_variant(recipe, overrides, override, run_dir, shape.world_size)
            dirs.append(run_dir)
    unpacked, packed = (load_summary(d) for d in dirs)
    if unpacked.get("packing_enabled") or not packed.get("packing_enabled", True):
        raise SystemExit("error: expected the first run unpacked and the second packed")
    table = build_table(unpacked, packed, {"recipe": recipe, "cluster": shape.cluster,
                                           "runs": {"unpacked": str(dirs[0]), "packed": str(dirs[1])}})
    md, js = write_table(table, out)
    png = None
    if all(math.isfinite(r["time_per_sample_ms"]) for r in table["rows"]):
        png = bar_chart(table, out / "compare.png")
    print(to_markdown(table))
    print(f"[compare] wrote {md}, {js}" + (f" and {png}" if png else ""), flush=True)
    if args.check_loss and not table["losses_agree"]:
        print("[compare] --check-loss: the per-step losses of the two runs do not agree", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
