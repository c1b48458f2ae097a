"""What one rank writes to and reads from a checkpoint: its pieces of the *full* tensors, by
layout-independent name, and the torch.distributed.checkpoint (DCP) planners that move them.

A checkpoint holds every tensor whole and unpadded under its global name (mmtrain.models.params):
`model/<name>` (the parameter), `optim/<name>/<state>` (Adam's exp_avg, exp_avg_sq, step, and the
fp32 main copy of a bf16 parameter), each stored as the chunks the saving ranks happened to hold.
A rank describes what it holds as `Entry`s, rectangles of full tensors backed by views of its own
memory. DCP reads any rectangle from whichever saved chunks overlap it, so a checkpoint written at
one TP / PP / DP (or optimizer sharding) loads at any other.

How a rank's memory maps onto a full tensor:
* TP: the shard is a block along megatron's partition dim, except that a SwiGLU fc1 shard
  [gate_r; up_r] is two blocks (rows of gate and of up) and vocabulary rows stop at the real vocab
  (TP padding rows are not stored).
* The distributed optimizer owns a contiguous *flat* range of each local shard; a flat range of a
  row-major tensor is a few boxes (a partial row, whole rows, a partial row), each contiguous.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex, TensorProperties, TensorStorageMetadata
from torch.distributed.checkpoint.planner import (
    LoadPlan,
    LoadPlanner,
    ReadItem,
    SavePlan,
    SavePlanner,
    TensorWriteData,
    WriteItem,
    WriteItemType,
)
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

from mmtrain.models import params

MODEL = "model/"
OPTIM = "optim/"


class MissingInCheckpoint(RuntimeError):
    """A tensor (or part of one) this model needs is not in the checkpoint."""


class LayoutError(RuntimeError):
    """A mapping of local memory onto full tensors that does not tile them (a bug, never data)."""


# ---- boxes -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Box:
    offsets: tuple[int, ...]
    sizes: tuple[int, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.sizes)


def intersect(a: Box, b: Box) -> Optional[Box]:
    lo = tuple(max(x, y) for x, y in zip(a.offsets, b.offsets))
    hi = tuple(min(x + s, y + t) for x, s, y, t in zip(a.offsets, a.sizes, b.offsets, b.sizes))
    if any(h <= l for l, h in zip(lo, hi)):
        return None
    return Box(lo, tuple(h - l for l, h in zip(lo, hi)))


def flat_range_boxes(shape: Sequence[int], start: int, stop: int) -> list[Box]:
    """The elements [start, stop) of a row-major tensor of `shape` as boxes, each contiguous in
    memory (all dims after its first non-unit dim are whole), in flat order."""
    shape = tuple(int(s) for s in shape)
    if stop <= start:
        return []
    if len(shape) == 0:
        return [Box((), ())]
    if len(shape) == 1:
        return [Box((start,), (stop - start,))]
    inner = math.prod(shape[1:])
    r0, r1 = start // inner, (stop - 1) // inner
    if r0 == r1:
        return [Box((r0, *b.offsets), (1, *b.sizes)) for b in flat_range_boxes(shape[1:], start - r0 * inner, stop - r0 * inner)]
    out: list[Box] = []
    first_full = r0
    if start % inner:
        out += [Box((r0, *b.offsets), (1, *b.sizes)) for b in flat_range_boxes(shape[1:], start % inner, inner)]
        first_full = r0 + 1
    end_full = r1 + 1 if stop % inner == 0 else r1
    if end_full > first_full:
        out.append(Box((first_full,) + (0,) * (len(shape) - 1), (end_full - first_full, *shape[1:])))
    if stop % inner:
        out += [Box((r1, *b.offsets), (1, *b.sizes)) for b in flat_range_boxes(shape[1:], 0, stop % inner)]
    return out


def flat_offset(shape: Sequence[int], index: Sequence[int]) -> int:
    off = 0
    for s, i in zip(shape, index):
        off = off * int(s) + int(i)
    return off


# ---- a parameter shard as pieces of its full tensor ---------------------------------------------


@dataclass(frozen=True)
class Piece:
    """A box of this rank's local shard and where it sits in the full tensor."""

    local: Box
    global_offsets: tuple[int, ...]


def shard_pieces(local_shape: Sequence[int], spec: params.ShardSpec, full_shape: Sequence[int], tp_rank: int) -> list[Piece]:
    """How TP rank `tp_rank`'s shard of shape `local_shape` tiles its part of the full tensor."""
    local_shape = tuple(int(s) for s in local_shape)
    full_shape = tuple(int(s) for s in full_shape)
    nd = len(local_shape)
    zeros = (0,) * nd
    whole = Box(zeros, local_shape)
    if spec.dim is None:
        return [Piece(whole, zeros)]
    if spec.gated:  # [gate_r; up_r] -> rows of [gate; up]
        half, full_half = local_shape[0] // 2, full_shape[0] // 2
        rest = local_shape[1:]
        return [
            Piece(Box(zeros, (half, *rest)), (tp_rank * half, *zeros[1:])),
            Piece(Box((half, *zeros[1:]), (half, *rest)), (full_half + tp_rank * half, *zeros[1:])),
        ]
    if spec.vocab:  # rows [r * local, (r + 1) * local) of the padded vocab, cut at the real vocab
        rows = local_shape[0]
        start = tp_rank * rows
        stop = min(start + rows, full_shape[0])
        if stop <= start:
            return []
        return [Piece(Box(zeros, (stop - start, *local_shape[1:])), (start, *zeros[1:]))]
    offs = list(zeros)
    offs[spec.dim] = tp_rank * local_shape[spec.dim]
    return [Piece(whole, tuple(offs))]


# ---- entries: rectangles of full tensors backed by this rank's memory ----------------------------


@dataclass
class Entry:
    fqn: str
    global_shape: tuple[int, ...]
    offsets: tuple[int, ...]
    tensor: torch.Tensor  # exactly the box's sizes; a view of the rank's memory (or a staged copy)

    @property
    def key(self) -> tuple[str, tuple[int, ...]]:
        return (self.fqn, self.offsets)

    def nbytes(self) -> int:
        return self.tensor.numel() * self.tensor.element_size()


def flat_entries(fqn: str, flat: torch.Tensor, start: int, pieces: list[Piece], local_shape: Sequence[int], global_shape: Sequence[int]) -> list[Entry]:
    """Entries for a 1-D tensor `flat` holding the elements [start, start + len) of a local shard
    (the whole shard when start = 0 and len = numel), split along the shard's pieces."""
    local_shape = tuple(int(s) for s in local_shape)
    global_shape = tuple(int(s) for s in global_shape)
    if flat.dim() != 1:
        raise LayoutError(f"{fqn}: expected a flat tensor, got shape {tuple(flat.shape)}")
    if len(local_shape) == 0:
        return [Entry(fqn, (), (), flat.view(()))] if flat.numel() else []
    out = []
    for box in flat_range_boxes(local_shape, start, start + flat.numel()):
        for piece in pieces:
            sub = intersect(box, piece.local)
            if sub is None:
                continue
            begin = flat_offset(local_shape, sub.offsets) - start
            # A sub-box of a contiguous box cut only along its first non-unit dim stays contiguous.
            view = flat[begin : begin + sub.numel].view(sub.sizes)
            if flat_offset(local_shape, [o + s - 1 for o, s in zip(sub.offsets, sub.sizes)]) - start != begin + sub.numel - 1:
                raise LayoutError(f"{fqn}: box {sub} of a flat range is not contiguous")
            goffs = tuple(g + (o - p) for g, o, p in zip(piece.global_offsets, sub.offsets, piece.local.offsets))
            out.append(Entry(fqn, global_shape, goffs, view))
    return out


def param_entries(fqn: str, t: torch.Tensor, pieces: list[Piece], global_shape: Sequence[int]) -> list[Entry]:
    """Entries of a whole local shard `t` (a parameter, or an optimizer state shaped like it)."""
    if not t.is_contiguous():
        raise LayoutError(f"{fqn}: local tensor is not contiguous")
    return flat_entries(fqn, t.detach().view(-1), 0, pieces, t.shape, global_shape)


def check_tiling(fqn: str, global_shape: Sequence[int], chunks: Sequence[ChunkStorageMetadata]) -> Optional[str]:
    """None if the chunks tile the full tensor exactly (in bounds, no overlap, all covered)."""
    global_shape = tuple(int(s) for s in global_shape)
    if len(global_shape) == 0:
        return None if chunks else f"{fqn}: no chunk"
    boxes = [Box(tuple(c.offsets), tuple(c.sizes)) for c in chunks]
    for b in boxes:
        if any(o < 0 or o + s > g for o, s, g in zip(b.offsets, b.sizes, global_shape)):
            return f"{fqn}: chunk {b} outside {global_shape}"
    boxes.sort(key=lambda b: b.offsets)
    for i, a in enumerate(boxes):
        for b in boxes[i + 1 :]:
            if b.offsets[0] >= a.offsets[0] + a.sizes[0]:
                break
            if intersect(a, b) is not None:
                return f"{fqn}: chunks {a} and {b} overlap"
    covered = sum(b.numel for b in boxes)
    if covered != math.prod(global_shape):
        return f"{fqn}: chunks cover {covered} of {math.prod(global_shape)} elements"
    return None


# ---- DCP planners ------------------------------------------------------------------------------


def dcp_call(fn, *args, **kwargs):
    """Run a DCP save/load; its CheckpointException (a BaseException carrying every rank's error)
    becomes the first rank's own error type when it is ours, else a RuntimeError naming it."""
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        return fn(*args, **kwargs)
    except CheckpointException as e:
        rank, (exc, _) = sorted(e.failures.items())[0]
        if isinstance(exc, (LayoutError, MissingInCheckpoint)):
            raise type(exc)(str(exc)) from None
        raise RuntimeError(f"checkpoint I/O failed on rank {rank} ({len(e.failures)} rank(s) failed): {type(exc).__name__}: {exc}") from None



class EntrySavePlanner(SavePlanner):
    """Writes exactly the given entries. Entries that several ranks hold (replicas over DP, or a
    tied embedding on two stages) are written once, by the rank with the least to write so far;
    the coordinator refuses a plan whose chunks do not tile every tensor."""

    def __init__(self, entries: list[Entry], on_write: Optional[Callable[[int, int], None]] = None) -> None:
        self.entries = {e.key: e for e in entries}
        if len(self.entries) != len(entries):
            raise LayoutError("two entries of this rank have the same tensor and offsets")
        self.on_write = on_write
        self.written = 0

    def set_up_planner(self, state_dict, storage_meta=None, is_coordinator: bool = False) -> None:  # noqa: ARG002
        self.is_coordinator = is_coordinator

    def create_local_plan(self) -> SavePlan:
        items = []
        for e in self.entries.values():
            items.append(
                WriteItem(
                    index=MetadataIndex(e.fqn, e.offsets),
                    type=WriteItemType.SHARD,
                    tensor_data=TensorWriteData(
                        chunk=ChunkStorageMetadata(offsets=torch.Size(e.offsets), sizes=torch.Size(e.tensor.shape)),
                        properties=TensorProperties.create_from_tensor(e.tensor),
                        size=torch.Size(e.global_shape),
                    ),
                )
            )
        self.plan = SavePlan(items)
        return self.plan

    def create_global_plan(self, all_plans: list[SavePlan]):
        from torch.distributed.checkpoint._dedup_save_plans import dedup_save_plans
        from torch.distributed.checkpoint.default_planner import create_default_global_save_plan

        plans, metadata = create_default_global_save_plan(dedup_save_plans(all_plans))
        for fqn, md in metadata.state_dict_metadata.items():
            err = check_tiling(fqn, md.size, md.chunks) if isinstance(md, TensorStorageMetadata) else None
            if err:
                raise LayoutError(f"checkpoint plan does not tile a tensor: {err}")
        return plans, metadata

    def finish_plan(self, new_plan: SavePlan) -> SavePlan:
        self.plan = new_plan
        return new_plan

    def resolve_data(self, write_item: WriteItem) -> torch.Tensor:
        e = self.entries[(write_item.index.fqn, tuple(write_item.index.offset))]
        if self.on_write is not None:
            self.on_write(self.written, len(self.plan.items))
        self.written += 1
        return e.tensor

    def planned_bytes(self) -> int:
        return sum(self.entries[(i.index.fqn, tuple(i.index.offset))].nbytes() for i in self.plan.items)


class EntryLoadPlanner(LoadPlanner):
    """Fills exactly the given entries from whichever saved chunks overlap them; a rectangle the
    checkpoint does not cover completely is an error naming the tensor."""

    def __init__(self, entries: list[Entry]) -> None:
        self.entries = {e.key: e for e in entries}

    def set_up_planner(self, state_dict, metadata=None, is_coordinator: bool = False) -> None:  # noqa: ARG002
        self.metadata = metadata

    def plan_reads(self, metadata) -> list[str]:
        """Work out the reads against a checkpoint's DCP metadata; what it lacks, as messages."""
        by_fqn: dict[str, list[Entry]] = {}
        for e in self.entries.values():
            by_fqn.setdefault(e.fqn, []).append(e)
        stored = metadata.state_dict_metadata
        self.reads: list[ReadItem] = []
        problems = []
        for fqn, es in sorted(by_fqn.items()):
            md = stored.get(fqn)
            if not isinstance(md, TensorStorageMetadata):
                problems.append(f"{fqn}: not in the checkpoint")
                continue
            if tuple(md.size) != es[0].global_shape:
                problems.append(f"{fqn}: checkpoint has shape {tuple(md.size)}, this model {es[0].global_shape}")
                continue
            chunks = [ChunkStorageMetadata(offsets=torch.Size(e.offsets), sizes=torch.Size(e.tensor.shape)) for e in es]
            items = create_read_items_for_chunk_list(fqn, md, chunks)
            got = [0] * len(es)
            for it in items:
                got[it.dest_index.index] += math.prod(it.lengths)
            for e, n in zip(es, got):
                if n != e.tensor.numel():
                    problems.append(f"{fqn}: the checkpoint covers {n} of the {e.tensor.numel()} elements at {e.offsets}")
            self.reads += items
        return problems

    def create_local_plan(self) -> LoadPlan:
        problems = self.plan_reads(self.metadata)
        if problems:
            raise MissingInCheckpoint("checkpoint does not hold what this model needs:\n  - " + "\n  - ".join(problems[:20]))
        return LoadPlan(self.reads)

    def create_global_plan(self, global_plan: list[LoadPlan]) -> list[LoadPlan]:
        return global_plan

    def finish_plan(self, central_plan: LoadPlan) -> LoadPlan:
        return central_plan

    def load_bytes(self, read_item: ReadItem, value) -> None:  # noqa: ARG002
        raise RuntimeError(f"unexpected non-tensor item {read_item.dest_index.fqn} in a checkpoint")

    def resolve_tensor(self, read_item: ReadItem) -> torch.Tensor:
        e = self.entries[(read_item.dest_index.fqn, tuple(read_item.dest_index.offset))]
        t = e.tensor
        for dim, (off, n) in enumerate(zip(read_item.dest_offsets, read_item.lengths)):
            t = t.narrow(dim, off, n)
        return t

    def commit_tensor(self, read_item: ReadItem, tensor: torch.Tensor) -> None:
        pass

