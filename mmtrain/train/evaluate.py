"""Teacher-forced evaluation: `mmtrain eval --out SCORES.jsonl [Hydra overrides]` and the validation
loss that training logs every `trainer.eval_interval` steps (`data.validation_source`).

Every sample of the source is evaluated exactly once, whatever the layout: `eval_plan` packs the
samples (packing.enabled, on by default) or keeps one per row, in source order, and gives each
row to exactly one DP rank (no drop_last, no padding samples, no duplicates); each DP rank runs
megatron-core's forward-only schedule over its rows at any TP/PP; the last pipeline stage sums
each sample's per-token loss over its loss targets, and rank 0 gathers the sums and checks that
every sample came back once.

SCORES.jsonl: one line per sample in source order, {"id": record id, "loss_sum": sum of the
per-token losses over its targets, "tokens": its loss targets}, then a summary line {"samples",
"tokens", "loss" (= sum of loss_sum / sum of tokens), and what the source left out}.
Samples the source left out are listed in SCORES' `<stem>.data_report.jsonl`.

Runs alone or under torchrun (`torchrun --nproc_per_node N -m mmtrain eval ...`).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Iterator, Optional

import numpy as np

def eval_plan(lengths, tiles, *, dp: int, packing: bool, seq_length: int, micro_batch_size: int = 1,
              algorithm: str = "default", max_tiles_per_pack: Optional[int] = None, pack_align: int = 1,
              segment_align: int = 1) -> list[list[list[list[int]]]]:
    """[dp rank][micro-batch][row] -> sample indices: every index in exactly one row of one rank.

    Rows are packs (packing) or single samples, each rank's rows in source order; ranks get rows
    longest first onto the least loaded rank, so every rank has a similar number of tokens."""
    lengths = np.asarray(lengths, dtype=np.int64)
    n = len(lengths)
    if packing and n:
        from mmtrain.packing.algorithms import pack_lengths

        rows = pack_lengths(lengths, seq_length, algorithm, tiles=np.asarray(tiles, dtype=np.int64),
                            max_tiles_per_pack=max_tiles_per_pack, segment_align=segment_align, pack_align=pack_align)
        rows = sorted((sorted(int(i) for i in r) for r in rows if len(r)), key=lambda r: r[0])
    else:
        rows = [[i] for i in range(n)]
    load = [0] * dp
    per_rank: list[list[list[int]]] = [[] for _ in range(dp)]
    for r in sorted(range(len(rows)), key=lambda k: -int(lengths[rows[k]].sum())):
        rank = min(range(dp), key=lambda q: (load[q], q))
        per_rank[rank].append(rows[r])
        load[rank] += int(lengths[rows[r]].sum())
    m = max(1, micro_batch_size)
    out = []
    for rank_rows in per_rank:
        rank_rows.sort(key=lambda r: r[0])
        out.append([rank_rows[i : i + m] for i in range(0, len(rank_rows), m)])
    return out


class Evaluator:
    """Per-sample teacher-forced losses of one source on this rank's share, for any model stage."""

    def __init__(self, cfg, layout, source, tokens_per_tile: int) -> None:
        from mmtrain.steps.from_config import vision_unit_cap

        p = cfg.packing
        self.cfg, self.layout, self.source, self.tokens_per_tile = cfg, layout, source, tokens_per_tile
        lengths = np.asarray(source.tiles, dtype=np.int64) * tokens_per_tile + np.asarray(source.text_tokens, dtype=np.int64)
        self.plan = eval_plan(lengths, source.tiles, dp=layout.dp, packing=p.enabled, seq_length=p.seq_length,
                              micro_batch_size=cfg.trainer.micro_batch_size, algorithm=p.algorithm,
                              max_tiles_per_pack=vision_unit_cap(cfg), pack_align=max(p.align, 1),
                              segment_align=max(p.segment_align, 1))
        v = cfg.model.vision
        self.image_shape = getattr(source, "image_shape", (v.in_channels, v.image_size, v.image_size))

    def _micro_batches(self) -> Iterator:
        from mmtrain.steps.batch import build_micro_batch, native_layout

        p = self.cfg.packing
        native = native_layout(self.cfg.model)
        first = self.layout.is_first_stage
        for rows in self.plan[self.layout.dp_rank]:
            samples = [[self.source.sample(i, first) for i in row] for row in rows]
            mb = build_micro_batch(samples, row_length=None, tokens_per_tile=self.tokens_per_tile, image_shape=self.image_shape,
                                   capacity=p.seq_length,
                                   pack_align=max(p.align, 1), segment_align=max(p.segment_align, 1), native=native)
            failed = getattr(self.source, "decode_failed", {})
            for sid, (a, b) in zip(mb.sample_ids, mb.sample_spans):
                if sid in failed:  # bad_sample_policy=skip: an image that did not decode is not scored
                    mb.loss_mask[a:b] = 0.0
            yield mb.to(self.layout.device)

    def run(self, model, dtype) -> list[tuple[int, float, int]]:
        """(sample index, loss sum, loss tokens) of the samples this rank scores: the last pipeline
        stage's TP rank 0 of each DP rank; empty elsewhere."""
        import torch
        from megatron.core.pipeline_parallel import get_forward_backward_func

        from mmtrain.train.step import packed_seq_params

        lay = self.layout
        mbs = self.plan[lay.dp_rank]
        if not mbs:
            return []
        first, last = lay.is_first_stage, lay.is_last_stage
        scored: list[tuple[int, float, int]] = []

        def forward_step(data_iterator, m):
            mb = next(data_iterator)
            out = m(mb.tokens, mb.position_ids, packed_seq_params(mb),
                    images=mb.images.to(dtype) if first else None,
                    image_token_index=mb.image_token_index if first else None,
                    labels=mb.labels if last else None,
                    image_grid_thw=mb.image_grid_thw if first else None,
                    mrope_position_ids=mb.mrope_position_ids)

            def loss_func(output):
                losses = output.float().reshape(-1)
                if lay.tp_rank == 0:
                    per_token = (losses.double() * mb.loss_mask.double()).cpu()
                    mask = mb.loss_mask.cpu()
                    for sid, (a, b) in zip(mb.sample_ids, mb.sample_spans):
                        scored.append((int(sid), float(per_token[a:b].sum()), int(mask[a:b].sum())))
                total = (losses * mb.loss_mask).sum()
                return total, mb.loss_mask.sum().to(torch.int), {}

            return out, loss_func

        with torch.no_grad():
            get_forward_backward_func()(
                forward_step_func=forward_step, data_iterator=self._micro_batches(), model=[model],
                num_microbatches=len(mbs), seq_length=self.cfg.packing.seq_length, micro_batch_size=1, forward_only=True,
            )
        return scored

    def gather(self, scored: list[tuple[int, float, int]]) -> Optional[list[tuple[int, float, int]]]:
        """On rank 0: every scored sample once, in source order (raises if one is missing or doubled)."""
        import torch.distributed as dist

        parts: list = [None] * dist.get_world_size()
        dist.all_gather_object(parts, scored)
        if self.layout.rank != 0:
            return None
        merged: dict[int, tuple[int, float, int]] = {}
        doubled = []
        for part in parts:
            for rec in part:
                if rec[0] in merged:
                    doubled.append(rec[0])
                merged[rec[0]] = rec
        failed = set(getattr(self.source, "decode_failed", {}))
        missing = [i for i in range(len(self.source)) if i not in merged and i not in failed]
        if doubled or missing:
            ids = getattr(self.source, "ids", None) or [str(i) for i in range(len(self.source))]
            raise RuntimeError(
                f"evaluation scored {len(doubled)} samples twice {[ids[i] for i in doubled[:5]]} and missed "
                f"{len(missing)} {[ids[i] for i in missing[:5]]}: every sample must be evaluated exactly once"
            )
        return [merged[i] for i in range(len(self.source)) if i in merged and i not in failed]

    def loss(self, model, dtype) -> tuple[float, int]:
        """(global loss sum, global loss tokens) over the whole source: every rank gets them."""
        import torch
        import torch.distributed as dist

        scored = self.run(model, dtype)
        t = torch.zeros(2, dtype=torch.float64, device=self.layout.device)
        t[0] = sum(s for _, s, _ in scored)
        t[1] = sum(n for _, _, n in scored)
        dist.all_reduce(t)
        return float(t[0]), int(t[1])


def validator(b) -> Optional[Evaluator]:
    """The training run's validation on data.validation_source (every trainer.eval_interval steps
    and after the last), or None without one."""
    cfg = b.cfg
    if not getattr(cfg.data, "validation_source", None):  # llava_json only
        if cfg.trainer.eval_interval > 0:
            raise ValueError("trainer.eval_interval needs data.validation_source=<held-out .json/.jsonl>")
        return None
    if cfg.data.name != "llava_json":
        raise ValueError("data.validation_source is read as LLaVA JSON: use data=llava_json")
    from mmtrain.data.sources.llava_train import LlavaJsonTrainSource

    src = LlavaJsonTrainSource(cfg, b.tokens_per_tile, source=cfg.data.validation_source,
                               image_root=cfg.data.validation_image_root)
    return Evaluator(cfg, b.layout, src, b.tokens_per_tile)


# ---- the command ---------------------------------------------------------------------------------


def _load_checkpoint(vlm, path, layout) -> int:
    """A training checkpoint's weights into this rank's shards; returns its step."""
    from mmtrain.models import params
    from mmtrain.train.export_hf import checkpoint_tensors, resolve_checkpoint

    ct = checkpoint_tensors(resolve_checkpoint(path))
    missing = []
    for rp in params.rank_params(vlm, layout.tp):
        if rp.name not in ct.names:
            missing.append(rp.name)
            continue
        full = ct.get(rp.name).to(rp.param.dtype)
        rp.param.data.copy_(params.shard(full, rp.spec, layout.tp_rank, layout.tp, vlm.padded_vocab_size))
    if missing:
        raise ValueError(f"--checkpoint {path}: no tensor for {', '.join(missing[:8])}: the model config does not match it")
    return ct.step


def checkpoint_model_config(path):
    from mmtrain.train.export_hf import checkpoint_tensors, resolve_checkpoint

    return checkpoint_tensors(resolve_checkpoint(path)).model


def evaluate(cfg, out: str, checkpoint: Optional[str] = None) -> Optional[dict]:
    """Score every sample of cfg.data; rank 0 writes `out` and returns the summary."""
    import torch

    from mmtrain.models.vlm import VLM, ParallelShape, tokens_per_tile
    from mmtrain.parallel import setup
    from mmtrain.steps.datamodule import build_source
    from mmtrain.train.build import build_model
    from mmtrain.train.runtime import dtype_of

    dtype_of(cfg.trainer.precision)  # a bad value fails before any process group exists
    lay = setup.initialize(cfg.parallel, cfg.trainer.device, cfg.trainer.seed, gpu_cluster=cfg.cluster.gpus_per_node > 0)
    try:
        dtype = dtype_of(cfg.trainer.precision, lay.device)  # auto: bf16 on CUDA, fp32 on the CPU, as training
        torch.manual_seed(cfg.trainer.seed)
        if checkpoint:
            vlm = VLM(cfg.model, ParallelShape(lay.tp, lay.pp), dtype, use_cpu_init=lay.device.type == "cpu",
                      backend=cfg.model.attention_backend)
            vlm.to(device=lay.device, dtype=dtype)
            _load_checkpoint(vlm, checkpoint, lay)
        else:
            vlm = build_model(cfg, lay, dtype)
        vlm.eval()
        tpt = tokens_per_tile(cfg.model)
        source = build_source(cfg, tpt)
        ev = Evaluator(cfg, lay, source, tpt)
        scored = ev.gather(ev.run(vlm, dtype))
        if scored is None:
            return None
        report = getattr(source, "report", None)
        out_path = Path(out)
        out_path.parent.mkdir(parents=True, exist_ok=True)
        loss_sum = math.fsum(s for _, s, _ in scored)
        tokens = sum(n for _, _, n in scored)
        summary = {"samples": len(scored), "tokens": tokens, "loss": loss_sum / tokens if tokens else float("nan")}
        if report is not None:
            summary.update(report.counts(), bad_samples=report.count("bad_image"))
            report.write(out_path.with_name(out_path.stem + ".data_report.jsonl"))
        ids = getattr(source, "ids", None) or [str(i) for i in range(len(source))]
        with open(out_path, "w") as f:
            for i, s, n in scored:
                f.write(json.dumps({"id": ids[i], "loss_sum": s, "tokens": n}) + "\n")
            f.write(json.dumps(summary) + "\n")
        return summary
    finally:
        setup.shutdown()


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(
        prog="mmtrain eval",
        description="Teacher-forced loss of every sample of cfg.data, each once, at any TP/PP/DP "
        "(alone or `torchrun ... -m mmtrain eval ...`). SCORES.jsonl: {id, loss_sum, tokens} per sample, "
        "then a summary line {samples, tokens, loss}.",
    )
    ap.add_argument("--out", required=True, help="SCORES.jsonl to write")
    ap.add_argument("--checkpoint", help="a training run directory or checkpoint: its weights and model config "
                    "(default: the model of the overrides, e.g. model=hf model.pretrained=DIR)")
    ap.add_argument("overrides", nargs="*", help="Hydra overrides, as for training (model=... data=... parallel=...)")
    args = ap.parse_args(argv)
    from mmtrain.config import compose

    cfg = compose(args.overrides)
    if args.checkpoint:
        import dataclasses

        cfg.model = dataclasses.replace(checkpoint_model_config(args.checkpoint), architecture="explicit")
    summary = evaluate(cfg, args.out, args.checkpoint)
    if summary is not None:
        print(json.dumps(summary))
    sys.stdout.flush()
    return 0
