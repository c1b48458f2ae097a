"""Run both packing variants of a recipe and write the seed's table (Markdown + JSON).

    python recipes/seed_table.py --recipe h20_1gpu                       # on one H20
    python recipes/seed_table.py --recipe h20_4gpu_dp4                   # 4 processes via mmtrain.launch.torchrun
    python recipes/seed_table.py --recipe h20_4gpu_dp4 model=tiny cluster=cpu   # CPU smoke
    python recipes/seed_table.py --recipe h20_1gpu --from-dirs RUN_OFF RUN_ON   # table from finished runs

Variant "disabled" is `packing=disabled` (every sample padded to packing.seq_length, the seed's
baseline), "enabled" is `packing=default` (our default algorithm). Other arguments are Hydra
overrides applied to both. Runs go to <out>/packing_disabled and <out>/packing_enabled
(default out: outputs/seed_table/<recipe>/<cluster>), the table to <out>/seed_table.md and .json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

VARIANTS = (("disabled", "packing=disabled"), ("enabled", "packing=default"))
COLUMNS = ("Packing sequence", "Time per sample (ms)", "Buffer size", "Packing sequence length",
           "Sequence length", "Speedup")


def load_summary(run_dir: Path) -> dict:
    path = Path(run_dir) / "summary.json"
    if not path.is_file():
        raise SystemExit(f"error: {path} not found (did the run finish?)")
    return json.loads(path.read_text())


def build_table(unpacked: dict, packed: dict, meta: dict | None = None) -> dict:
    """The seed's table from the two runs' summary.json contents."""
    base = float(unpacked["time_per_sample_ms"])
    rows = []
    for summary, on in ((unpacked, False), (packed, True)):
        t = float(summary["time_per_sample_ms"])
        rows.append({
            "packing_sequence": on,
            "time_per_sample_ms": round(t, 3),
            "buffer_size": summary.get("buffer_size") if on else None,
            "packing_seq_length": summary.get("seq_length") if on else None,
            "seq_length": summary.get("seq_length"),
            "speedup": round(base / t, 3) if t > 0 else None,
        })
    info = {k: packed.get(k) for k in ("model", "world_size", "dp", "tp", "pp", "steps", "precision",
                                      "algorithm", "device")}
    return {**(meta or {}), **{k: v for k, v in info.items() if v is not None}, "columns": list(COLUMNS),
            "rows": rows}


def _cell(v, fmt: str = "{}") -> str:
    return "-" if v is None else fmt.format(v)


def to_markdown(table: dict) -> str:
    desc = ", ".join(f"{k}={table[k]}" for k in ("recipe", "cluster", "model", "world_size", "tp", "pp", "dp",
                                                 "steps", "precision") if k in table)
    lines = [f"# Seed table: {table.get('recipe', '')}", "", desc, "",
             "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in table["rows"]:
        lines.append("| " + " | ".join([
            "Yes" if r["packing_sequence"] else "No",
            f"{r['time_per_sample_ms']:.2f}",
            _cell(r["buffer_size"]),
            _cell(r["packing_seq_length"]),
            _cell(r["seq_length"]),
            _cell(r["speedup"], "{:.2f}x"),
        ]) + " |")
    return "\n".join(lines) + "\n"


def write_table(table: dict, out: Path) -> tuple[Path, Path]:
    out.mkdir(parents=True, exist_ok=True)
    md, js = out / "seed_table.md", out / "seed_table.json"
    md.write_text(to_markdown(table))
    js.write_text(json.dumps(table, indent=2) + "\n")
    return md, js


def run_variant(recipe: str, overrides: list[str], variant_override: str, run_dir: Path, world: int) -> None:
    args = [f"recipe={recipe}", *overrides, variant_override, f"trainer.output_dir={run_dir}"]
    if world > 1:
        cmd = [sys.executable, "-m", "mmtrain.launch.torchrun", *args]
    else:
        cmd = [sys.executable, "-m", "mmtrain.train", *args]
    print(f"[seed_table] {' '.join(cmd)}", flush=True)
    rc = subprocess.run(cmd, cwd=REPO, env=dict(os.environ)).returncode
    if rc != 0:
        raise SystemExit(f"error: run {run_dir} failed with exit code {rc}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", required=True)
    p.add_argument("--out", help="output folder (default outputs/seed_table/<recipe>/<cluster>)")
    p.add_argument("--from-dirs", nargs=2, metavar=("UNPACKED_RUN", "PACKED_RUN"),
                   help="do not run: build the table from two finished runs' output folders")
    p.add_argument("overrides", nargs="*", help="Hydra overrides for both variants")
    args = p.parse_intermixed_args(argv)

    from mmtrain.launch.common import compose_shape

    shape = compose_shape(args.recipe, args.overrides)
    cluster = shape.cluster
    out = Path(args.out) if args.out else REPO / "outputs" / "seed_table" / args.recipe / cluster
    if args.from_dirs:
        dirs = [Path(d) for d in args.from_dirs]
    else:
        dirs = []
        for name, override in VARIANTS:
            run_dir = (out / f"packing_{name}").resolve()
            run_variant(args.recipe, args.overrides, override, run_dir, shape.world_size)
            dirs.append(run_dir)
    unpacked, packed = (load_summary(d) for d in dirs)
    if unpacked.get("packing_enabled") or not packed.get("packing_enabled", True):
        raise SystemExit("error: expected the first run unpacked and the second packed")
    table = build_table(unpacked, packed, {"recipe": args.recipe, "cluster": cluster,
                                           "runs": {"unpacked": str(dirs[0]), "packed": str(dirs[1])}})
    md, js = write_table(table, out)
    print(to_markdown(table))
    print(f"[seed_table] wrote {md} and {js}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
