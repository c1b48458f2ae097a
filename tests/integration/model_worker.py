"""Worker for the model tests against transformers: 2 processes under torchrun (gloo, CPU), each
mode running three layouts one after the other in the same process group, so one launch covers
TP1 (DP2: every rank holds the whole model), TP2 and PP2.

Modes (SPEC = MODEL_DIR=INPUTS.pt[,MODEL_DIR=INPUTS.pt...], INPUTS a list of packed streams from
tests/hf_models.packed_inputs):
  hf OUT SPEC
        `model=hf model.pretrained=MODEL_DIR`; every stream through megatron's forward-only
        schedule twice, for the logits (gathered over TP) and the per-token loss; the first stage
        also records the ViT hidden states 0..L and the projected image features.
  init OUT overrides...
        build (layout-invariant init), every parameter's full tensor by layout-independent name,
        then step 0's loss.
  train OUT SPEC overrides...
        per model and layout: build from the checkpoint, save a step-0 checkpoint under
        OUT/<i>/<layout> (export round trip), train, record the losses; at DP2 also save the trained
        checkpoint under OUT/<i>/trained and the logits of the streams after training.
Each rank writes OUT.rank<R>.pt: {layout: ...}; the test process compares with transformers.
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
from mmtrain.models import params  # noqa: E402
from mmtrain.parallel import setup  # noqa: E402
from mmtrain.train import checkpoint as ckpt  # noqa: E402
from mmtrain.train.build import build, build_model  # noqa: E402

LAYOUTS = {"tp1": (1, 1), "tp2": (2, 1), "pp2": (1, 2)}  # (TP, PP) at world size 2; tp1 runs as DP2


def _layout(name: str) -> list[str]:
    tp, pp = LAYOUTS[name]
    return [f"parallel.tensor_model_parallel_size={tp}", f"parallel.pipeline_model_parallel_size={pp}"]


def _spec(spec: str) -> list[tuple[str, str]]:
    return [tuple(item.split("=")) for item in spec.split(",")]  # type: ignore[misc]


def _tp_gather(t: torch.Tensor, dim: int) -> torch.Tensor:
    tp = parallel_state.get_tensor_model_parallel_world_size()
    if tp == 1:
        return t
    parts = [torch.empty_like(t) for _ in range(tp)]
    dist.all_gather(parts, t.contiguous(), group=parallel_state.get_tensor_model_parallel_group())
    return torch.cat(parts, dim=dim)


def _forward_only(vlm, streams: list[dict], with_labels: bool) -> list[torch.Tensor]:
    """Last stage: per stream, the logits [T, V_padded] (TP-gathered) or the per-token loss [T]."""
    results: list[torch.Tensor] = []

    def loss_func(output):
        out = output[0].detach()
        results.append(out if with_labels else _tp_gather(out, dim=-1))
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
        with torch.no_grad():
            rec["vit_hidden"] = [vlm.vision.hidden_states(pixels, k) for k in range(vision_layers + 1)]
            rec["image_features"] = vlm.projector(vlm.vision(pixels))
    return rec


def hf(out: str, spec: str) -> None:
    recs: dict = {}
    rank = 0
    for layout in LAYOUTS:
        for model_dir, inputs in _spec(spec):
            cfg = compose(["model=hf", f"model.pretrained={model_dir}", "model.attention_backend=reference", *_layout(layout)])
            lay = setup.initialize(cfg.parallel, "cpu", cfg.trainer.seed)
            rank = lay.rank
            vlm = build_model(cfg, lay, torch.float32).eval()
            streams = torch.load(inputs, weights_only=False)
            recs.setdefault(layout, {})[model_dir] = _outputs(vlm, lay, streams, cfg.model.vision.num_layers)
    torch.save(recs, f"{out}.rank{rank}.pt")


def full_params(vlm, lay) -> dict[str, torch.Tensor]:
    """Every parameter of this rank as its full tensor, by layout-independent name."""
    out = {}
    for rp in params.rank_params(vlm, lay.tp):
        t = rp.param.detach()
        shards = [t]
        if rp.spec.dim is not None and lay.tp > 1:
            shards = [torch.empty_like(t) for _ in range(lay.tp)]
            dist.all_gather(shards, t.contiguous(), group=parallel_state.get_tensor_model_parallel_group())
        out[rp.name] = params.unshard(shards, rp.spec, vlm.vocab_size).clone()
    return out


def init(out: str, overrides: list[str]) -> None:
    from mmtrain.train.step import run_step

    recs: dict = {}
    for layout in LAYOUTS:
        b = build(compose(overrides + _layout(layout)))
        weights = full_params(b.model.module, b.layout)
        r = run_step(b, b.data.next_step())
        recs[layout] = {"params": weights, "loss": r["loss_sum"] / r["loss_tokens"]}
    torch.save(recs, f"{out}.rank{b.layout.rank}.pt")


def _save(b, step: int) -> None:
    ckpt.save(b, step, b.data.state_dict(), {"source_fingerprint": b.data.source_fingerprint()}, keep_last=1)


def train(out: str, spec: str, overrides: list[str]) -> None:
    from mmtrain.train.step import run_step

    recs: dict = {}
    for i, (model_dir, inputs) in enumerate(_spec(spec)):
        for layout in LAYOUTS:
            cfg = compose(["model=hf", f"model.pretrained={model_dir}", *overrides, *_layout(layout),
                           f"trainer.output_dir={out}/{i}/{layout}"])
            b = build(cfg)
            _save(b, 0)
            losses = []
            for _ in range(cfg.trainer.max_steps):
                r = run_step(b, b.data.next_step())
                losses.append(r["loss_sum"] / r["loss_tokens"])
            rec: dict = {"losses": losses}
            if layout == "tp1":
                b.cfg.trainer.output_dir = f"{out}/{i}/trained"
                _save(b, cfg.trainer.max_steps)
                vlm = b.model.module.eval()
                rec["after"] = _outputs(vlm, b.layout, torch.load(inputs, weights_only=False), cfg.model.vision.num_layers)
            recs.setdefault(layout, {})[model_dir] = rec
    torch.save(recs, f"{out}.rank{b.layout.rank}.pt")


if __name__ == "__main__":
    mode, out_path, *rest = sys.argv[1:]
    try:
        if mode == "hf":
            hf(out_path, rest[0])
        elif mode == "init":
            init(out_path, rest)
        elif mode == "train":
            train(out_path, rest[0], rest[1:])
        else:
            raise SystemExit(f"unknown mode {mode}")
    finally:
        setup.shutdown()
