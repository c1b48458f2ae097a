"""The packed micro-batch contract: layout, and clear errors on bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mmtrain.data.synthetic import IMAGE_TOKEN_ID, PAD_ID
from mmtrain.steps.batch import BadBatchError, Sample, build_micro_batch, validate

P = 4  # tokens per tile
SHAPE = (3, 8, 8)


def sample(sid, tiles, text, pixels=True):
    return Sample(
        sample_id=sid,
        text=np.arange(10, 10 + text, dtype=np.int64),
        pixels=np.zeros((tiles, *SHAPE), np.float32) if pixels else None,
        tiles=tiles,
        image_tokens=tiles * P,
    )


def build(rows, row_length=None, capacity=64, align=1):
    return build_micro_batch(rows, row_length=row_length, tokens_per_tile=P, image_shape=SHAPE, capacity=capacity, pack_align=align)


def test_layout_of_a_pack_and_a_padded_row():
    mb = build([[sample(7, 2, 3), sample(9, 1, 1)], [sample(4, 1, 2)]], row_length=None, align=8)
    # row 0: 11 + 5 = 16 tokens (multiple of 8), row 1: 6 tokens + 2 padding
    assert mb.cu_seqlens.tolist() == [0, 11, 16, 22, 24]
    assert mb.cu_seqlens.dtype == torch.int32
    assert mb.max_seqlen == 11
    assert mb.sample_ids == [7, 9, 4]
    assert mb.sample_spans == [(0, 11), (11, 16), (16, 22)]
    assert mb.position_ids.tolist() == list(range(11)) + list(range(5)) + list(range(6)) + [0, 1]
    assert mb.tokens[:8].tolist() == [IMAGE_TOKEN_ID] * 8 and mb.tokens[8:11].tolist() == [10, 11, 12]
    assert mb.tokens[22:].tolist() == [PAD_ID, PAD_ID]
    # loss on every text token, predicted from the token before it; never across samples or on padding
    assert mb.loss_mask[:11].tolist() == [0] * 7 + [1, 1, 1, 0]
    assert mb.labels[7:10].tolist() == [10, 11, 12]
    assert mb.loss_mask[22:].sum() == 0
    assert mb.image_token_index.tolist() == list(range(8)) + list(range(11, 15)) + list(range(16, 20))
    assert mb.images.shape == (4, *SHAPE)
    assert mb.num_loss_tokens == 3 + 1 + 2


def test_sample_longer_than_the_sequence_is_an_error_naming_it():
    with pytest.raises(BadBatchError, match=r"sample 5 .*seq_length=16"):
        build([[sample(5, 4, 8)]], capacity=16)


def test_pack_over_capacity_is_an_error_naming_its_samples():
    with pytest.raises(BadBatchError, match=r"\[1, 2\]"):
        build([[sample(1, 2, 4), sample(2, 2, 4)]], capacity=20)


def test_image_tokens_that_do_not_match_tiles_are_an_error():
    bad = sample(3, 2, 4)
    bad.image_tokens = 7
    with pytest.raises(BadBatchError, match="sample 3: 7 image tokens do not match 2 tiles"):
        build([[bad]])


def test_inconsistent_cu_seqlens_are_rejected():
    mb = build([[sample(1, 1, 3), sample(2, 1, 3)]])
    mb.cu_seqlens = torch.tensor([0, 9, 7, 14], dtype=torch.int32)
    with pytest.raises(BadBatchError, match="strictly increasing"):
        validate(mb)
    mb.cu_seqlens = torch.tensor([0, 7, 13], dtype=torch.int32)
    with pytest.raises(BadBatchError, match="end at 14"):
        validate(mb)
    mb.cu_seqlens = torch.tensor([0, 7, 14], dtype=torch.int64)
    with pytest.raises(BadBatchError, match="int32"):
        validate(mb)


def test_cpu_compat_patched_symbols_still_exist():
    import importlib

    from mmtrain.parallel.cpu_compat import PATCHED_SYMBOLS

    for module, attr in PATCHED_SYMBOLS:
        assert hasattr(importlib.import_module(module), attr), f"megatron-core changed: {module}.{attr} is gone"


def test_segment_alignment_gives_a_padded_cu_seqlens():
    mb = build_micro_batch(
        [[sample(1, 1, 3), sample(2, 1, 2)]], row_length=None, tokens_per_tile=P, image_shape=SHAPE, capacity=64,
        pack_align=16, segment_align=4,
    )
    # sample 1: 7 real tokens -> 8; sample 2: 6 -> 8; row padded 16 -> 16 (no extra padding segment)
    assert mb.cu_seqlens_padded.tolist() == [0, 8, 16]
    assert mb.cu_seqlens.tolist() == [0, 7, 13]
    assert mb.sample_spans == [(0, 7), (8, 14)]
    assert mb.loss_mask[7] == 0 and mb.loss_mask[14:].sum() == 0
    assert mb.max_seqlen == 8


def test_images_stand_where_their_placeholders_stood_and_only_targets_are_predicted():
    """Text 10..15 with image A (1 tile) before text[2] and image B (2 tiles) after the text;
    targets are text[3:5] (an answer): the loss is where the token before a target is."""
    s = Sample(sample_id=3, text=np.arange(10, 16, dtype=np.int64), pixels=np.zeros((3, *SHAPE), np.float32), tiles=3,
               image_tokens=3 * P, image_at=np.array([2, 6]), image_lengths=np.array([P, 2 * P]),
               targets=np.array([0, 0, 0, 1, 1, 0], bool), image_token_id=99)
    mb = build([[s]])
    t = mb.tokens.tolist()
    assert t == [10, 11] + [99] * P + [12, 13, 14, 15] + [99] * (2 * P)
    assert mb.image_token_index.tolist() == list(range(2, 2 + P)) + list(range(2 + P + 4, 18))
    m = mb.loss_mask.numpy().astype(bool)
    assert mb.labels.numpy()[m].tolist() == [13, 14]  # the answer, nothing else
    assert np.flatnonzero(m).tolist() == [2 + P, 3 + P]
    assert not np.isin(mb.image_token_index.numpy(), np.flatnonzero(m) + 1).any()  # no image token is a target


def test_bad_image_positions_are_an_error_naming_the_sample():
    s = Sample(sample_id=8, text=np.arange(4), pixels=None, tiles=1, image_tokens=P, image_at=np.array([9]),
               image_lengths=np.array([P]))
    with pytest.raises(BadBatchError, match="sample 8: image positions"):
        build([[s]])
