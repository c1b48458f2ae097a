"""The native-resolution ViT three ways, in one process on the same weights and images:

  packed      all images of the micro-batch in ONE varlen stream (mmtrain: cu_seqlens per image for
              full-attention blocks, per window for windowed blocks; no padding)
  padded      every image padded to the largest image of the micro-batch (a [B, L_max] batch): run
              here as every image at the largest image's grid, which is the padded batch's work
              (GEMMs over B x L_max patches, L_max^2 attention per image; its outputs for the real
              patches are not the point, its time is)
  per_image   one image at a time (a ViT call per image)

Two micro-batches of the native LLaVA-Pretrain distribution (bench/native_lengths.py; sizes through
Qwen2.5-VL's smart resize): `typical`, the first images of the full-scale table
(tests/assets/llava_pretrain_native_10k.csv, 576-1500-patch photos); `tail`, the CPU smoke scale of
the same distribution (llava_pretrain_native_smoke.csv: every side / 4) with its largest image in
the micro-batch, as the rare huge image of the distribution lands in some micro-batch (at full scale
that image has 20,736 patches: too slow to run padded on a CPU). The ViT: a mid-size Qwen2.5-VL-shaped tower (RMSNorm, SwiGLU, 2D
rotary, 112 px windows with the last block full attention), random weights, fp32, attention
backend `sdpa` (torch's fused kernel per segment) for every mode. Timings are the best of
`--repeats` rounds (the least disturbed on a shared machine; medians are printed beside them), the
modes interleaved within each round. The packed output is checked against
the per-image outputs (they must agree: packing changes where patches sit, not what they compute).

    OMP_NUM_THREADS=1 .venv/bin/python bench/native_vit_bench.py --repeats 7 --out bench/results/native_vit.md
"""

from __future__ import annotations

import argparse
import csv
import platform
import statistics
import time
from pathlib import Path

import torch

from mmtrain.data.accounting import SmartResize

REPO = Path(__file__).resolve().parent.parent
TABLES = {"typical": REPO / "tests/assets/llava_pretrain_native_10k.csv",
          "tail": REPO / "tests/assets/llava_pretrain_native_smoke.csv"}
QWEN25 = SmartResize(patch_size=14, merge_size=2, temporal_patch_size=2, min_pixels=56 * 56, max_pixels=28 * 28 * 16384)


def images(scenario: str, n: int) -> list[tuple[int, int, int]]:
    """(t, h, w) grids of a micro-batch of n images (see the module docstring)."""
    rows = [(int(r["width"]), int(r["height"])) for r in csv.DictReader(TABLES[scenario].open())]
    if scenario == "typical":
        return [QWEN25.grid_thw(*s) for s in rows if QWEN25.vit_patches(*s) <= 1500][:n]
    big = max(rows, key=lambda s: QWEN25.vit_patches(*s))
    return [QWEN25.grid_thw(*s) for s in [big, *[s for s in rows if s != big][: n - 1]]]


def build_vit(hidden: int, layers: int, heads: int):
    from mmtrain.config import compose
    from mmtrain.parallel import setup
    from mmtrain.train.build import build_model

    cfg = compose(["model=tiny_native", f"model.vision.hidden_size={hidden}", f"model.vision.num_layers={layers}",
                   f"model.vision.num_attention_heads={heads}", f"model.vision.ffn_hidden_size={hidden * 8 // 3}",
                   "model.vision.window_size=112", f"model.vision.fullatt_block_indexes=[{layers - 1}]",
                   f"model.projector.ffn_hidden_size={hidden * 4}", "model.attention_backend=sdpa", "model.freeze_vit=false"])
    lay = setup.initialize(cfg.parallel, "cpu", 0)
    vlm = build_model(cfg, lay, torch.float32)
    return vlm.vision, cfg


def timed(fn, backward: bool) -> float:
    t0 = time.perf_counter()
    if backward:
        out = fn()
        out.float().pow(2).mean().backward()
    else:
        with torch.no_grad():
            fn()
    return time.perf_counter() - t0


def run(vit, grids: list[tuple[int, int, int]], repeats: int) -> tuple[dict, float]:
    """Median seconds per (mode, backward) and the packed-vs-per-image max difference."""
    patches = [t * h * w for t, h, w in grids]
    dim = vit.conv.weight[0].numel()
    px = torch.randn(sum(patches), dim, generator=torch.Generator().manual_seed(0))
    grid = torch.tensor(grids)
    per = list(torch.split(px, patches))
    big = max(range(len(grids)), key=lambda i: patches[i])
    lmax = patches[big]
    pad_px = torch.zeros(len(grids) * lmax, dim)
    for i, p in enumerate(per):
        pad_px[i * lmax : i * lmax + p.shape[0]] = p
    pad_grid = torch.tensor([grids[big]] * len(grids))
    with torch.no_grad():  # packing changes where patches sit, not what they compute
        diff = float((vit(px, grid) - torch.cat([vit(p, grid[i : i + 1]) for i, p in enumerate(per)])).abs().max())
    modes = {
        "packed": lambda: vit(px, grid),
        "padded": lambda: vit(pad_px, pad_grid),
        "per_image": lambda: torch.cat([vit(p, grid[i : i + 1]) for i, p in enumerate(per)]),
    }
    for fn in modes.values():  # warm-up
        timed(fn, False)
    res = {(m, b): [] for m in modes for b in (False, True)}
    for _ in range(repeats):
        for backward in (False, True):
            for m, fn in modes.items():
                vit.zero_grad(set_to_none=True)
                res[(m, backward)].append(timed(fn, backward))
    return res, diff


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scenarios", default="typical,tail")
    ap.add_argument("--images", type=int, default=8, help="images per micro-batch (typical); tail: 12")
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default=None, help="write the Markdown table here too")
    args = ap.parse_args(argv)
    from mmtrain.parallel import setup

    vit, cfg = build_vit(args.hidden, args.layers, args.heads)
    v = cfg.model.vision
    lines = [
        f"native ViT: {v.num_layers} blocks x {v.hidden_size} ({v.num_attention_heads} heads, SwiGLU {v.ffn_hidden_size}, "
        f"112 px windows, block {v.num_layers - 1} full), fp32, attention sdpa; cpu "
        f"({platform.processor() or platform.machine()}), torch {torch.__version__}, {torch.get_num_threads()} threads; "
        f"best of {args.repeats} rounds (median in brackets), modes interleaved",
        "",
        "| micro-batch | mode | patches computed | sum of L^2 (full-attention work) | forward ms | x packed | forward+backward ms | x packed |",
        "|---|---|---|---|---|---|---|---|",
    ]
    notes, raw = [], {}
    for sc in args.scenarios.split(","):
        grids = images(sc, args.images if sc == "typical" else 12)
        patches = [t * h * w for t, h, w in grids]
        res, diff = run(vit, grids, args.repeats)
        assert diff <= 1e-4, f"{sc}: the packed ViT differs from per-image calls by {diff}"
        med = {k: min(x) for k, x in res.items()}
        mid = {k: statistics.median(x) for k, x in res.items()}
        real, sq, n, lmax = sum(patches), sum(p * p for p in patches), len(patches), max(patches)
        work = {"packed": (real, sq), "padded": (n * lmax, n * lmax * lmax), "per_image": (real, sq)}
        for m in ("packed", "padded", "per_image"):
            f, fb = med[(m, False)] * 1e3, med[(m, True)] * 1e3
            lines.append(f"| {sc} | {m} | {work[m][0]} | {work[m][1]} | {f:.1f} ({mid[(m, False)] * 1e3:.0f}) | "
                         f"{f / (med[('packed', False)] * 1e3):.2f} | {fb:.1f} ({mid[(m, True)] * 1e3:.0f}) | "
                         f"{fb / (med[('packed', True)] * 1e3):.2f} |")
        notes.append(f"{sc}: {n} images, ViT patches {patches}; packed == per-image outputs (max |diff| {diff:.1e})")
        raw[sc] = {f"{m} {'fwd+bwd' if b else 'fwd'}": [round(x, 4) for x in xs] for (m, b), xs in res.items()}
    text = "\n".join(lines + [""] + notes)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n\nraw seconds: " + repr(raw) + "\n")
    setup.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
