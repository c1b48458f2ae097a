"""Worker for tests/integration/test_hf_text.py: 2 processes under torchrun (gloo, CPU), one process
group, several layouts one after the other (TP1 as DP2, TP2, PP2), so one launch covers them all.

  eval OUT DIR=DATA[,DIR=DATA...] [overrides...]
        `model=hf model.pretrained=DIR data=llava_json data.source=DATA`, the model built once per
        layout, then mmtrain's evaluator with packing on and off. Rank 0 writes OUT (JSON):
        {DIR: {layout: {"packed"|"unpacked": [[record id, loss_sum, tokens], ...]}}}.
  step0 OUT overrides...
        the first training step's loss at TP1 (DP2) and PP2 from the same seed. Rank 0 writes OUT:
        {layout: loss}.
"""

from __future__ import annotations

import json
import sys
import warnings

warnings.filterwarnings("ignore")

import torch  # noqa: E402

from mmtrain.config import compose  # noqa: E402
from mmtrain.models.vlm import tokens_per_tile  # noqa: E402
from mmtrain.parallel import setup  # noqa: E402
from mmtrain.steps.datamodule import build_source  # noqa: E402
from mmtrain.train.build import build, build_model  # noqa: E402
from mmtrain.train.evaluate import Evaluator  # noqa: E402

LAYOUTS = {"tp1": (1, 1), "tp2": (2, 1), "pp2": (1, 2)}


def _layout(name: str) -> list[str]:
    tp, pp = LAYOUTS[name]
    return [f"parallel.tensor_model_parallel_size={tp}", f"parallel.pipeline_model_parallel_size={pp}"]


def evaluate(out: str, spec: str, overrides: list[str]) -> None:
    recs: dict = {}
    rank = 0
    for item in spec.split(","):
        model_dir, data = item.split("=")
        for layout in LAYOUTS:
            cfg = compose(["model=hf", f"model.pretrained={model_dir}", "data=llava_json", f"data.source={data}",
                           *overrides, *_layout(layout)])
            lay = setup.initialize(cfg.parallel, "cpu", cfg.trainer.seed)
            rank = lay.rank
            vlm = build_model(cfg, lay, torch.float32).eval()
            tpt = tokens_per_tile(cfg.model)
            source = build_source(cfg, tpt)
            for packing in (True, False):
                cfg.packing.enabled = packing
                ev = Evaluator(cfg, lay, source, tpt)
                scored = ev.gather(ev.run(vlm, torch.float32))
                if scored is not None:
                    key = "packed" if packing else "unpacked"
                    recs.setdefault(model_dir, {}).setdefault(layout, {})[key] = [
                        [source.ids[i], s, n] for i, s, n in scored
                    ]
    if rank == 0:
        with open(out, "w") as f:
            json.dump(recs, f)


def step0(out: str, overrides: list[str]) -> None:
    from mmtrain.train.step import run_step

    losses = {}
    rank = 0
    for layout in ("tp1", "pp2"):
        b = build(compose(overrides + _layout(layout)))
        rank = b.layout.rank
        r = run_step(b, b.data.next_step())
        losses[layout] = r["loss_sum"] / r["loss_tokens"]
    if rank == 0:
        with open(out, "w") as f:
            json.dump(losses, f)


if __name__ == "__main__":
    mode, out = sys.argv[1], sys.argv[2]
    try:
        if mode == "eval":
            evaluate(out, sys.argv[3], sys.argv[4:])
        elif mode == "step0":
            step0(out, sys.argv[3:])
        else:
            raise SystemExit(f"unknown mode {mode}")
    finally:
        setup.shutdown()
