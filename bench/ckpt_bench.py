"""Checkpoint save / load cost (mmtrain/train/checkpoint.py) on a mid-size LLaVA, one process.

A transformers LLaVA (Llama decoder 8 x 1024, vocab 32000; CLIP ViT 6 x 512; ~190M parameters,
fp32 safetensors) is written to a temporary folder and trained with `model=hf`:

* frozen LM + ViT, projector trained (LLaVA stage 1): the checkpoint without the frozen weights
  (trainer.save_frozen=false, the default) against with them (save_frozen=true);
* everything trained: a blocking save against the blocking part of an async save (the host copy),
  and the load (resume) time;
* the model.pretrained fingerprint (sha256 of the weight files) a run computes once at start.

Each figure is the median of --repeats runs, all in one process; the baseline of each comparison
is measured in the same run. usage: python bench/ckpt_bench.py [--repeats 3] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

warnings.filterwarnings("ignore")
os.environ.setdefault("OMP_NUM_THREADS", "2")


def make_source(out: Path) -> Path:
    import torch
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    text = LlamaConfig(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=8,
                       num_attention_heads=16, num_key_value_heads=4)
    vision = CLIPVisionConfig(hidden_size=512, intermediate_size=2048, num_hidden_layers=6, num_attention_heads=8,
                              image_size=28, patch_size=7)
    cfg = LlavaConfig(text_config=text, vision_config=vision, image_token_index=31999, vision_feature_layer=-2)
    torch.manual_seed(0)
    LlavaForConditionalGeneration(cfg).save_pretrained(str(out))
    return out


def build_run(source: Path, out: Path, *overrides: str):
    from mmtrain.config import compose
    from mmtrain.train import checkpoint as ckpt
    from mmtrain.train.build import build
    from mmtrain.train.step import run_step

    cfg = compose(["model=hf", f"model.pretrained={source}", "trainer.precision=fp32", "trainer.global_batch_size=2",
                   "data.num_samples=8", "data.max_tiles=2", "data.max_text_tokens=32", "packing.seq_length=256",
                   f"trainer.output_dir={out}", "trainer.keep_last=1", *overrides])
    b = build(cfg)
    run_step(b, b.data.next_step())  # Adam state exists, as in any checkpoint after step 1
    ck = ckpt.Checkpointer(b, b.data.source_fingerprint())
    return b, ck


def timed_saves(b, ck, repeats: int, step0: int) -> list[dict]:
    out = []
    for i in range(repeats):
        ck.save(step0 + i, b.data.state_dict(), {}, reason="final")
        out += ck.drain()
    return out


def med(xs):
    return statistics.median(xs)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", help="write the JSON results here too")
    a = ap.parse_args()

    from mmtrain.parallel import setup
    from mmtrain.train import checkpoint as ckpt

    tmp = Path(tempfile.mkdtemp(prefix="ckpt-bench-"))
    res: dict = {}
    try:
        t0 = time.perf_counter()
        source = make_source(tmp / "source")
        res["source_bytes"] = sum(p.stat().st_size for p in source.iterdir())
        res["make_source_s"] = round(time.perf_counter() - t0, 2)
        fp = [ckpt.pretrained_fingerprint(str(source)) for _ in range(a.repeats)]
        t = []
        for _ in range(a.repeats):
            t0 = time.perf_counter()
            ckpt.pretrained_fingerprint(str(source))
            t.append(time.perf_counter() - t0)
        res["fingerprint_s"] = round(med(t), 3)
        res["fingerprint_GBps"] = round(res["source_bytes"] / med(t) / 1e9, 2)
        assert len({f["sha256"] for f in fp}) == 1

        for frozen in (False, True):
            b, ck = build_run(source, tmp / f"stage1_{frozen}", "model.freeze_lm=true", "model.freeze_vit=true",
                              f"trainer.save_frozen={str(frozen).lower()}")
            saves = timed_saves(b, ck, a.repeats, 1)
            res[f"stage1_save_frozen_{frozen}"] = {"bytes": saves[-1]["bytes"], "save_s": round(med([s["save_s"] for s in saves]), 3)}
            setup.shutdown()

        b, ck = build_run(source, tmp / "full", "model.freeze_vit=false")
        sync = timed_saves(b, ck, a.repeats, 1)
        ck.async_save = True
        ck.group = None  # one process: the background thread needs no collective group
        blocking, total = [], []
        for i in range(a.repeats):
            ck.save(10 + i, b.data.state_dict(), {}, reason="interval")
            ck.wait()
            s = ck.drain()[-1]
            blocking.append(s["blocking_s"])
            total.append(s["save_s"])
        path = ckpt.find_latest(tmp / "full")
        meta = ckpt.read_meta(path)
        loads = []
        for _ in range(a.repeats):
            t0 = time.perf_counter()
            ck.load(path, meta)
            loads.append(time.perf_counter() - t0)
        res["full_train"] = {
            "bytes": sync[-1]["bytes"],
            "sync_save_s": round(med([s["save_s"] for s in sync]), 3),
            "async_blocking_s": round(med(blocking), 3),
            "async_total_s": round(med(total), 3),
            "load_s": round(med(loads), 3),
        }
        setup.shutdown()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    text = json.dumps(res, indent=1)
    print(text)
    if a.out:
        Path(a.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
