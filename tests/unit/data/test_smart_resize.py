"""Qwen2-VL token accounting (smart resize) equals transformers' Qwen2VLImageProcessor: the grid of
real images it processes, and its own patch count for many sizes; the array form equals the scalar."""

from __future__ import annotations

import numpy as np
import pytest

from mmtrain.data.accounting import SmartResize, smart_resize

SETTINGS = [dict(min_pixels=56 * 56, max_pixels=28 * 28 * 1280), dict(min_pixels=56 * 56, max_pixels=28 * 28 * 24),
            dict(min_pixels=28 * 28 * 16, max_pixels=28 * 28 * 64)]


def _processor(min_pixels, max_pixels):
    from transformers import Qwen2VLImageProcessor

    return Qwen2VLImageProcessor(min_pixels=min_pixels, max_pixels=max_pixels, patch_size=14, merge_size=2, temporal_patch_size=2)


def _sizes(n: int, seed: int) -> list[tuple[int, int]]:
    rng = np.random.default_rng(seed)
    w = np.exp(rng.uniform(np.log(4), np.log(4000), n)).astype(int)
    h = np.clip((w / np.exp(rng.uniform(np.log(1 / 150), np.log(150), n))).astype(int), 1, 8000)
    edge = [(14, 14), (28, 28), (42, 14), (1, 1), (3000, 15), (15, 3000), (336, 336), (1344, 1344), (1000, 5), (1000, 4), (3001, 15), (50, 9999)]
    return edge + list(zip(w.tolist(), h.tolist()))


@pytest.mark.parametrize("setting", SETTINGS)
def test_grid_equals_processor_on_real_images(setting):
    from PIL import Image

    acc = SmartResize(**setting)
    proc = _processor(**setting)
    sizes = [(100, 60), (45, 130), (20, 30), (300, 250), (1000, 40), (13, 700), (640, 480)]
    images = [Image.new("RGB", s, (10 * i, 20, 30)) for i, s in enumerate(sizes)]
    out = proc(images=images, return_tensors="pt")
    grids = [acc.grid_thw(*s) for s in sizes]
    assert out["image_grid_thw"].tolist() == [list(g) for g in grids]
    assert out["pixel_values"].shape[0] == sum(acc.vit_patches(*s) for s in sizes)
    assert out["pixel_values"].shape[1] == 3 * acc.temporal_patch_size * acc.patch_size**2


@pytest.mark.parametrize("setting", SETTINGS)
def test_patches_and_tokens_equal_processor_for_many_sizes(setting):
    acc = SmartResize(**setting)
    proc = _processor(**setting)
    sizes = _sizes(600, seed=len(str(setting)))
    ok = [(w, h) for w, h in sizes if max(w, h) / min(w, h) <= 200]
    assert len(ok) < len(sizes)  # some sizes are refused
    for w, h in ok:
        assert acc.vit_patches(w, h) == proc.get_number_of_image_patches(h, w), (w, h)
        assert acc.image_tokens(w, h) * 4 == acc.vit_patches(w, h)
    tokens, patches = acc.arrays(np.array([s[0] for s in sizes]), np.array([s[1] for s in sizes]))
    for (w, h), t, p in zip(sizes, tokens.tolist(), patches.tolist()):
        if (w, h) in ok:
            assert (t, p) == (acc.image_tokens(w, h), acc.vit_patches(w, h)), (w, h)
        else:
            assert (t, p) == (0, 0)


def test_refusals_and_processor_config():
    with pytest.raises(ValueError, match="aspect ratio"):
        smart_resize(10, 2500)
    with pytest.raises(ValueError, match="no area"):
        smart_resize(0, 10)
    assert SmartResize.from_processor_config({"size": {"shortest_edge": 100, "longest_edge": 9000}, "patch_size": 16}) == SmartResize(
        patch_size=16, min_pixels=100, max_pixels=9000
    )
    assert SmartResize.from_processor_config({"min_pixels": 3136, "max_pixels": 12845056}).max_pixels == 12845056
    tokens, patches = SmartResize().arrays(np.array([0, 448]), np.array([10, 448]))
    assert tokens.tolist() == [0, 256] and patches.tolist() == [0, 1024]
