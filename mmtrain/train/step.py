"""One optimizer step: megatron-core's forward/backward schedule over this rank's packed
micro-batches, then the optimizer step (skipped when the loss or a gradient is not finite).

The loss is the global per-token mean over all micro-batches and DP ranks (megatron-core's
`calculate_per_token_loss`): each micro-batch returns its loss *sum* and its loss-token count,
gradients are summed across DP, and `finalize_model_grads` divides them by the global loss-token
count. So packing, balancing and the DP size change where tokens are computed, never the loss or
the update.
"""

from __future__ import annotations

import math
import time
from functools import partial
from typing import Optional

import torch
import torch.distributed as dist
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.pipeline_parallel import get_forward_backward_func

from mmtrain.steps.batch import PackedMicroBatch
from mmtrain.steps.prefetch import model_images
from mmtrain.train import faults
from mmtrain.train.build import Built, _TimedFinalize
from mmtrain.train.lr import lr_at


def packed_seq_params(mb: PackedMicroBatch) -> PackedSeqParams:
    return PackedSeqParams(
        qkv_format="thd",
        cu_seqlens_q=mb.cu_seqlens,
        cu_seqlens_kv=mb.cu_seqlens,
        cu_seqlens_q_padded=mb.cu_seqlens_padded,
        cu_seqlens_kv_padded=mb.cu_seqlens_padded,
        max_seqlen_q=mb.max_seqlen,
        max_seqlen_kv=mb.max_seqlen,
    )


def _loss_func(loss_mask: torch.Tensor, output: torch.Tensor):
    """(loss sum, loss-token count, logged values) of one micro-batch. Returning the *sum* with the
    count is what makes the step loss the global per-token mean: megatron's schedule sums both over
    micro-batches and `finalize_model_grads` divides the DP-summed gradients by the global count."""
    losses = output.float().reshape(-1)
    loss_sum = (losses * loss_mask).sum()
    n = loss_mask.sum().to(torch.int)
    return loss_sum, n, {"loss_sum": loss_sum.detach().clone(), "tokens": n.detach().clone()}


def forward_backward(b: Built, micro_batches: list[PackedMicroBatch], *, forward_only: bool = False, step: int = 0) -> dict:
    """Run megatron-core's schedule over this rank's micro-batches; grads end in DDP's main_grad,
    already all-reduced over DP and divided by the global loss-token count."""
    mbs = [mb.to(b.layout.device) for mb in micro_batches]
    first, last = b.layout.is_first_stage, b.layout.is_last_stage
    pixel_norm = getattr(b.data.source, "pixel_norm", None)

    def forward_step(data_iterator, model):
        mb: PackedMicroBatch = next(data_iterator)
        out = model(
            mb.tokens,
            mb.position_ids,
            packed_seq_params(mb),
            images=model_images(mb.images, b.dtype, pixel_norm) if first else None,
            image_token_index=mb.image_token_index if first else None,
            labels=mb.labels if last else None,
            image_grid_thw=mb.image_grid_thw if first else None,
            mrope_position_ids=mb.mrope_position_ids,
        )
        return out, partial(_loss_func, mb.loss_mask)

    b.model.zero_grad_buffer()
    b.optimizer.zero_grad()
    timer = b.model.module.config.finalize_model_grads_func
    if isinstance(timer, _TimedFinalize):
        timer.entered = None
    t0 = time.perf_counter()
    losses = get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=iter(mbs),
        model=[b.model],
        num_microbatches=len(mbs),
        seq_length=max(mb.num_tokens for mb in mbs),
        micro_batch_size=1,
        forward_only=forward_only,
    )
    if b.layout.device.type == "cuda":
        torch.cuda.synchronize()
    done = timer.entered if isinstance(timer, _TimedFinalize) and timer.entered is not None else time.perf_counter()
    compute_s = done - t0  # this rank's forward/backward, without waiting for the DP all-reduce
    local = torch.zeros(2, dtype=torch.float64, device=b.layout.device)
    if last and b.layout.tp_rank == 0:
        for d in losses:
            local[0] += d["loss_sum"].double()
            local[1] += d["tokens"].double()
    dist.all_reduce(local)
    return {
        "loss_sum": float(local[0]),
        "loss_tokens": int(local[1]),
        "compute_s": compute_s,
        "local_tokens": sum(mb.num_tokens for mb in mbs),
    }


def _mask_failed_samples(b: Built, mbs: list[PackedMicroBatch]) -> int:
    """Zero the loss of samples whose image failed to decode (data.bad_sample_policy=skip), so every
    rank still runs the same schedule. Returns how many such samples this rank holds."""
    failed = getattr(b.data.source, "decode_failed", None)
    if not failed:
        return 0
    n = 0
    for mb in mbs:
        for sid, (start, end) in zip(mb.sample_ids, mb.sample_spans):
            if sid in failed:
                mb.loss_mask[start:end] = 0.0
                n += 1
    return n


def run_step(b: Built, st, injector: Optional[faults.FaultInjector] = None, micro_batches=None) -> dict:
    """Forward/backward over this rank's micro-batches of step `st` (a `mmtrain.steps.stream.Step`;
    built here unless the step feed already built them), then the optimizer step, unless the loss or
    a gradient is NaN/Inf on any rank: then the update is skipped (`nonfinite`)."""
    for group in b.optimizer.param_groups:
        group["lr"] = lr_at(b.cfg, st.step)
    mbs = list(micro_batches) if micro_batches is not None else list(b.data.micro_batches(st))
    bad = _mask_failed_samples(b, mbs)
    r = forward_backward(b, mbs, step=st.step)
    r["bad_samples_local"] = bad
    r["sample_ids_local"] = [s for mb in mbs for s in mb.sample_ids]  # what this rank ran, in order
    if injector is not None:
        injector.after_backward(st.step, r, b.model)
    if not (math.isfinite(r["loss_sum"]) and faults.grads_finite(b.model, b.layout.device)):
        r.update(grad_norm=float("nan"), update_ok=False, nonfinite=True)
        return r
    ok, grad_norm, _ = b.optimizer.step()
    r["grad_norm"] = float(grad_norm) if grad_norm is not None else float("nan")
    r["update_ok"] = bool(ok)
    r["nonfinite"] = not bool(ok) or not math.isfinite(r["grad_norm"])
    return r
