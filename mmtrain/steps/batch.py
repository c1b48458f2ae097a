"""The packed micro-batch contract, and how samples become one.

A micro-batch is a single thd token stream (megatron's packed format, batch dim 1) made of *rows*:
a row is a pack of whole samples (packing on) or one sample (packing off), padded to its row length.

Fields (T = total tokens in the micro-batch, padding included):
  tokens        int64 [T]   decoder input ids; each image's tokens stand where its placeholder stood
                            in the text (holding the sample's image token id), padding PAD_ID
  labels        int64 [T]   next-token targets (tokens shifted left inside each sample)
  loss_mask     fp32  [T]   loss_mask[t] = 1 iff token t+1 of the same sample is one of the sample's
                            loss targets (e.g. an assistant token): never an image token, never
                            past the sample's end, never padding
  position_ids  int64 [T]   restart at 0 for every sample (and every padding segment)
  cu_seqlens    int32 [S+1] segment boundaries: one segment per sample *after* image-token expansion,
                            plus one per padding run, so cu_seqlens[-1] == T and rope/attention
                            never cross samples
  cu_seqlens_padded int32 [S+1] | None  the same with each sample segment padded to `segment_align`
                            (TP/SP/CP/FP8 divisibility); None when segment_align == 1
  max_seqlen    int         longest segment (sizes rope tables and flash-attn tiling)
  images        fp32  [N, C, H, W]   all tiles of the micro-batch, in sample order
  image_token_index int64 [N * P]    where the N*P image embeddings go in the stream (tile order)
  sample_ids    list[int]   the samples in this micro-batch, in stream order
  sample_spans  list[(start, end)]  where each sample sits in the stream
Native-resolution models (model.vision.type=native, Qwen2-VL; `native=NativeLayout(m)`), optional:
  images        fp32  [P, C*T*p*p]   the flattened patches of all images, in sample order
  image_grid_thw int64 [N, 3]  (t, h, w) patches of each image (with the pixels: first PP stage);
                            stays on the host (the ViT plans its segments and windows from it
                            without a device sync)
  image_token_index int64 [P / m^2]  where the merged image tokens go, image by image
  mrope_position_ids int64 [3, T]  mRoPE positions (mmtrain.models.mrope.mrope_position_ids per
                            sample, restarting for every sample); needed on every pipeline stage
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np
import torch

from mmtrain.data.synthetic import IMAGE_TOKEN_ID, PAD_ID


class BadBatchError(ValueError):
    """A sample or micro-batch violates the contract; the message names the sample."""


@dataclass
class Sample:
    """One sample: its text tokens, where its images' tokens go among them, and its loss targets."""

    sample_id: int
    text: np.ndarray  # int64 [text_tokens]: the token ids without the image tokens
    pixels: Optional[np.ndarray]  # float32 [tiles, C, H, W] or None when not needed (non-first PP stage)
    tiles: int
    image_tokens: int  # after expansion; must equal tiles * tokens_per_tile
    # image k's tokens stand before text[image_at[k]] (non-decreasing; len(text) = after the text).
    # None: all image tokens lead the sample (one run).
    image_at: Optional[np.ndarray] = None
    image_lengths: Optional[np.ndarray] = None  # tokens of each image (sums to image_tokens), with image_at
    targets: Optional[np.ndarray] = None  # bool [text_tokens]: the loss targets; None = every text token
    image_token_id: int = IMAGE_TOKEN_ID  # the id image positions hold (their embedding is replaced)
    # Native resolution: int64 [images, 3] (t, h, w) patches of each image; pixels are then the
    # flattened patches [sum of t*h*w, C*T*p*p], each image's tokens t*h*w / m^2 (image_lengths),
    # and `tiles` counts merged tokens (the unit packing counts; see mmtrain.models.config.vit_unit_length).
    image_grid: Optional[np.ndarray] = None

    @property
    def length(self) -> int:
        return self.image_tokens + len(self.text)

    def stream(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(token ids, is-image, is-target) of the sample with its image tokens in place."""
        n = len(self.text)
        targets = np.ones(n, dtype=bool) if self.targets is None else np.asarray(self.targets, dtype=bool)
        if len(targets) != n:
            raise BadBatchError(f"sample {self.sample_id}: {len(targets)} loss targets for {n} text tokens")
        if self.image_at is None:
            at, lens = np.zeros(1, np.int64), np.asarray([self.image_tokens], np.int64)
        else:
            at, lens = np.asarray(self.image_at, np.int64), np.asarray(self.image_lengths, np.int64)
            if len(at) != len(lens) or int(lens.sum()) != self.image_tokens or (len(at) and (at.min() < 0 or at.max() > n)):
                raise BadBatchError(
                    f"sample {self.sample_id}: image positions {at.tolist()} / lengths {lens.tolist()} do not fit "
                    f"{n} text tokens and {self.image_tokens} image tokens"
                )
            if len(at) > 1 and bool((np.diff(at) < 0).any()):
                raise BadBatchError(f"sample {self.sample_id}: image positions {at.tolist()} are not in order")
        where = np.repeat(at, lens)
        seq = np.insert(np.asarray(self.text, np.int64), where, self.image_token_id)
        is_image = np.insert(np.zeros(n, dtype=bool), where, True)
        is_target = np.insert(targets, where, False)
        return seq, is_image, is_target


@dataclass
class PackedMicroBatch:
    tokens: torch.Tensor
    labels: torch.Tensor
    loss_mask: torch.Tensor
    position_ids: torch.Tensor
    cu_seqlens: torch.Tensor
    max_seqlen: int
    images: torch.Tensor
    image_token_index: torch.Tensor
    sample_ids: list[int]
    cu_seqlens_padded: Optional[torch.Tensor] = None
    num_real_tokens: int = 0
    sample_spans: list[tuple[int, int]] = field(default_factory=list)  # [start, end) of each sample in T
    image_grid_thw: Optional[torch.Tensor] = None  # native resolution: [N, 3], host
    mrope_position_ids: Optional[torch.Tensor] = None  # mRoPE: [3, T]

    @property
    def num_tokens(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def num_loss_tokens(self) -> int:
        return int(self.loss_mask.sum().item())

    def to(self, device: torch.device) -> "PackedMicroBatch":
        for name in ("tokens", "labels", "loss_mask", "position_ids", "cu_seqlens", "images", "image_token_index"):
            setattr(self, name, getattr(self, name).to(device, non_blocking=True))
        if self.cu_seqlens_padded is not None:
            self.cu_seqlens_padded = self.cu_seqlens_padded.to(device, non_blocking=True)
        if self.mrope_position_ids is not None:
            self.mrope_position_ids = self.mrope_position_ids.to(device, non_blocking=True)
        return self


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


@dataclass(frozen=True)
class NativeLayout:
    """How native-resolution images enter a micro-batch (Qwen2-VL): m x m patches per token, and
    whether the decoder takes mRoPE positions."""

    spatial_merge_size: int
    mrope: bool = True


def native_layout(model_cfg) -> Optional[NativeLayout]:
    """The NativeLayout of a model config (mmtrain.models.config.ModelConfig), None for tile models."""
    if model_cfg.vision.type != "native":
        return None
    return NativeLayout(model_cfg.vision.spatial_merge_size, mrope=model_cfg.decoder.mrope_section is not None)


def _check_native(s: Sample, merge: int) -> np.ndarray:
    """The sample's grids [images, 3]; raises naming the sample when its image tokens or patches disagree."""
    grid = np.zeros((0, 3), np.int64) if s.image_grid is None else np.asarray(s.image_grid, np.int64).reshape(-1, 3)
    lens = np.asarray(s.image_lengths if s.image_lengths is not None else [s.image_tokens] if s.image_tokens else [], np.int64)
    if len(grid) != len(lens) or bool(((grid[:, 1:] % merge) != 0).any()):
        raise BadBatchError(f"sample {s.sample_id}: {len(grid)} image grids {grid.tolist()} for {len(lens)} images "
                            f"(each h and w a multiple of spatial_merge_size={merge})")
    want = grid.prod(axis=1) // (merge * merge)
    if not np.array_equal(want, lens):
        raise BadBatchError(
            f"sample {s.sample_id}: image tokens {lens.tolist()} do not match its grids {grid.tolist()} "
            f"(t*h*w / {merge}^2 = {want.tolist()} each)"
        )
    if s.pixels is not None and s.pixels.shape[0] != int(grid.prod(axis=1).sum()):
        raise BadBatchError(f"sample {s.sample_id}: {s.pixels.shape[0]} patch rows for grids {grid.tolist()}")
    return grid


def _sample_mrope(s: Sample, seq_len: int, is_image: np.ndarray, grid: np.ndarray, merge: int) -> np.ndarray:
    """[3, seq_len] mRoPE positions of one sample alone (mmtrain.models.mrope.mrope_position_ids)."""
    from mmtrain.models.mrope import mrope_position_ids

    image_starts: list[int] = []
    if len(grid):
        lens = grid.prod(axis=1) // (merge * merge)
        # the image tokens in order, image after image (two images may touch): where each begins
        image_starts = np.flatnonzero(is_image)[np.cumsum(np.r_[0, lens[:-1]])].tolist()
    return mrope_position_ids(seq_len, image_starts, grid, merge)


def build_micro_batch(
    rows: Sequence[Sequence[Sample]],
    *,
    row_length: Optional[int],
    tokens_per_tile: int,
    image_shape: tuple[int, ...],
    capacity: int,
    pack_align: int = 1,
    segment_align: int = 1,
    native: Optional[NativeLayout] = None,
) -> PackedMicroBatch:
    """Lay out rows of samples as one thd stream.

    row_length: pad every row to exactly this many tokens (the padded baseline uses capacity);
    None pads each row only up to a multiple of `pack_align`.
    capacity: the largest row a sample set may occupy (packing.seq_length); exceeding it is an error
    naming the samples, never a silent truncation.
    segment_align: pad every sample segment to a multiple of this (CP/FP8 divisibility). Then
    `cu_seqlens_padded` holds the stream boundaries and `cu_seqlens` the cumulative real lengths
    (TE's thd convention); kernels and rope use the padded one, and since the padding sits after the
    real tokens of a causal segment, real tokens see exactly what they would see unpadded.
    """
    tokens, labels, mask, pos, bounds, img_idx, pixels, ids, spans = [], [], [], [], [0], [], [], [], []
    real_bounds = [0]
    grids, mpos = [], []
    offset = 0
    max_seg = 0
    for row in rows:
        used = 0
        for s in row:
            if native is not None:
                grid = _check_native(s, native.spatial_merge_size)
                grids.append(grid)
            else:
                if s.image_tokens != s.tiles * tokens_per_tile:
                    raise BadBatchError(
                        f"sample {s.sample_id}: {s.image_tokens} image tokens do not match {s.tiles} tiles x "
                        f"{tokens_per_tile} tokens per tile (check model.vision.image_size / patch_size)"
                    )
                if s.pixels is not None and s.pixels.shape[0] != s.tiles:
                    raise BadBatchError(f"sample {s.sample_id}: {s.pixels.shape[0]} tile images for {s.tiles} tiles")
            n = s.length
            if n > capacity:
                raise BadBatchError(
                    f"sample {s.sample_id} has {n} tokens ({s.image_tokens} image + {len(s.text)} text), more than "
                    f"packing.seq_length={capacity}; raise packing.seq_length or set packing.oversize_policy=drop|truncate"
                )
            if len(s.text) < 1:
                raise BadBatchError(f"sample {s.sample_id} has no text tokens")
            seq, is_image, is_target = s.stream()
            lab = np.append(seq[1:], PAD_ID)
            m = np.append(is_target[1:], False).astype(np.float32)  # position t predicts token t+1
            tokens.append(seq), labels.append(lab), mask.append(m), pos.append(np.arange(n))
            if native is not None and native.mrope:
                mpos.append(_sample_mrope(s, n, is_image, grid, native.spatial_merge_size))
            img_idx.append(offset + used + np.flatnonzero(is_image))
            if s.pixels is not None:
                pixels.append(s.pixels)
            ids.append(s.sample_id)
            spans.append((offset + used, offset + used + n))
            seg = _round_up(n, segment_align)
            if seg > n:  # per-segment alignment padding, inside the sample's (padded) segment
                tokens.append(np.full(seg - n, PAD_ID, np.int64)), labels.append(np.full(seg - n, PAD_ID, np.int64))
                mask.append(np.zeros(seg - n, np.float32)), pos.append(np.arange(n, seg))
                if mpos and native is not None and native.mrope:  # after the sample's last position
                    mpos.append(np.broadcast_to(int(mpos[-1].max(initial=-1)) + 1 + np.arange(seg - n), (3, seg - n)))
            used += seg
            bounds.append(offset + used)
            real_bounds.append(real_bounds[-1] + n)
            max_seg = max(max_seg, seg)
        if used > capacity:
            raise BadBatchError(
                f"row with samples {[s.sample_id for s in row]} holds {used} tokens > packing.seq_length={capacity}"
            )
        target = row_length if row_length is not None else _round_up(max(used, 1), pack_align)
        if target < used:
            raise BadBatchError(f"row of {used} tokens cannot be padded to {target}")
        pad = target - used
        if pad:
            tokens.append(np.full(pad, PAD_ID, np.int64)), labels.append(np.full(pad, PAD_ID, np.int64))
            mask.append(np.zeros(pad, np.float32)), pos.append(np.arange(pad))
            if native is not None and native.mrope:
                mpos.append(np.broadcast_to(np.arange(pad), (3, pad)))
            bounds.append(offset + target)
            real_bounds.append(real_bounds[-1] + pad)
            max_seg = max(max_seg, pad)
        offset += target
    images = np.concatenate(pixels) if pixels else np.zeros((0, *image_shape), np.float32)
    aligned = segment_align > 1
    mb = PackedMicroBatch(
        tokens=torch.from_numpy(np.concatenate(tokens)),
        labels=torch.from_numpy(np.concatenate(labels)),
        loss_mask=torch.from_numpy(np.concatenate(mask)),
        position_ids=torch.from_numpy(np.concatenate(pos)),
        cu_seqlens=torch.tensor(real_bounds if aligned else bounds, dtype=torch.int32),
        cu_seqlens_padded=torch.tensor(bounds, dtype=torch.int32) if aligned else None,
        max_seqlen=int(max_seg),
        images=torch.from_numpy(images),
        image_token_index=torch.from_numpy(np.concatenate(img_idx) if img_idx else np.zeros(0, np.int64)),
        sample_ids=ids,
        num_real_tokens=sum(s.length for row in rows for s in row),
        sample_spans=spans,
    )
    if native is not None:
        # the grids travel with the pixels (the first pipeline stage's ViT input)
        if all(s.pixels is not None for row in rows for s in row if s.image_tokens):
            mb.image_grid_thw = torch.from_numpy(np.concatenate(grids) if grids else np.zeros((0, 3), np.int64))
        if native.mrope:
            mb.mrope_position_ids = torch.from_numpy(np.ascontiguousarray(np.concatenate(mpos, axis=1)) if mpos
                                                     else np.zeros((3, 0), np.int64))
    validate(mb)
    return mb


def validate(mb: PackedMicroBatch) -> None:
    """Check the invariants the attention kernels and rope rely on; raise naming the samples."""
    where = f"micro-batch with samples {mb.sample_ids[:8]}{'...' if len(mb.sample_ids) > 8 else ''}"
    if mb.cu_seqlens_padded is not None:
        real, padded = mb.cu_seqlens, mb.cu_seqlens_padded
        if real.shape != padded.shape or bool(((real[1:] - real[:-1]) > (padded[1:] - padded[:-1])).any()):
            raise BadBatchError(f"{where}: cu_seqlens (real lengths) exceed cu_seqlens_padded segments")
    cu = mb.cu_seqlens if mb.cu_seqlens_padded is None else mb.cu_seqlens_padded
    if cu.dtype != torch.int32 or cu.dim() != 1 or cu.numel() < 2:
        raise BadBatchError(f"{where}: cu_seqlens must be a 1-D int32 tensor with >= 2 entries")
    if int(cu[0]) != 0 or int(cu[-1]) != mb.num_tokens:
        raise BadBatchError(f"{where}: cu_seqlens must start at 0 and end at {mb.num_tokens}, got {int(cu[0])}..{int(cu[-1])}")
    seg = cu[1:] - cu[:-1]
    if bool((seg <= 0).any()):
        raise BadBatchError(f"{where}: cu_seqlens is not strictly increasing")
    if int(seg.max()) != mb.max_seqlen:
        raise BadBatchError(f"{where}: max_seqlen {mb.max_seqlen} != longest segment {int(seg.max())}")
    if mb.image_token_index.numel() and int(mb.image_token_index.max()) >= mb.num_tokens:
        raise BadBatchError(f"{where}: image token index out of range")
    if mb.mrope_position_ids is not None and tuple(mb.mrope_position_ids.shape) != (3, mb.num_tokens):
        raise BadBatchError(f"{where}: mrope_position_ids has shape {tuple(mb.mrope_position_ids.shape)}, expected (3, {mb.num_tokens})")
    if mb.image_grid_thw is not None:
        g = mb.image_grid_thw
        if g.dim() != 2 or g.shape[1] != 3:
            raise BadBatchError(f"{where}: image_grid_thw must be [images, 3], got {tuple(g.shape)}")
        if int(g.prod(-1).sum()) != mb.images.shape[0]:
            raise BadBatchError(f"{where}: image_grid_thw counts {int(g.prod(-1).sum())} patches, images holds {mb.images.shape[0]}")
