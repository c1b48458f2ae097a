"""The step feed (mmtrain/steps/prefetch.py): the same steps as planning in the loop, each consumed
once; the checkpointable state is the one after the last *consumed* step; data preparation overlaps
compute; errors surface in the training thread; static shapes; pixels normalised on the device."""

from __future__ import annotations

import copy
import time

import numpy as np
import pytest
import torch

from mmtrain.config import compose
from mmtrain.steps.batch import Sample, build_micro_batch
from mmtrain.steps.datamodule import DataModule
from mmtrain.steps.prefetch import StaticShape, StepFeed, host_prepare, model_images, pad_static

OVR = ["model=tiny", "trainer.global_batch_size=4", "packing.buffer_size=8", "data.num_samples=40", "data.max_tiles=4"]


def _dm(extra=()):
    cfg = compose(OVR + list(extra))
    return DataModule(cfg, dp=2, dp_rank=1, pp=1, first_stage=True, tokens_per_tile=16)


def _ids(mbs):
    return [list(mb.sample_ids) for mb in mbs]


@pytest.mark.parametrize("extra", [[], ["packing.enabled=false"]], ids=["packed", "unpacked"])
def test_feed_gives_the_loops_steps_once_each_and_the_state_after_the_consumed_one(extra):
    ref, feed_dm = _dm(extra), _dm(extra)
    expected = []
    for _ in range(6):
        plan = ref.next_step()
        expected.append((plan.step, plan.sample_ids, _ids(ref.micro_batches(plan)), copy.deepcopy(ref.state_dict())))
    with StepFeed(feed_dm, torch.device("cpu"), prefetch=True, limit=6) as feed:
        initial = feed.state_dict()
        assert initial == _dm(extra).state_dict()
        for step, sample_ids, mb_ids, state in expected:
            ready = feed.next()
            assert ready.plan.step == step and ready.plan.sample_ids == sample_ids
            assert _ids(ready.micro_batches) == mb_ids
            time.sleep(0.05)  # let the feed run ahead
            assert feed.state_dict() == state  # after the consumed step, not the prefetched one
        with pytest.raises(RuntimeError, match="stopped after 6 steps"):
            feed.next()
    # resuming a fresh data module from the feed's state continues where the loop stopped
    resumed = _dm(extra)
    resumed.load_state_dict(state)
    assert resumed.next_step().sample_ids == ref.next_step().sample_ids


class _SlowData:
    """A data module whose micro-batches take `delay` seconds to build (a slow source)."""

    def __init__(self, delay: float) -> None:
        self.delay = delay
        self.step = 0

    def next_step(self):
        self.step += 1
        return self.step - 1

    def state_dict(self) -> dict:
        return {"step": self.step}

    def micro_batches(self, plan):
        time.sleep(self.delay)
        s = Sample(sample_id=plan, text=np.arange(2, 10), pixels=np.zeros((1, 3, 4, 4), np.float32), tiles=1, image_tokens=4)
        yield build_micro_batch([[s]], row_length=None, tokens_per_tile=4, image_shape=(3, 4, 4), capacity=64)


def _wall(prefetch: bool, steps: int, data_s: float, compute_s: float) -> tuple[float, list[float]]:
    waits = []
    with StepFeed(_SlowData(data_s), torch.device("cpu"), prefetch=prefetch, limit=steps) as feed:
        t0 = time.perf_counter()
        for _ in range(steps):
            waits.append(feed.next().wait_s)
            time.sleep(compute_s)  # the step's compute (the host waits on the device)
        return time.perf_counter() - t0, waits


def test_data_preparation_overlaps_compute():
    """Step time ~ max(compute, data), not the sum: 8 steps of 0.15 s data + 0.15 s compute take
    ~1.35 s with the feed (the first build is not hidden) against 2.4 s without."""
    steps, data_s, compute_s = 8, 0.15, 0.15
    serial, serial_waits = _wall(False, steps, data_s, compute_s)
    overlapped, waits = _wall(True, steps, data_s, compute_s)
    assert serial >= steps * (data_s + compute_s)
    assert overlapped < 0.75 * serial, (overlapped, serial)
    assert overlapped < steps * max(data_s, compute_s) + data_s + 0.35, (overlapped, waits)
    assert min(serial_waits) >= data_s and sorted(waits)[steps // 2] < data_s / 2, (serial_waits, waits)


class _Broken(_SlowData):
    def micro_batches(self, plan):
        if plan == 2:
            raise ValueError("sample 2: image is truncated")
        yield from super().micro_batches(plan)


def test_a_build_error_surfaces_in_the_training_thread_at_its_step():
    with StepFeed(_Broken(0.0), torch.device("cpu"), prefetch=True) as feed:
        feed.next(), feed.next()
        with pytest.raises(ValueError, match="sample 2: image is truncated"):
            feed.next()


def test_static_shapes_pad_cu_seqlens_with_empty_segments():
    dm = _dm(["packing.pad_to=seq_length"])
    mb = next(iter(dm.micro_batches(dm.next_step())))
    assert mb.num_tokens == 512
    n = mb.cu_seqlens.numel() - 1
    out = pad_static(mb, StaticShape(tokens=512, segments=16))
    assert out.cu_seqlens.numel() == 17 and torch.equal(out.cu_seqlens[: n + 1], mb.cu_seqlens)
    assert bool((out.cu_seqlens[n:] == 512).all()) and out.max_seqlen == 512
    with pytest.raises(ValueError, match="perf.max_segments"):
        pad_static(mb, StaticShape(tokens=512, segments=n - 1))
    with pytest.raises(ValueError, match="not the static 1024"):
        pad_static(mb, StaticShape(tokens=1024, segments=16))


def test_float_pixels_travel_in_the_training_dtype_with_the_same_numbers():
    dm = _dm()
    mb = next(iter(dm.micro_batches(dm.next_step())))
    before = mb.images.clone()
    out = host_prepare(mb, torch.bfloat16, pin=False, static=None)
    assert out.images.dtype == torch.bfloat16
    assert torch.equal(model_images(out.images, torch.bfloat16), model_images(before, torch.bfloat16))


def test_uint8_pixels_are_normalised_on_the_device_like_on_the_host():
    g = np.random.default_rng(0)
    raw = g.integers(0, 256, size=(3, 3, 8, 8), dtype=np.uint8)
    mean, std = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
    host = (raw.astype(np.float32) / 255.0 - np.array(mean, np.float32)[:, None, None]) / np.array(std, np.float32)[:, None, None]
    dev = model_images(torch.from_numpy(raw), torch.float32, (mean, std))
    torch.testing.assert_close(dev, torch.from_numpy(host), rtol=1e-6, atol=1e-6)
