"""Worker for the multi-process equivalence tests (run under torchrun, gloo, CPU).

Modes:
  equivalence OUT overrides...  one global batch through the *same* model twice, in two layouts given by
                                MMTRAIN_EQ_VARIANTS (default packed vs unpacked; same samples because
                                packing.buffer_size == global_batch_size); records the
                                loss, every parameter gradient (this rank's shard) and, at PP=1, the
                                logits of every real token, keyed by sample id.
  train OUT overrides...        a few optimizer steps; records losses, the gradients the optimizer gets
                                each step (DP-reduced, before clipping) with megatron's grad norm, and
                                the updated parameters (full tensors, gathered across TP) for
                                DP1-vs-DP2 checks.
Each rank writes OUT.rank<R>.pt; the test process compares.
"""

from __future__ import annotations

import sys
import warnings

warnings.filterwarnings("ignore")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from mmtrain.config import compose  # noqa: E402
from mmtrain.steps.datamodule import DataModule  # noqa: E402
from mmtrain.train.build import build  # noqa: E402
from mmtrain.train.step import forward_backward, packed_seq_params, run_step  # noqa: E402


def _grads(b) -> dict[str, torch.Tensor]:
    out = {}
    for name, p in b.model.module.named_parameters():
        if p.requires_grad:
            out[name] = p.main_grad.detach().clone().cpu()
    return out


def _logits_by_sample(b, micro_batches) -> dict[int, torch.Tensor]:
    """Real-token logits per sample (this TP rank's vocab shard)."""
    out = {}
    with torch.no_grad():
        for mb in micro_batches:
            logits = b.model(
                mb.tokens, mb.position_ids, packed_seq_params(mb), images=mb.images, image_token_index=mb.image_token_index
            )[0]
            for sid, (start, end) in zip(mb.sample_ids, mb.sample_spans):
                out[sid] = logits[start:end].clone()
    return out


def equivalence(path: str, overrides: list[str], variants: tuple[str, str]) -> None:
    """Same global batch, same model, two data layouts (variants a/b, e.g. packing on/off); a variant
    is one or more space-separated overrides."""
    results = {}
    b = build(compose(overrides + variants[0].split()))
    lay = b.layout
    for key, variant in zip(("a", "b"), variants):
        c = compose(overrides + variant.split())
        dm = DataModule(c, dp=lay.dp, dp_rank=lay.dp_rank, pp=lay.pp, first_stage=lay.is_first_stage, tokens_per_tile=b.tokens_per_tile)
        plan = dm.next_step()
        mbs = list(dm.micro_batches(plan))
        r = forward_backward(b, mbs)
        rec = {
            "loss": r["loss_sum"] / r["loss_tokens"],
            "samples": sorted(plan.sample_ids),
            "grads": _grads(b),
            "layout": plan.rank_micro_batches,
        }
        if lay.pp == 1:
            rec["logits"] = {(lay.tp_rank, sid): v for sid, v in _logits_by_sample(b, mbs).items()}
        results[key] = rec
    torch.save(results, f"{path}.rank{lay.rank}.pt")


def train(path: str, overrides: list[str]) -> None:
    cfg = compose(overrides)
    b = build(cfg)
    losses, grads, norms = [], [], []
    optimizer_step = b.optimizer.step

    def step_recording_the_reduced_gradients():
        # what the optimizer gets: DP-reduced, divided by the global loss-token count, before clipping
        grads.append({name: _full(b, p, p.main_grad) for name, p in b.model.module.named_parameters() if p.requires_grad})
        ok, grad_norm, zeros = optimizer_step()
        norms.append(float(grad_norm) if grad_norm is not None else float("nan"))
        return ok, grad_norm, zeros

    b.optimizer.step = step_recording_the_reduced_gradients
    tiles = []  # tiles this DP rank ran, per step (0: its micro-batches hold no image)
    for _ in range(cfg.trainer.max_steps):
        plan = b.data.next_step()
        tiles.append(sum(int(b.data.stream.tiles[i]) for i in plan.rank_samples(b.layout.dp_rank)))
        r = run_step(b, plan)
        losses.append(r["loss_sum"] / r["loss_tokens"])
    params = {name: _full(b, p, p.detach()) for name, p in b.model.module.named_parameters()}
    torch.save({"losses": losses, "params": params, "grads": grads, "grad_norms": norms, "tiles": tiles, "dp_rank": b.layout.dp_rank,
                "pp_rank": b.layout.pp_rank, "overlap_grad_reduce": b.model.ddp_config.overlap_grad_reduce},
               f"{path}.rank{b.layout.rank}.pt")


def _full(b, p, t: torch.Tensor) -> torch.Tensor:
    """`t` (the parameter `p` or its gradient) as the full tensor, gathered across TP."""
    t = t.detach().float()
    if getattr(p, "tensor_model_parallel", False) and b.layout.tp > 1:
        from megatron.core import parallel_state

        parts = [torch.empty_like(t) for _ in range(b.layout.tp)]
        dist.all_gather(parts, t.contiguous(), group=parallel_state.get_tensor_model_parallel_group())
        t = torch.cat(parts, dim=p.partition_dim)
    return t.cpu().clone()  # a copy: main_grad and the parameters change in place at the next step


if __name__ == "__main__":
    mode, out, *ovr = sys.argv[1:]
    try:
        if mode == "equivalence":  # MMTRAIN_EQ_VARIANTS="a-override;b-override"
            import os

            a, b_ = os.environ.get("MMTRAIN_EQ_VARIANTS", "packing.enabled=true;packing.enabled=false").split(";")
            equivalence(out, ovr, (a, b_))
        else:
            train(out, ovr)
    finally:
        from mmtrain.parallel import setup

        setup.shutdown()
