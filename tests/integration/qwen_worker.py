"""Worker for the Qwen2-VL / Qwen2.5-VL tests against transformers: 2 processes under torchrun
(gloo, CPU), the three layouts one after the other in the same process group, so one launch covers
TP1 (DP2: every rank holds the whole model), TP2 and PP2 for every checkpoint.

    qwen_worker.py OUT SPEC overrides...      SPEC = MODEL_DIR=INPUTS.pt[,MODEL_DIR=INPUTS.pt...]

INPUTS is a list of packed streams (tests/qwen_models.packed_inputs). Per checkpoint and layout:
`model=hf model.pretrained=MODEL_DIR` is built (megatron DDP and optimizer included); every stream
runs through megatron's forward-only schedule for the logits (TP-gathered) and the per-token loss;
the first stage records the ViT hidden states and the projected image features; a step-0 checkpoint
is saved under OUT/<i>/<layout> (export round trip); then `trainer.max_steps` optimizer steps run
through mmtrain.train.step.forward_backward on PackedMicroBatches made of the streams (DP ranks
split them), their losses recorded. At TP1 the trained checkpoint is saved under OUT/<i>/trained
with the logits after training. Each rank writes OUT.rank<R>.pt: {layout: {MODEL_DIR: ...}}.
"""

from __future__ import annotations

import sys
import warnings

warnings.filterwarnings("ignore")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from megatron.core import parallel_state  # noqa: E402
from megatron.core.packed_seq_params import PackedSeqParams  # noqa: E402
from megatron.core.pipeline_parallel import get_forward_backward_func  # noqa: E402

from mmtrain.config import compose  # noqa: E402
from mmtrain.parallel import setup  # noqa: E402
from mmtrain.steps.batch import PackedMicroBatch, validate  # noqa: E402
from mmtrain.train import checkpoint as ckpt  # noqa: E402
from mmtrain.train.build import build  # noqa: E402

LAYOUTS = {"tp1": (1, 1), "tp2": (2, 1), "pp2": (1, 2)}  # (TP, PP) at world size 2; tp1 runs as DP2
IMAGE_PAD = 146


def _tp_gather(t: torch.Tensor) -> torch.Tensor:
    tp = parallel_state.get_tensor_model_parallel_world_size()
    if tp == 1:
        return t
    parts = [torch.empty_like(t) for _ in range(tp)]
    dist.all_gather(parts, t.contiguous(), group=parallel_state.get_tensor_model_parallel_group())
    return torch.cat(parts, dim=-1)


def _forward_only(vlm, streams: list[dict], with_labels: bool) -> list[torch.Tensor]:
    """Last stage: per stream, the logits [T, V_padded] (TP-gathered) or the per-token loss [T]."""
    results: list[torch.Tensor] = []

    def loss_func(output):
        out = output[0].detach()
        results.append(out if with_labels else _tp_gather(out))
        return torch.zeros(()), torch.ones((), dtype=torch.int), {}

    def forward_step(it, model):
        s = next(it)
        psp = PackedSeqParams(
            qkv_format="thd", cu_seqlens_q=s["cu_seqlens"], cu_seqlens_kv=s["cu_seqlens"],
            max_seqlen_q=s["max_seqlen"], max_seqlen_kv=s["max_seqlen"],
        )
        first = parallel_state.is_pipeline_first_stage()
        out = model(
            s["tokens"], s["position_ids"], psp,
            images=s["images"] if first else None,
            image_token_index=s["image_token_index"] if first else None,
            labels=s["labels"] if (with_labels and parallel_state.is_pipeline_last_stage()) else None,
            image_grid_thw=s["image_grid_thw"] if first else None,
            mrope_position_ids=s["mrope_position_ids"],  # every stage rotates its own layers
        )
        return out, loss_func

    with torch.no_grad():
        get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=iter(streams), model=[vlm], num_microbatches=len(streams),
            seq_length=max(int(s["tokens"].shape[0]) for s in streams), micro_batch_size=1, forward_only=True,
        )
    return results


def _outputs(vlm, lay, streams, vision_layers: int) -> dict:
    rec: dict = {"tp_rank": lay.tp_rank, "pp_rank": lay.pp_rank}
    logits = _forward_only(vlm, streams, with_labels=False)
    losses = _forward_only(vlm, streams, with_labels=True)
    if lay.is_last_stage:
        rec["logits"], rec["losses"] = logits, losses
    if lay.is_first_stage:
        pixels = torch.cat([s["images"] for s in streams])
        grid = torch.cat([s["image_grid_thw"] for s in streams])
        with torch.no_grad():
            rec["vit_hidden"] = [vlm.vision.hidden_states(pixels, grid, k) for k in range(vision_layers + 1)]
            rec["image_features"] = vlm.projector(vlm.vision(pixels, grid))
    return rec


def loss_mask(s: dict) -> torch.Tensor:
    """1 where the label is a text token of the same sample (not an image token, not past the end)."""
    m = (s["labels"] != IMAGE_PAD).float()
    m[torch.tensor([b - 1 for _, b in s["spans"]])] = 0.0
    return m


def micro_batch(s: dict, k: int) -> PackedMicroBatch:
    mb = PackedMicroBatch(
        tokens=s["tokens"], labels=s["labels"], loss_mask=loss_mask(s), position_ids=s["position_ids"],
        cu_seqlens=s["cu_seqlens"], max_seqlen=s["max_seqlen"], images=s["images"],
        image_token_index=s["image_token_index"], sample_ids=list(range(k, k + len(s["spans"]))),
        num_real_tokens=int(s["tokens"].shape[0]), sample_spans=s["spans"],
        image_grid_thw=s["image_grid_thw"], mrope_position_ids=s["mrope_position_ids"],
    )
    validate(mb)
    return mb


def _save(b, step: int) -> None:
    ckpt.save(b, step, b.data.state_dict(), {"source_fingerprint": b.data.source_fingerprint()}, keep_last=1)


def run(out: str, spec: str, overrides: list[str]) -> None:
    from mmtrain.train.lr import lr_at
    from mmtrain.train.step import forward_backward

    recs: dict = {}
    rank = 0
    for layout, (tp, pp) in LAYOUTS.items():
        for i, item in enumerate(spec.split(",")):
            model_dir, inputs = item.split("=")
            cfg = compose([
                "model=hf", f"model.pretrained={model_dir}", "model.attention_backend=reference", *overrides,
                # the run's own data module is not used here (the streams are); native models read
                # native data: the length table of the native recipe's smoke scale
                "data=lengths", "data.source=tests/assets/llava_pretrain_native_smoke.csv",
                f"parallel.tensor_model_parallel_size={tp}", f"parallel.pipeline_model_parallel_size={pp}",
                f"trainer.output_dir={out}/{i}/{layout}",
            ])
            b = build(cfg)
            lay, rank = b.layout, b.layout.rank
            vlm = b.model.module
            streams = torch.load(inputs, weights_only=False)
            rec = _outputs(vlm.eval(), lay, streams, cfg.model.vision.num_layers)
            _save(b, 0)
            mine = [micro_batch(s, 100 * k) for k, s in enumerate(streams)][lay.dp_rank :: lay.dp]
            losses = []
            vlm.train()
            for step in range(cfg.trainer.max_steps):
                for group in b.optimizer.param_groups:
                    group["lr"] = lr_at(b.cfg, step)
                r = forward_backward(b, mine)
                b.optimizer.step()
                losses.append(r["loss_sum"] / r["loss_tokens"])
            rec["train_losses"] = losses
            if layout == "tp1":
                b.cfg.trainer.output_dir = f"{out}/{i}/trained"
                _save(b, cfg.trainer.max_steps)
                rec["after"] = _outputs(vlm.eval(), lay, streams, cfg.model.vision.num_layers)
            recs.setdefault(layout, {})[model_dir] = rec
    torch.save(recs, f"{out}.rank{rank}.pt")


if __name__ == "__main__":
    out_path, spec_arg, *rest = sys.argv[1:]
    try:
        run(out_path, spec_arg, rest)
    finally:
        setup.shutdown()
