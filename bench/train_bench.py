"""Training-step benchmark: one model, several data layouts, measured back to back in one process.

Modes (same samples, same model weights, same optimizer; only the layout changes):
  padded    each sample padded to packing.seq_length (the seed's "packing disabled")
  nopad     each sample alone at its own length (no packing, no padding)
  greedy    Megatron-LM's greedy knapsack, buffer 100
  packed    our default packer and balancer, buffer `--buffer`

Prints, per mode: time per sample (ms), useful TFLOP/s (real tokens only, mmtrain/balancing/cost.py),
MFU (against --peak-tflops or the cluster / GPU peak), peak memory, padding fraction, and the speedup
over `padded`. Runs on CPU too (use the tiny model there).

  python bench/train_bench.py model=tiny trainer.global_batch_size=16            # CPU smoke
  python bench/train_bench.py model=llava_mistral7b_clip224 trainer.precision=bf16 \\
      packing.seq_length=8192 trainer.global_batch_size=8 --steps 6 --warmup 2        # one H100
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path

warnings.filterwarnings("ignore")

import torch  # noqa: E402

from mmtrain.config import compose  # noqa: E402
from mmtrain.steps.datamodule import DataModule  # noqa: E402
from mmtrain.train.build import build  # noqa: E402
from mmtrain.train.metrics import peak_flops  # noqa: E402
from mmtrain.train.step import forward_backward  # noqa: E402

MODES = {
    "padded": ["packing.enabled=false", "packing.pad_unpacked_to=seq_length"],
    "nopad": ["packing.enabled=false", "packing.pad_unpacked_to=none"],
    "greedy": ["packing.enabled=true", "packing.algorithm=greedy_knapsack", "packing.buffer_size=100", "packing.carry_over=false", "balancing.enabled=false"],
    "packed": ["packing.enabled=true", "packing.algorithm=default"],
}


def run_mode(b, overrides: list[str], steps: int, warmup: int, peak: float) -> dict:
    cfg = compose(overrides)
    lay = b.layout
    dm = DataModule(cfg, dp=lay.dp, dp_rank=lay.dp_rank, pp=lay.pp, first_stage=lay.is_first_stage, tokens_per_tile=b.tokens_per_tile)
    if lay.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    total_s = samples = useful = real = padded = 0.0
    for i in range(warmup + steps):
        st = dm.next_step()
        t0 = time.perf_counter()
        mbs = list(dm.micro_batches(st))
        forward_backward(b, mbs)
        b.optimizer.step()
        if lay.device.type == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        if i < warmup:
            continue
        total_s += dt
        samples += st.num_samples
        useful += dm.useful_flops(st)
        real += sum(st.row_tokens)
        padded += dm.padded_tokens(st)
    out = {
        "time_per_sample_ms": 1000 * total_s / samples,
        "useful_tflops_per_device": useful / total_s / 1e12 / lay.world_size,
        "padding_fraction": 1 - real / padded,
        "samples": int(samples),
    }
    if peak:
        out["mfu"] = useful / total_s / lay.world_size / peak
    if lay.device.type == "cuda":
        out["peak_memory_gb"] = torch.cuda.max_memory_allocated() / 2**30
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--modes", default=",".join(MODES), help="comma-separated subset of " + ",".join(MODES))
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--peak-tflops", type=float, default=0.0)
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    base = ["trainer.progress_bar=off", *args.overrides]
    b = build(compose(base))
    peak = args.peak_tflops * 1e12 or peak_flops(b.cfg, b.layout.device)
    results = {}
    for mode in args.modes.split(","):
        results[mode] = run_mode(b, base + MODES[mode], args.steps, args.warmup, peak)
    if b.layout.rank == 0:
        ref = results.get("padded", next(iter(results.values())))["time_per_sample_ms"]
        dev = torch.cuda.get_device_name() if b.layout.device.type == "cuda" else "cpu"
        print(f"device: {dev}  world: {b.layout.world_size}  model: {b.cfg.model.name}  precision: {b.cfg.trainer.precision}  "
              f"seq_length: {b.cfg.packing.seq_length}  steps: {args.steps} (+{args.warmup} warmup)")
        print("| mode | ms / sample | useful TFLOP/s | MFU | peak mem GB | padding | speedup vs padded |")
        print("|---|---|---|---|---|---|---|")
        for mode, r in results.items():
            mfu = f"{r['mfu']:.3f}" if "mfu" in r else "-"
            mem = f"{r['peak_memory_gb']:.1f}" if "peak_memory_gb" in r else "-"
            print(f"| {mode} | {r['time_per_sample_ms']:.2f} | {r['useful_tflops_per_device']:.4f} | {mfu} | {mem} | "
                  f"{r['padding_fraction']:.3f} | {ref / r['time_per_sample_ms']:.2f}x |")
        if args.json:
            Path(args.json).write_text(json.dumps({"device": dev, "results": results}, indent=2))
    from mmtrain.parallel import setup

    setup.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
