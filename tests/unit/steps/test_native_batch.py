"""Native-resolution micro-batches (build_micro_batch with a NativeLayout): flattened patches and one
grid per image in sample order, each image's merged tokens where it stands, mRoPE positions of each
sample alone (restarting in a pack, padding included), image tokens checked against the grids (not
against tiles x tokens per tile), the grids only where the pixels are (the first pipeline stage)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mmtrain.models.mrope import mrope_position_ids
from mmtrain.steps.batch import BadBatchError, NativeLayout, Sample, build_micro_batch

M, DIM = 2, 3 * 2 * 14 * 14
NATIVE = NativeLayout(spatial_merge_size=M)


def _sample(sid, n_text, grids, at, pixels=True):
    grids = np.asarray(grids, np.int64).reshape(-1, 3)
    lens = grids.prod(axis=1) // (M * M)
    rows = int(grids.prod(axis=1).sum())
    px = np.random.default_rng(sid).standard_normal((rows, DIM)).astype(np.float32) if pixels else None
    return Sample(sample_id=sid, text=np.arange(10, 10 + n_text, dtype=np.int64), pixels=px, tiles=int(lens.sum()),
                  image_tokens=int(lens.sum()), image_at=np.asarray(at, np.int64), image_lengths=lens, image_grid=grids,
                  image_token_id=7)


def _samples(pixels=True):
    return [
        _sample(0, 5, [[1, 4, 6]], [2], pixels),  # 6 tokens after 2 words
        _sample(1, 4, np.zeros((0, 3)), [], pixels),  # text only
        _sample(2, 3, [[1, 2, 2], [1, 2, 4]], [1, 1], pixels),  # two touching images
    ]


def _alone(s: Sample) -> np.ndarray:
    seq, is_image, _ = s.stream()
    starts, k = [], 0
    for n in s.image_lengths.tolist():
        starts.append(int(np.flatnonzero(is_image)[k]))
        k += n
    return mrope_position_ids(len(seq), starts, s.image_grid, M)


@pytest.mark.parametrize("segment_align", [1, 4])
def test_pack_of_native_samples(segment_align):
    samples = _samples()
    mb = build_micro_batch([samples], row_length=None, tokens_per_tile=256, image_shape=(DIM,), capacity=200,
                           pack_align=8, segment_align=segment_align, native=NATIVE)
    assert torch.equal(mb.image_grid_thw, torch.tensor([[1, 4, 6], [1, 2, 2], [1, 2, 4]]))
    assert torch.equal(mb.images, torch.from_numpy(np.concatenate([s.pixels for s in samples if s.pixels.shape[0]])))
    assert tuple(mb.mrope_position_ids.shape) == (3, mb.num_tokens)
    for s, (a, b) in zip(samples, mb.sample_spans):
        seq, is_image, _ = s.stream()
        assert torch.equal(mb.tokens[a:b], torch.from_numpy(seq))
        assert torch.equal(mb.mrope_position_ids[:, a:b], torch.from_numpy(_alone(s))), f"sample {s.sample_id}"
        assert torch.equal(mb.tokens[a:b][torch.from_numpy(is_image)], torch.full((s.image_tokens,), 7))
    assert mb.image_token_index.tolist() == torch.nonzero(mb.tokens == 7).flatten().tolist()
    # image 0 is a 2 x 3 grid of merged tokens from position 2: rows then columns
    a = mb.sample_spans[0][0]
    assert mb.mrope_position_ids[:, a + 2 : a + 8].tolist() == [[2] * 6, [2, 2, 2, 3, 3, 3], [2, 3, 4, 2, 3, 4]]
    assert mb.mrope_position_ids[:, a + 8].tolist() == [5, 5, 5]  # text resumes at start + max(rows, cols)


def test_later_pipeline_stages_get_positions_without_pixels_or_grids():
    mb = build_micro_batch([_samples(pixels=False)], row_length=None, tokens_per_tile=256, image_shape=(DIM,),
                           capacity=200, native=NATIVE)
    full = build_micro_batch([_samples()], row_length=None, tokens_per_tile=256, image_shape=(DIM,), capacity=200, native=NATIVE)
    assert mb.image_grid_thw is None and mb.images.shape == (0, DIM)
    assert torch.equal(mb.mrope_position_ids, full.mrope_position_ids)


def test_unpacked_rows_padded_to_the_row_length():
    samples = _samples()
    mb = build_micro_batch([[s] for s in samples], row_length=64, tokens_per_tile=256, image_shape=(DIM,), capacity=64,
                           native=NATIVE)
    assert mb.num_tokens == 3 * 64 and tuple(mb.mrope_position_ids.shape) == (3, 192)
    for s, (a, b) in zip(samples, mb.sample_spans):
        assert torch.equal(mb.mrope_position_ids[:, a:b], torch.from_numpy(_alone(s)))


def test_image_tokens_must_match_the_grids_not_tiles():
    bad = _sample(5, 4, [[1, 4, 4]], [0])
    bad.image_lengths = np.array([5])  # the grid makes 4 merged tokens
    bad.image_tokens = bad.tiles = 5
    with pytest.raises(BadBatchError, match="sample 5: image tokens"):
        build_micro_batch([[bad]], row_length=None, tokens_per_tile=1, image_shape=(DIM,), capacity=100, native=NATIVE)
    short = _sample(6, 4, [[1, 4, 4]], [0])
    short.pixels = short.pixels[:-1]
    with pytest.raises(BadBatchError, match="sample 6: 15 patch rows"):
        build_micro_batch([[short]], row_length=None, tokens_per_tile=1, image_shape=(DIM,), capacity=100, native=NATIVE)
