"""`make demo`: the embedded default job. Trains the tiny VLM on synthetic 1-20-tile data with packing
off and on (same seed, same samples per step), then prints time per sample and loss for both.
Runs on CPU when there is no GPU. Extra Hydra overrides may follow: `python -m mmtrain.demo trainer.max_steps=20`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    extra = list(sys.argv[1:] if argv is None else argv)
    root = Path(os.environ.get("MMTRAIN_DEMO_DIR", "outputs/demo"))
    rows = []
    for packed in (False, True):
        out = root / ("packed" if packed else "unpacked")
        cmd = [
            sys.executable, "-m", "mmtrain.train", "model=tiny", "data=synthetic_tiles",
            f"packing.enabled={str(packed).lower()}", "trainer.max_steps=8", f"trainer.output_dir={out}", *extra,
        ]
        print("$", " ".join(cmd), flush=True)
        proc = subprocess.run(cmd)
        if proc.returncode != 0:
            return proc.returncode
        rows.append((packed, json.loads((out / "summary.json").read_text())))
    base = rows[0][1]["time_per_sample_ms"]
    print("\n| packing | time per sample (ms) | final loss | padding fraction | speedup |")
    print("|---|---|---|---|---|")
    for packed, s in rows:
        print(
            f"| {'enabled' if packed else 'disabled'} | {s['time_per_sample_ms']:.2f} | {s['final_loss']:.6f} | "
            f"{s['padding_fraction']:.3f} | {base / s['time_per_sample_ms']:.2f}x |"
        )
    same = all(abs(a - b) <= 1e-5 * abs(a) for a, b in zip(rows[0][1]["losses"], rows[1][1]["losses"]))
    print(f"\nper-step losses packed vs unpacked agree to 1e-5: {same} (device: {rows[1][1]['device']})")
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
