"""Cost coefficients in seconds: offline (`mmtrain calibrate`, synthetic layer timings) and online
(`balancing.calibrate_steps`, the training run's own per-rank times).

Offline: one transformer layer's work is timed forward+backward: the GEMMs (QKV/out + MLP) at a few
sequence lengths, and causal attention per segment; the decoder fit is least squares of
time = a*L + b*L^2, scaled by the layer count. The ViT is timed per batch of tiles (GEMMs and
bidirectional attention separately). The result is a `CostModel` in seconds, written as YAML/JSON
with --out; torch is imported only inside the timing functions.

Online: `fit_term_weights` fits each rank's measured forward/backward time to the model's own four
FLOP terms (`mmtrain.balancing.cost.TERMS`) by least squares, so a term the FLOP count gets wrong
on this device (attention kernels, the ViT) is re-weighted; the result has the same form.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Sequence

import numpy as np

from mmtrain.balancing.cost import CostModel


def _timeit(fn, repeats: int, sync) -> float:
    fn()  # warm-up
    sync()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - t0)
    return best


def _layer_fns(torch, tokens: int, hidden: int, ffn: int, heads: int, causal: bool, device, dtype):
    """(gemm_fn, attn_fn): forward+backward of one layer's GEMMs / attention over `tokens`."""
    F = torch.nn.functional
    x = torch.randn(tokens, hidden, device=device, dtype=dtype, requires_grad=True)
    w_qkv = torch.randn(hidden, 3 * hidden, device=device, dtype=dtype, requires_grad=True)
    w_o = torch.randn(hidden, hidden, device=device, dtype=dtype, requires_grad=True)
    w_1 = torch.randn(hidden, ffn, device=device, dtype=dtype, requires_grad=True)
    w_2 = torch.randn(ffn, hidden, device=device, dtype=dtype, requires_grad=True)
    hd = hidden // heads
    q = torch.randn(1, heads, tokens, hd, device=device, dtype=dtype, requires_grad=True)
    k = torch.randn_like(q, requires_grad=True)
    v = torch.randn_like(q, requires_grad=True)

    def gemm():
        y = (x @ w_qkv)[:, :hidden] @ w_o
        y = F.gelu(y @ w_1) @ w_2
        y.sum().backward()

    def attn():
        F.scaled_dot_product_attention(q, k, v, is_causal=causal).sum().backward()

    return gemm, attn


def calibrate(
    *, hidden: int, ffn: int, heads: int, layers: int, vit_hidden: int, vit_ffn: int, vit_heads: int,
    vit_layers: int, tile_length: int, lengths: Sequence[int], device: str, repeats: int,
) -> tuple[CostModel, dict]:
    import torch

    dev = torch.device(device)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    if dev.type == "cpu":
        torch.set_num_threads(1)  # steadier timings on a shared machine
    rows = []
    for L in lengths:
        g, a = _layer_fns(torch, L, hidden, ffn, heads, True, dev, dtype)
        rows.append((L, _timeit(g, repeats, sync) + _timeit(a, repeats, sync)))
    L = np.array([r[0] for r in rows], dtype=np.float64)
    t = np.array([r[1] for r in rows]) * layers
    (lin, quad), *_ = np.linalg.lstsq(np.stack([L, L * L], 1), t, rcond=None)
    lin, quad = max(lin, 0.0), max(quad, 0.0)
    vit_g, vit_a = 0.0, 0.0
    if vit_layers:
        pts = []
        for n in (1, 2, 4):
            g, _ = _layer_fns(torch, n * tile_length, vit_hidden, vit_ffn, vit_heads, False, dev, dtype)
            _, a = _layer_fns(torch, tile_length, vit_hidden, vit_ffn, vit_heads, False, dev, dtype)
            pts.append((n, _timeit(g, repeats, sync), n * _timeit(a, repeats, sync)))  # tiles attend alone
        n = np.array([p[0] for p in pts], dtype=np.float64)
        vit_g = max(float(np.polyfit(n, [p[1] for p in pts], 1)[0]), 0.0) * vit_layers
        vit_a = max(float(np.polyfit(n, [p[2] for p in pts], 1)[0]), 0.0) * vit_layers
    n = max(int(tile_length), 1)
    cm = CostModel(float(lin), float(quad), vit_g / n, vit_a / (n * n), n, "s")
    fit = {"device": str(dev), "dtype": str(dtype), "decoder_points": [[int(a), float(b)] for a, b in zip(L, t)],
           "relative_residual": float(np.max(np.abs(np.stack([L, L * L], 1) @ [lin, quad] - t) / t))}
    return cm, fit


def fit_term_weights(terms: np.ndarray, seconds: np.ndarray, ridge: float = 1e-4) -> tuple[np.ndarray, float, float]:
    """Weights w (one per FLOP term, seconds per FLOP) and an intercept c with
    seconds ~ c + terms @ w, by least squares over the observations (one per rank and step).

    `terms[k]` are a rank's FLOP terms (coefficient x work) in one step. Weights are kept >= 1% of
    the common scale (total seconds / total FLOPs) and shrunk towards it by `ridge` (relative), so
    terms that never vary in the data (no images, equal lengths) keep the FLOP ratio instead of
    drifting. Returns (w, c, relative residual)."""
    A = np.asarray(terms, dtype=np.float64)
    t = np.asarray(seconds, dtype=np.float64)
    if A.ndim != 2 or A.shape[0] != t.size or t.size < 2:
        raise ValueError("need at least two observations of every term")
    total = A.sum(axis=1)
    scale = float(t.sum() / total.sum()) if total.sum() > 0 else 0.0
    k = A.shape[1]
    # Columns normalised by their mean so the ridge acts alike on every term.
    norm = np.maximum(A.mean(axis=0), 1e-300)
    X = np.concatenate([np.ones((t.size, 1)), A / norm], axis=1)
    lam = ridge * float((X[:, 1:] ** 2).sum() / k)
    prior = np.concatenate([[0.0], np.full(k, scale) * norm])
    R = np.sqrt(lam) * np.eye(k + 1)
    R[0, 0] = 0.0  # the intercept is free
    sol, *_ = np.linalg.lstsq(np.concatenate([X, R]), np.concatenate([t, R @ prior]), rcond=None)
    w = np.maximum(sol[1:] / norm, 0.01 * scale)
    c = float(sol[0])
    pred = c + A @ w
    resid = float(np.sqrt(np.mean((pred - t) ** 2)) / max(np.mean(t), 1e-300))
    return w, c, resid


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="mmtrain calibrate", description=__doc__)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--ffn", type=int, default=1024)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--vit-hidden", type=int, default=128)
    p.add_argument("--vit-ffn", type=int, default=512)
    p.add_argument("--vit-heads", type=int, default=2)
    p.add_argument("--vit-layers", type=int, default=2)
    p.add_argument("--tile-length", type=int, default=64, help="ViT tokens of one tile (patches + CLS)")
    p.add_argument("--lengths", default="256,512,1024,2048", help="comma list of decoder segment lengths")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", default=None, help="write the coefficients here (.json, else YAML)")
    args = p.parse_args(argv)
    device = args.device
    if device == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    cm, fit = calibrate(hidden=args.hidden, ffn=args.ffn, heads=args.heads, layers=args.layers,
                        vit_hidden=args.vit_hidden, vit_ffn=args.vit_ffn, vit_heads=args.vit_heads,
                        vit_layers=args.vit_layers, tile_length=args.tile_length,
                        lengths=[int(x) for x in args.lengths.split(",")], device=device, repeats=args.repeats)
    print(json.dumps({"cost_model": cm.to_dict(), "fit": fit}, indent=2))
    if args.out:
        cm.save(args.out)
        print(f"wrote {args.out}")
    return 0
