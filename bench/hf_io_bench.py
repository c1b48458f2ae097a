"""Checkpoint import / export speed on CPU against transformers' own, in one process.

Builds a random LLaVA (Llama text + CLIP vision, ~0.3B parameters by default), saves it with
save_pretrained (bf16), then times: transformers `from_pretrained` (the baseline), our
`model=hf model.pretrained=DIR` model build + load at TP1 (and the whole training build
with DDP and the optimizer), a checkpoint save, and `export-hf` of that
checkpoint; checks the export is bit-exact. Prints one JSON line.

    python bench/hf_io_bench.py [--layers 16] [--hidden 1024] [--out /tmp/hf_io_bench]
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
import warnings
from pathlib import Path

warnings.filterwarnings("ignore")

import torch  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--out", default="/tmp/hf_io_bench")
    a = ap.parse_args()
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    root = Path(a.out)
    shutil.rmtree(root, ignore_errors=True)
    src = root / "src"
    text = LlamaConfig(vocab_size=a.vocab, hidden_size=a.hidden, intermediate_size=a.hidden * 11 // 4, num_hidden_layers=a.layers,
                       num_attention_heads=a.hidden // 64, num_key_value_heads=a.hidden // 256)
    vision = CLIPVisionConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, image_size=224, patch_size=14)
    model = LlavaForConditionalGeneration(LlavaConfig(text_config=text, vision_config=vision, image_token_index=a.vocab - 1)).to(torch.bfloat16)
    n_params = sum(p.numel() for p in model.parameters())
    model.save_pretrained(str(src))
    del model
    nbytes = sum(f.stat().st_size for f in src.glob("*.safetensors"))

    t0 = time.perf_counter()
    LlavaForConditionalGeneration.from_pretrained(str(src), dtype=torch.bfloat16)
    t_hf = time.perf_counter() - t0

    from mmtrain.config import compose
    from mmtrain.train.export_hf import export
    from mmtrain.parallel import setup
    from mmtrain.train import checkpoint as ckpt
    from mmtrain.train.build import build, build_model

    cfg = compose(["model=hf", f"model.pretrained={src}", "trainer.precision=bf16", f"trainer.output_dir={root / 'run'}",
                   "data.num_samples=4", "trainer.global_batch_size=4"])
    lay = setup.initialize(cfg.parallel, "cpu", 0)
    t0 = time.perf_counter()
    vlm = build_model(cfg, lay, torch.bfloat16)
    t_ours = time.perf_counter() - t0
    del vlm
    t0 = time.perf_counter()
    b = build(cfg)
    t_build = time.perf_counter() - t0
    t0 = time.perf_counter()
    ckpt.save(b, 0, b.data.state_dict(), {"source_fingerprint": b.data.source_fingerprint()}, keep_last=1)
    t_save = time.perf_counter() - t0
    t0 = time.perf_counter()
    export(root / "run", root / "export")
    t_export = time.perf_counter() - t0
    setup.shutdown()

    from safetensors import safe_open

    def tensors(d):
        out = {}
        for f in sorted(d.glob("*.safetensors")):
            with safe_open(str(f), "pt") as h:
                out.update({k: h.get_tensor(k) for k in h.keys()})
        return out

    x, y = tensors(src), tensors(root / "export")
    exact = x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
    print(json.dumps({
        "params": n_params, "safetensors_bytes": nbytes, "threads": torch.get_num_threads(),
        "transformers_from_pretrained_s": round(t_hf, 2), "mmtrain_model_and_load_tp1_s": round(t_ours, 2),
        "load_ratio_vs_transformers": round(t_ours / t_hf, 2), "mmtrain_full_build_s (+DDP, optimizer, data)": round(t_build, 2), "checkpoint_save_s": round(t_save, 2),
        "export_hf_s": round(t_export, 2), "export_bit_exact": exact,
    }))


if __name__ == "__main__":
    main()
