"""Image-token counts against hand-computed values, and the text-token counter."""

from __future__ import annotations

import numpy as np
import pytest

from mmtrain.data.accounting import TokenAccounting, total_tokens
from mmtrain.data.text import ByteTokenizer, count_conversation, count_text, load_tokenizer


@pytest.mark.parametrize(
    "kw,size,expected",
    [
        ({}, (336, 336), 24 * 24),
        ({}, (337, 336), 25 * 24),  # ceil
        ({}, (1, 1), 1),
        ({}, (640, 480), 46 * 35),  # 640/14 = 45.7, 480/14 = 34.3
        ({"rounding": "floor"}, (337, 336), 24 * 24),
        ({"rounding": "floor"}, (640, 480), 45 * 34),
        ({"rounding": "floor"}, (10, 10), 1),  # at least one token per side
        ({"merge": 2}, (336, 336), 12 * 12),
        ({"merge": 2}, (29, 28), 2 * 1),  # ceil(ceil(29/14)=3 / 2) = 2
        ({"merge": 2, "rounding": "floor"}, (55, 83), 1 * 2),  # floor(3/2)=1, floor(5/2)=2
        ({"class_token": True}, (336, 336), 577),
        ({"patch_size": 16}, (100, 50), 7 * 4),
    ],
)
def test_native(kw, size, expected):
    acc = TokenAccounting(**kw)
    assert acc.image_tokens(*size) == expected
    tokens, tiles = acc.image_tokens_array(np.array([size[0]]), np.array([size[1]]))
    assert tokens[0] == expected and tiles[0] == 1


@pytest.mark.parametrize(
    "size,max_tiles,grid",
    [
        ((448, 448), 12, (1, 1)),
        ((896, 448), 12, (2, 1)),
        ((448, 896), 12, (1, 2)),
        ((1000, 500), 12, (2, 1)),  # (2,1) and (4,2) tie; 500000 px < 0.5*448^2*8, keep the smaller
        ((2000, 1000), 12, (4, 2)),  # 2e6 px > 802816: the larger grid
        ((800, 600), 12, (4, 3)),  # exact 4:3 grid exists
        ((5000, 100), 12, (12, 1)),  # extreme aspect: widest grid allowed
        ((5000, 100), 6, (6, 1)),
        # 16:9 = 1.778: 2/1 (diff .222) beats 3/2 (.278); 5/3 would need 15 tiles. (2,1) ties with
        # (4,2), and 1920*1080 > 0.5*448^2*8, so the larger grid.
        ((1920, 1080), 12, (4, 2)),
        ((1920, 1080), 15, (5, 3)),
    ],
)
def test_dynamic_grid(size, max_tiles, grid):
    acc = TokenAccounting(mode="dynamic", max_tiles=max_tiles)
    assert acc.grid(*size) == grid


def test_dynamic_tokens_thumbnail_and_min_tiles():
    acc = TokenAccounting(mode="dynamic", merge=2, thumbnail=True)
    assert acc.tile_tokens == 256  # (448/14/2)^2
    assert acc.image_tokens(2000, 1000) == (8 + 1) * 256
    assert acc.image_tokens(448, 448) == 256  # one tile: no thumbnail
    assert TokenAccounting(mode="dynamic", tokens_per_tile=64).image_tokens(896, 448) == 2 * 64
    assert TokenAccounting(mode="dynamic", class_token=True).tile_tokens == 1025
    # min_tiles=4 forbids (1,1): a square image gets (2,2)
    assert TokenAccounting(mode="dynamic", min_tiles=4).grid(448, 448) == (2, 2)
    tokens, tiles = acc.image_tokens_array(np.array([2000, 448, 0]), np.array([1000, 448, 5]))
    assert tokens.tolist() == [9 * 256, 256, 0] and tiles.tolist() == [9, 1, 0]


def test_total_and_validation():
    assert total_tokens(np.array([20]), np.array([576]), np.array([1])).tolist() == [595]
    with pytest.raises(ValueError):
        TokenAccounting(rounding="round")
    with pytest.raises(ValueError):
        TokenAccounting(min_tiles=3, max_tiles=2)


def test_byte_tokenizer_and_placeholders():
    tok = ByteTokenizer()
    assert count_text(tok, "<image>\nDescribe it.") == (14, 1)
    assert count_text(tok, "héllo") == (6, 0)  # é is 2 bytes
    assert count_text(tok, "<image><image>") == (2, 2)
    turns = [{"from": "human", "value": "<image>\nDescribe it."}, {"from": "gpt", "value": "A cat."}]
    assert count_conversation(tok, turns) == (20, 1)
    assert load_tokenizer(None).name == "bytes"
    with pytest.raises(FileNotFoundError):
        load_tokenizer("/nonexistent/tokenizer")


def test_hf_tokenizer_from_local_file(tmp_path):
    import tokenizers
    from tokenizers import models, pre_tokenizers

    tk = tokenizers.Tokenizer(models.WordLevel({"a": 0, "cat": 1, "[UNK]": 2}, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.save(str(tmp_path / "tokenizer.json"))
    tok = load_tokenizer(str(tmp_path))
    assert count_text(tok, "<image> a cat sat") == (4, 1)
