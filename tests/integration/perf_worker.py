"""Worker for the hot-path numerics tests: one packed step through the same model (same weights)
under several perf= variants, in one process (world of one, CPU, fp32).

  python tests/integration/perf_worker.py OUT.pt VARIANTS overrides...

VARIANTS is `;`-separated, each variant a space-separated list of overrides (e.g.
"perf.rope=megatron;perf.rope=packed perf.fuse=true"). Per variant it records the global per-token
loss, the real tokens' logits of every sample (keyed by sample id) and every parameter gradient. The
micro-batches come from the training feed (mmtrain.steps.prefetch.StepFeed), so static shapes
(perf.compile) are padded exactly as in training.
"""

from __future__ import annotations

import sys
import warnings

warnings.filterwarnings("ignore")

import torch  # noqa: E402

from mmtrain.config import compose  # noqa: E402
from mmtrain.models.vlm import tokens_per_tile  # noqa: E402
from mmtrain.parallel import setup  # noqa: E402
from mmtrain.steps.datamodule import DataModule  # noqa: E402
from mmtrain.steps.prefetch import StepFeed, model_images  # noqa: E402
from mmtrain.train.build import build_model  # noqa: E402
from mmtrain.train.runtime import static_shape  # noqa: E402
from mmtrain.train.step import packed_seq_params  # noqa: E402


def run_variant(lay, overrides: list[str]) -> dict:
    cfg = compose(overrides)
    vlm = build_model(cfg, lay, torch.float32)
    dm = DataModule(cfg, dp=1, dp_rank=0, pp=1, first_stage=True, tokens_per_tile=tokens_per_tile(cfg.model))
    feed = StepFeed(dm, lay.device, prefetch=False, static=static_shape(cfg))
    ready = feed.next()
    calls = [0]  # decoder core-attention forwards during the training pass (recompute runs them again)
    from mmtrain.models.attention.core import VarlenCoreAttention

    hooks = [
        m.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
        for n, m in vlm.named_modules()
        if isinstance(m, VarlenCoreAttention) and n.startswith("language_model.")
    ]
    total = torch.zeros((), dtype=torch.float64)
    count = 0
    logits: dict[int, torch.Tensor] = {}
    for mb in ready.micro_batches:
        args = (mb.tokens, mb.position_ids, packed_seq_params(mb))
        kw = dict(images=model_images(mb.images, torch.float32), image_token_index=mb.image_token_index)
        loss = vlm(*args, **kw, labels=mb.labels)[0]
        total = total + (loss * mb.loss_mask).sum().double()
        count += int(mb.loss_mask.sum())
    (total / count).backward()
    for h in hooks:
        h.remove()
    with torch.no_grad():
        for mb in ready.micro_batches:
            kw = dict(images=model_images(mb.images, torch.float32), image_token_index=mb.image_token_index)
            out = vlm(mb.tokens, mb.position_ids, packed_seq_params(mb), **kw)[0]
            for sid, (start, end) in zip(mb.sample_ids, mb.sample_spans):
                logits[sid] = out[start:end, : cfg.model.decoder.vocab_size].clone()
    grads = {n: p.grad.detach().clone() for n, p in vlm.named_parameters() if p.grad is not None}
    return {
        "loss": float(total / count),
        "logits": logits,
        "grads": grads,
        "tokens": [mb.num_tokens for mb in ready.micro_batches],
        "core_attention_calls": calls[0],
        "backends": dict(vlm.attention_backends),
        "runtime": vlm.runtime,
    }


def main() -> None:
    out, variants, *overrides = sys.argv[1:]
    lay = setup.initialize(compose(overrides).parallel, "cpu", 0)
    results = {}
    try:
        for v in variants.split(";"):
            results[v] = run_variant(lay, overrides + v.split())
    finally:
        setup.shutdown()
    torch.save(results, out)


if __name__ == "__main__":
    main()
