"""The sync-free packed rope (mmtrain/models/rope.py) against megatron-core's own thd rope: the same
numbers, bit for bit, on packed streams with positions restarting per sample."""

from __future__ import annotations

import pytest
import torch
from megatron.core.models.common.embeddings import rope_utils
from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
from megatron.core.packed_seq_params import PackedSeqParams

from mmtrain.models import rope


class _OneRankGroup:
    """megatron's thd rope asks its context-parallel group for size and rank only."""

    def size(self) -> int:
        return 1

    def rank(self) -> int:
        return 0


def _stream(lengths, heads=3, dim=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    t = torch.randn(int(cu[-1]), heads, dim, generator=g)
    pos = torch.cat([torch.arange(n) for n in lengths])
    return t, cu, pos


def _megatron_thd(t, cu, dim, base, rot_dim=None):
    emb = RotaryEmbedding(kv_channels=dim, rotary_percent=(rot_dim or dim) / dim, rotary_base=base, use_cpu_initialization=True)
    freqs = emb.get_emb(int((cu[1:] - cu[:-1]).max()))  # what GPTModel hands every layer for thd input
    return rope_utils._apply_rotary_pos_emb_thd(t, cu, freqs, cp_group=_OneRankGroup())


@pytest.mark.parametrize("base", [10000.0, 1e6])
def test_packed_rope_equals_megatron_thd_rope_bit_for_bit(base, monkeypatch):
    monkeypatch.setattr(torch.cuda, "current_device", lambda: "cpu")  # megatron's get_emb moves inv_freq
    t, cu, pos = _stream([1, 37, 5, 120, 9], dim=16)
    ref = _megatron_thd(t, cu, 16, base)
    tables = rope.RotaryTables.from_freqs(rope.freqs_from_positions(pos, rope.inv_freq(16, base)), t.dtype)
    out = rope.apply_rotary(t, tables)
    assert torch.equal(out, ref)
    # and the tables are per token: [T, 1, rot_dim]
    assert tables.cos.shape == (t.shape[0], 1, 16)


def test_partial_rotary_dim_leaves_the_rest(monkeypatch):
    monkeypatch.setattr(torch.cuda, "current_device", lambda: "cpu")
    t, cu, pos = _stream([7, 20], dim=32)
    ref = _megatron_thd(t, cu, 32, 10000.0, rot_dim=16)
    tables = rope.RotaryTables.from_freqs(rope.freqs_from_positions(pos, rope.inv_freq(16, 10000.0)), t.dtype)
    out = rope.apply_rotary(t, tables)
    assert torch.equal(out, ref)
    assert torch.equal(out[..., 16:], t[..., 16:])


def test_positions_that_do_not_restart_give_other_numbers(monkeypatch):
    """The check above can fail: stream-wide positions rotate later samples differently."""
    monkeypatch.setattr(torch.cuda, "current_device", lambda: "cpu")
    t, cu, pos = _stream([10, 10])
    ref = _megatron_thd(t, cu, 16, 10000.0)
    wrong = rope.apply_rotary(t, rope.RotaryTables.from_freqs(rope.freqs_from_positions(torch.arange(20), rope.inv_freq(16, 10000.0)), t.dtype))
    assert torch.equal(wrong[:10], ref[:10]) and not torch.allclose(wrong[10:], ref[10:])


def test_inv_freq_is_megatrons():
    emb = RotaryEmbedding(kv_channels=64, rotary_percent=1.0, rotary_base=1e6, use_cpu_initialization=True)
    assert torch.equal(rope.inv_freq(64, 1e6), emb.inv_freq)


def test_with_rope_copies_every_field_and_keeps_the_original():
    cu = torch.tensor([0, 3, 8], dtype=torch.int32)
    psp = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=5, max_seqlen_kv=5)
    tables = rope.RotaryTables(cos=torch.ones(8, 1, 4), sin=torch.zeros(8, 1, 4))
    out = rope.with_rope(psp, tables)
    assert isinstance(out, PackedSeqParams) and out.rope is tables
    assert out.cu_seqlens_q is cu and out.max_seqlen_q == 5 and out.qkv_format == "thd"
    assert not hasattr(psp, "rope")


def test_freqs_need_one_dimensional_positions():
    with pytest.raises(ValueError, match="position_ids"):
        rope.freqs_from_positions(torch.zeros(3, 5, dtype=torch.long), rope.inv_freq(8, 10.0))
