"""The one place where megatron-core's CUDA hard-codes are bent to run on CPU (gloo).

megatron-core 0.19.2 assumes CUDA in a few dozen spots (device="cuda" literals, current_device(),
current_stream(), synchronize(), `.cuda()`, and `tensor.type() == 'torch.cuda.FloatTensor'` checks
in the optimizer). On a machine without CUDA, `cpu_compat()` installs:

* a TorchFunctionMode that rewrites any CUDA device argument of tensor factories, `.to()` and
  `.cuda()` to CPU, and makes `Tensor.type()` report the CUDA type name of a CPU tensor so the
  optimizer's type checks take the same branches as on GPU;
* no-op stand-ins for `torch.cuda.current_device/synchronize/current_stream/...`.

It is keyed on the *chosen* device, not on whether CUDA exists: `trainer.device=cpu` on a GPU host
enters it too (then CUDA also reads as absent to megatron: `is_available()` is False inside), so no
megatron buffer lands on a GPU the run does not use. It is entered once per process by
`mmtrain.parallel.setup`;
`PATCHED_SYMBOLS` lists every megatron-core symbol it relies on, and a test asserts they still
exist so that an upgrade fails loudly.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, Optional

import torch
from torch.overrides import TorchFunctionMode

# megatron-core call sites this layer exists for (module path, attribute). Checked by tests.
PATCHED_SYMBOLS = [
    ("megatron.core.optimizer.clip_grads", "clip_grad_by_total_norm_fp32"),
    ("megatron.core.optimizer.clip_grads", "get_grad_norm_fp32"),
    ("megatron.core.utils", "local_multi_tensor_l2_norm"),
    ("megatron.core.distributed.param_and_grad_buffer", "_ParamAndGradBuffer"),
    ("megatron.core.pipeline_parallel.p2p_communication", "P2PCommunicator"),
    ("megatron.core.pipeline_parallel.schedules", "forward_backward_pipelining_without_interleaving"),
    ("megatron.core.tensor_parallel.mappings", "gather_from_tensor_model_parallel_region"),
    ("megatron.core.models.common.embeddings.rotary_pos_embedding", "RotaryEmbedding"),
    ("megatron.core.tensor_parallel.random", "_get_cuda_rng_state"),
    ("megatron.core.tensor_parallel.random", "_set_cuda_rng_state"),
    ("megatron.core.tensor_parallel.random", "CheckpointFunction"),
]

_CPU = torch.device("cpu")
_FACTORY_KWARG = "device"
_CUDA_TYPE_NAMES = {
    "torch.FloatTensor": "torch.cuda.FloatTensor",
    "torch.HalfTensor": "torch.cuda.HalfTensor",
    "torch.BFloat16Tensor": "torch.cuda.BFloat16Tensor",
    "torch.DoubleTensor": "torch.cuda.DoubleTensor",
    "torch.LongTensor": "torch.cuda.LongTensor",
    "torch.IntTensor": "torch.cuda.IntTensor",
}


def _is_cuda_device(dev: Any) -> bool:
    if isinstance(dev, torch.device):
        return dev.type == "cuda"
    if isinstance(dev, str):
        return dev.startswith("cuda")
    return isinstance(dev, int) and not isinstance(dev, bool)


class _CudaToCpuMode(TorchFunctionMode):
    """Redirects CUDA placement to CPU; everything else passes through unchanged."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = func(*args)
            return _CUDA_TYPE_NAMES.get(name, name)
        if _FACTORY_KWARG in kwargs and _is_cuda_device(kwargs[_FACTORY_KWARG]):
            kwargs[_FACTORY_KWARG] = _CPU
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda_device(args[1]):
            args = (args[0], _CPU, *args[2:])
        return func(*args, **kwargs)


class _NullStream:
    def wait_stream(self, *_: Any) -> None: ...
    def wait_event(self, *_: Any) -> None: ...
    def synchronize(self) -> None: ...
    def record_event(self, *_: Any) -> None: ...

    def __enter__(self) -> "_NullStream":
        return self

    def __exit__(self, *_: Any) -> None: ...


_CUDA_STUBS: dict[str, Any] = {
    "current_device": lambda: _CPU,
    "synchronize": lambda *a, **k: None,
    "current_stream": lambda *a, **k: _NullStream(),
    "default_stream": lambda *a, **k: _NullStream(),
    "Stream": lambda *a, **k: _NullStream(),
    "stream": lambda *a, **k: contextlib.nullcontext(),
    "set_device": lambda *a, **k: None,
    "empty_cache": lambda *a, **k: None,
    "max_memory_allocated": lambda *a, **k: 0,
    "memory_allocated": lambda *a, **k: 0,
    "reset_peak_memory_stats": lambda *a, **k: None,
    "is_available": lambda: False,
    "device_count": lambda: 0,
    # activation recompute saves / restores the "cuda" RNG around each checkpointed piece
    "get_rng_state": lambda *a, **k: torch.get_rng_state(),
    "set_rng_state": lambda *a, **k: None,
}
_CUDA_RANDOM_STUBS: dict[str, Any] = {
    "get_rng_state": lambda *a, **k: torch.get_rng_state(),
    "set_rng_state": lambda *a, **k: None,
}

_active = False


def needed(device: Optional[torch.device] = None) -> bool:
    """True when this process runs megatron-core on the CPU: the chosen device is the CPU (or, with
    no device given, CUDA is absent)."""
    if device is not None:
        return torch.device(device).type == "cpu"
    return not torch.cuda.is_available()


def active() -> bool:
    return _active


@contextlib.contextmanager
def cpu_compat(device: Optional[torch.device] = None) -> Iterator[None]:
    """Enter the compatibility layer (no-op when the device is not the CPU or it is already active)."""
    global _active
    if _active or not needed(device):
        yield
        return
    import torch.cuda.random as cuda_random

    saved = {name: getattr(torch.cuda, name) for name in _CUDA_STUBS}
    saved_random = {name: getattr(cuda_random, name) for name in _CUDA_RANDOM_STUBS}
    for name, stub in _CUDA_STUBS.items():
        setattr(torch.cuda, name, stub)
    for name, stub in _CUDA_RANDOM_STUBS.items():
        setattr(cuda_random, name, stub)
    _active = True
    try:
        with _CudaToCpuMode():
            yield
    finally:
        for name, fn in saved.items():
            setattr(torch.cuda, name, fn)
        for name, fn in saved_random.items():
            setattr(cuda_random, name, fn)
        _active = False


_process_ctx: contextlib.ExitStack | None = None


def enable_for_process(device: Optional[torch.device] = None) -> None:
    """Enter `cpu_compat()` for the rest of the process (training entry points), when `device` (the
    run's chosen device; default: CUDA absent) is the CPU."""
    global _process_ctx
    if _process_ctx is None and needed(device):
        _process_ctx = contextlib.ExitStack()
        _process_ctx.enter_context(cpu_compat(device))


def disable_for_process() -> None:
    global _process_ctx
    if _process_ctx is not None:
        _process_ctx.close()
        _process_ctx = None
