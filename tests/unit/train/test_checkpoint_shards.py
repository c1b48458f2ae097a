"""How a rank's memory maps onto full tensors in a checkpoint (mmtrain/train/ckpt_shards.py): flat
ranges as contiguous boxes, TP shards (plain, SwiGLU [gate; up], padded vocab) and distributed-
optimizer ranges as pieces of the full tensor, and a DCP round trip from one layout to another."""

from __future__ import annotations

import math
import random

import pytest
import torch

from mmtrain.models import params
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata

from mmtrain.train import ckpt_shards as S

# DCP run here without a process group says it assumes one process: it is one.
pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")


def _flat_index(shape, idx):
    return S.flat_offset(shape, idx)


@pytest.mark.parametrize("shape", [(7,), (5, 3), (4, 3, 2), (2, 1, 3, 2)])
def test_flat_range_boxes_tile_the_range_in_order(shape):
    n = math.prod(shape)
    rng = random.Random(0)
    for _ in range(60):
        a = rng.randrange(0, n)
        b = rng.randrange(a, n + 1)
        seen = []
        for box in S.flat_range_boxes(shape, a, b):
            idx = [_flat_index(shape, i) for i in _box_indices(box)]
            assert idx == list(range(idx[0], idx[0] + len(idx))), f"{box} is not contiguous"
            seen += idx
        assert seen == list(range(a, b)), (shape, a, b)


def _box_indices(box):
    import itertools

    return list(itertools.product(*[range(o, o + s) for o, s in zip(box.offsets, box.sizes)]))


SPECS = {
    "replicated": ("vision.ln_pre.weight", (8,)),
    "column": ("language_model.decoder.layers.0.self_attention.linear_qkv.weight", (8, 6)),
    "row": ("language_model.decoder.layers.0.self_attention.linear_proj.weight", (6, 8)),
    "gated": ("language_model.decoder.layers.0.mlp.linear_fc1.weight", (8, 6)),
    "vocab": ("language_model.embedding.word_embeddings.weight", (11, 6)),
}


def _padded(kind: str, tp: int) -> int:
    """The 11-row vocab padded as megatron would for TP; at TP4, 16 rows: rank 3 holds only padding."""
    return {1: 12, 2: 12, 4: 16}[tp] if kind == "vocab" else 0


def _layout_entries(full: torch.Tensor, name: str, tp: int, dp: int, padded_vocab: int) -> list[list[S.Entry]]:
    """Per (tp, dp) rank: entries of its parameter shard, or of its distributed-optimizer range."""
    spec = params.shard_spec(name)
    out = []
    for r in range(tp):
        local = params.shard(full, spec, r, tp, padded_vocab).contiguous()
        pieces = S.shard_pieces(local.shape, spec, full.shape, r)
        n = local.numel()
        bounds = [n * d // dp for d in range(dp + 1)]
        for d in range(dp):
            flat = local.view(-1)[bounds[d] : bounds[d + 1]].clone()
            out.append(S.flat_entries("t", flat, bounds[d], pieces, local.shape, full.shape))
    return out


@pytest.mark.parametrize("kind", list(SPECS))
@pytest.mark.parametrize("tp,dp", [(1, 1), (2, 1), (1, 3), (2, 2), (4, 1)])
def test_entries_tile_the_full_tensor_exactly_once(kind, tp, dp):
    name, shape = SPECS[kind]
    full = torch.arange(math.prod(shape), dtype=torch.float32).view(shape) + 1
    padded = _padded(kind, tp)
    rebuilt = torch.zeros_like(full)
    count = torch.zeros_like(full)
    unique: dict = {}  # replicas (a TP-replicated tensor on every TP rank) are written once, as DCP does
    for entries in _layout_entries(full, name, tp, dp, padded):
        for e in entries:
            key = (e.offsets, tuple(e.tensor.shape))
            if key in unique:
                assert torch.equal(unique[key], e.tensor), "replicas of one chunk differ"
                continue
            unique[key] = e.tensor
            sl = tuple(slice(o, o + s) for o, s in zip(e.offsets, e.tensor.shape))
            rebuilt[sl] = e.tensor
            count[sl] += 1
    assert torch.equal(count, torch.ones_like(full)), f"{kind} TP{tp} DP{dp}: elements written {count.unique().tolist()} times"
    assert torch.equal(rebuilt, full)


def test_tiling_check_names_overlap_and_gaps():
    C = ChunkStorageMetadata
    ok = [C(torch.Size([0, 0]), torch.Size([2, 3])), C(torch.Size([2, 0]), torch.Size([2, 3]))]
    assert S.check_tiling("x", (4, 3), ok) is None
    assert "overlap" in S.check_tiling("x", (4, 3), ok + [C(torch.Size([1, 0]), torch.Size([1, 3]))])
    assert "cover 6 of 12" in S.check_tiling("x", (4, 3), ok[:1])


def test_dcp_round_trip_reshards_tp2_dp2_to_tp1_and_tp4(tmp_path):
    """Save as TP2 x DP2 (distributed-optimizer ranges, SwiGLU, padded vocab), load as TP1 and TP4."""
    from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
    from torch.distributed.checkpoint import load as dcp_load
    from torch.distributed.checkpoint import save as dcp_save

    g = torch.Generator().manual_seed(0)
    fulls = {k: torch.randn(shape, generator=g) for k, (_, shape) in SPECS.items()}
    saved: dict = {}
    for kind, (name, _) in SPECS.items():
        for entries in _layout_entries(fulls[kind], name, 2, 2, 12):
            for e in entries:
                saved[(kind, e.offsets)] = S.Entry(kind, e.global_shape, e.offsets, e.tensor)
    planner = S.EntrySavePlanner(list(saved.values()))
    dcp_save({}, storage_writer=FileSystemWriter(str(tmp_path)), planner=planner, no_dist=True)
    for tp in (1, 4):
        for kind, (name, shape) in SPECS.items():
            spec = params.shard_spec(name)
            padded = _padded(kind, tp)
            for r in range(tp):
                expect = params.shard(fulls[kind], spec, r, tp, padded).contiguous()
                local = torch.full_like(expect, float("nan"))
                pieces = S.shard_pieces(local.shape, spec, shape, r)
                entries = S.param_entries(kind, local, pieces, shape)
                dcp_load({}, storage_reader=FileSystemReader(str(tmp_path)), planner=S.EntryLoadPlanner(entries), no_dist=True)
                covered = torch.zeros(local.shape, dtype=torch.bool)
                for p in pieces:
                    covered[tuple(slice(o, o + s) for o, s in zip(p.local.offsets, p.local.sizes))] = True
                assert torch.equal(local[covered], expect[covered]), f"{kind} at TP{tp} rank {r}"
                assert torch.isnan(local[~covered]).all(), "vocab padding rows are not in the checkpoint"


def test_load_names_what_the_checkpoint_lacks():
    from torch.distributed.checkpoint.metadata import Metadata, TensorProperties, TensorStorageMetadata

    part = ChunkStorageMetadata(torch.Size([0, 1]), torch.Size([2, 2]))
    md = Metadata({"a": TensorStorageMetadata(TensorProperties(dtype=torch.float32), torch.Size([2, 3]), [part])})
    assert S.EntryLoadPlanner([S.Entry("b", (2, 3), (0, 0), torch.empty(2, 3))]).plan_reads(md) == ["b: not in the checkpoint"]
    assert S.EntryLoadPlanner([S.Entry("a", (3, 3), (0, 0), torch.empty(3, 3))]).plan_reads(md) == [
        "a: checkpoint has shape (2, 3), this model (3, 3)"]
    assert S.EntryLoadPlanner([S.Entry("a", (2, 3), (0, 0), torch.empty(2, 3))]).plan_reads(md) == [
        "a: the checkpoint covers 4 of the 6 elements at (0, 0)"]


def test_save_refuses_a_plan_that_does_not_tile(tmp_path):
    from torch.distributed.checkpoint import FileSystemWriter
    from torch.distributed.checkpoint import save as dcp_save

    half = S.Entry("a", (2, 3), (0, 0), torch.zeros(1, 3))
    with pytest.raises(S.LayoutError, match="a: chunks cover 3 of 6 elements"):
        S.dcp_call(dcp_save, {}, storage_writer=FileSystemWriter(str(tmp_path)), no_dist=True, planner=S.EntrySavePlanner([half]))
