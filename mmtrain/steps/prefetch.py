"""The training loop's feed: each step's plan and this rank's micro-batches, ready on the device.

With prefetch on, a background thread plans step k+1, builds its micro-batches (sample loading,
pixel generation / decoding, the packed layout), casts float pixels to the training dtype, pins the
host tensors and copies them to the GPU on a side stream, all while step k computes; the training
thread only waits on a device event. numpy's generators, image decoding and torch copies release the
GIL, so the thread overlaps for real.

Resume stays exact: the planner runs ahead, but the feed keeps, per step, the data-module state
right after that step was planned, and `state_dict()` returns the state after the last step the
loop *consumed*, never the state after a prefetched one.

Pixels: float pixels travel in the training dtype (bf16 halves the copy; the model casts to it
anyway, so the numbers are the same); uint8 pixels travel as they are and `model_images` normalises
them on the device with the source's `pixel_norm` (mean, std per channel, for [0, 1] values).
"""

from __future__ import annotations

import copy
import queue
import threading
import time
from dataclasses import dataclass, replace
from typing import Any, Optional

import torch

from mmtrain.steps.batch import PackedMicroBatch
from mmtrain.steps.stream import Step

_TENSORS = ("tokens", "labels", "loss_mask", "position_ids", "cu_seqlens", "cu_seqlens_padded", "images", "image_token_index")


@dataclass
class ReadyStep:
    plan: Step
    micro_batches: list[PackedMicroBatch]
    state_after: dict  # the data module's state right after this step was planned
    wait_s: float = 0.0  # how long the training thread waited for it
    build_s: float = 0.0  # how long building it took (on the feed's thread when prefetching)
    event: Any = None  # CUDA event: the side-stream copies of this step are done


@dataclass(frozen=True)
class StaticShape:
    """Pad every micro-batch's cu_seqlens to `segments` + 1 entries (empty segments at the end) and
    report `max_seqlen` = `tokens`, so shapes and ints never change from one micro-batch to the next."""

    tokens: int
    segments: int


def pad_static(mb: PackedMicroBatch, shape: StaticShape) -> PackedMicroBatch:
    """`mb` with cu_seqlens (and cu_seqlens_padded) extended by empty segments to a fixed size."""
    if mb.num_tokens != shape.tokens:
        raise ValueError(
            f"micro-batch with samples {mb.sample_ids[:8]} holds {mb.num_tokens} tokens, not the static "
            f"{shape.tokens} (packing.pad_to=seq_length and trainer.micro_batch_size=1 are needed for perf.compile)"
        )

    def pad(cu: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        if cu is None:
            return None
        n = cu.numel() - 1
        if n > shape.segments:
            raise ValueError(
                f"micro-batch with samples {mb.sample_ids[:8]} has {n} segments > perf.max_segments={shape.segments}; "
                "raise perf.max_segments"
            )
        return torch.cat([cu, cu[-1:].expand(shape.segments - n)])

    return replace(mb, cu_seqlens=pad(mb.cu_seqlens), cu_seqlens_padded=pad(mb.cu_seqlens_padded), max_seqlen=shape.tokens)


def host_prepare(mb: PackedMicroBatch, pixel_dtype: Optional[torch.dtype], pin: bool, static: Optional[StaticShape]) -> PackedMicroBatch:
    """Host-side work before the copy: static padding, float pixels in the training dtype, pinning."""
    if static is not None:
        mb = pad_static(mb, static)
    if pixel_dtype is not None and mb.images.is_floating_point() and mb.images.dtype != pixel_dtype:
        mb.images = mb.images.to(pixel_dtype)
    if pin:
        for name in _TENSORS:
            t = getattr(mb, name)
            if t is not None:
                setattr(mb, name, t.pin_memory())
    return mb


def model_images(images: torch.Tensor, dtype: torch.dtype, pixel_norm: Optional[tuple] = None) -> torch.Tensor:
    """What the ViT gets: uint8 pixels scaled to [0, 1] and normalised per channel on the device,
    float pixels cast to the model dtype."""
    if images.dtype == torch.uint8:
        x = images.to(torch.float32).div_(255.0)
        if pixel_norm is not None:
            mean, std = (torch.as_tensor(v, dtype=torch.float32, device=x.device).view(1, -1, 1, 1) for v in pixel_norm)
            x = (x - mean) / std
        return x.to(dtype)
    return images.to(dtype)


class StepFeed:
    """Consecutive steps' (plan, micro-batches) for this rank, built ahead on a thread when
    `prefetch`, else on demand. `limit` caps how many steps are planned (the loop's remaining steps)."""

    def __init__(
        self,
        data,
        device: torch.device,
        *,
        prefetch: bool = True,
        pin_memory: Optional[bool] = None,
        pixel_dtype: Optional[torch.dtype] = None,
        static: Optional[StaticShape] = None,
        limit: Optional[int] = None,
    ) -> None:
        self.data = data
        self.device = torch.device(device)
        cuda = self.device.type == "cuda"
        self.pin = cuda if pin_memory is None else bool(pin_memory and cuda)
        self.pixel_dtype = pixel_dtype
        self.static = static
        self.limit = limit
        self.produced = 0
        self._state = copy.deepcopy(data.state_dict())  # nothing consumed yet: the current state
        self._stream = torch.cuda.Stream(device=self.device) if cuda else None
        self._queue: Optional[queue.Queue] = None
        self._thread: Optional[threading.Thread] = None
        self._stop = threading.Event()
        if prefetch:
            self._queue = queue.Queue(maxsize=1)
            self._thread = threading.Thread(target=self._run, name="mmtrain-step-feed", daemon=True)
            self._thread.start()

    # ---- building (on the feed thread when prefetching) -------------------------------------
    def _build(self) -> ReadyStep:
        t0 = time.perf_counter()
        plan = self.data.next_step()
        state = copy.deepcopy(self.data.state_dict())
        mbs = [host_prepare(mb, self.pixel_dtype, self.pin, self.static) for mb in self.data.micro_batches(plan)]
        event = None
        if self._stream is not None:
            with torch.cuda.stream(self._stream):
                mbs = [mb.to(self.device) for mb in mbs]
                event = torch.cuda.Event()
                event.record(self._stream)
        self.produced += 1
        return ReadyStep(plan=plan, micro_batches=mbs, state_after=state, build_s=time.perf_counter() - t0, event=event)

    def _run(self) -> None:
        if self._stream is not None:
            torch.cuda.set_device(self.device)  # the current device is per thread
        try:
            while not self._stop.is_set() and (self.limit is None or self.produced < self.limit):
                item: Any = self._build()
                while not self._stop.is_set():
                    try:
                        self._queue.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
        except BaseException as e:  # surfaces in the training thread, at its next step
            self._queue.put(e)

    # ---- consuming (the training thread) ----------------------------------------------------
    def next(self) -> ReadyStep:
        t0 = time.perf_counter()
        if self._queue is None:
            item = self._build()
        else:
            while True:
                try:
                    item = self._queue.get(timeout=0.1)
                    break
                except queue.Empty:
                    if self._thread is None or not self._thread.is_alive():
                        raise RuntimeError(f"the step feed has stopped after {self.produced} steps (limit {self.limit})")
            if isinstance(item, BaseException):
                raise item
        if item.event is not None:
            main = torch.cuda.current_stream(self.device)
            main.wait_event(item.event)  # a device-side wait: the host does not block
            for mb in item.micro_batches:
                for name in _TENSORS:
                    t = getattr(mb, name)
                    if t is not None:
                        t.record_stream(main)  # memory made on the side stream, used on this one
        item.wait_s = time.perf_counter() - t0
        self._state = item.state_after
        return item

    def refresh(self) -> None:
        """Take the data module's state again after the loop changed it between steps (online cost
        calibration records each step's measured times); only without prefetch, where nothing was
        planned past the consumed step."""
        if self._thread is not None:
            raise RuntimeError("StepFeed.refresh() with prefetch on: the data module has already planned ahead")
        self._state = copy.deepcopy(self.data.state_dict())

    def state_dict(self) -> dict:
        """The data module's state after the last consumed step (what a checkpoint must hold)."""
        return copy.deepcopy(self._state)

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            while self._thread.is_alive():
                try:
                    self._queue.get(timeout=0.05)
                except queue.Empty:
                    pass
            self._thread.join()
            self._thread = None

    def __enter__(self) -> "StepFeed":
        return self

    def __exit__(self, *_: Any) -> None:
        self.close()
