"""Which device a rank runs on, and what is refused before anything is built: LOCAL_RANK against the
visible GPUs, GPU cluster configs without CUDA, several ranks on one GPU; the CPU compatibility
layer keyed on the chosen device; precision auto; settings this build cannot honour."""

from __future__ import annotations

import logging

import pytest
import torch

from mmtrain.config import compose
from mmtrain.parallel import cpu_compat, setup
from mmtrain.parallel.config import ParallelConfig
from mmtrain.train import runtime


@pytest.fixture
def gpus(monkeypatch):
    """Pretend this machine has `n` GPUs (0: none) and this process is LOCAL_RANK r of w."""

    def make(n: int, rank: int = 0, world: int = 1):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: n > 0)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: n)
        monkeypatch.setenv("LOCAL_RANK", str(rank))
        monkeypatch.setenv("LOCAL_WORLD_SIZE", str(world))
        monkeypatch.setattr(setup, "_warned_cpu_fallback", False)

    return make


def test_cpu_is_cpu_even_with_gpus(gpus):
    gpus(8)
    assert setup.pick_device("cpu", True) == torch.device("cpu")


def test_each_rank_takes_its_own_gpu(gpus):
    gpus(4, rank=3, world=4)
    assert setup.pick_device("auto", True) == torch.device("cuda", 3)
    assert setup.pick_device("cuda") == torch.device("cuda", 3)
    assert setup.pick_device("auto") == torch.device("cuda", 3)


def test_local_rank_without_a_gpu_of_its_own_is_refused(gpus):
    gpus(1, rank=1, world=2)
    with pytest.raises(setup.DeviceError, match=r"LOCAL_RANK=1 but only 1 CUDA device.*--nproc_per_node=1"):
        setup.pick_device("cuda")
    with pytest.raises(setup.DeviceError, match="LOCAL_RANK=1"):
        setup.pick_device("auto", True)


def test_gpu_cluster_without_cuda_is_refused(gpus):
    gpus(0)
    with pytest.raises(setup.DeviceError, match=r"a GPU cluster config \(cluster.gpus_per_node > 0\) but no CUDA device.*scale=smoke.*cluster=cpu"):
        setup.pick_device("auto", True)
    with pytest.raises(setup.DeviceError, match="trainer.device=cuda.*no CUDA device"):
        setup.pick_device("cuda", False)
    assert setup.pick_device("cpu", True) == torch.device("cpu")  # forcing the CPU stays possible


def test_more_cpu_cluster_ranks_than_gpus_run_on_the_cpu_with_one_warning(gpus, caplog):
    gpus(1, rank=0, world=4)
    with caplog.at_level(logging.WARNING, logger="mmtrain"):
        assert setup.pick_device("auto") == torch.device("cpu")
        assert setup.pick_device("auto") == torch.device("cpu")
    assert len([r for r in caplog.records if "4 processes on this node but 1 CUDA" in r.getMessage()]) == 1
    gpus(1, rank=3, world=4)
    assert setup.pick_device("auto") == torch.device("cpu")


def test_bad_device_name():
    with pytest.raises(ValueError, match="trainer.device"):
        setup.pick_device("tpu")


def test_compat_layer_follows_the_chosen_device(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a GPU host...
    assert cpu_compat.needed(torch.device("cpu"))  # ...running on the CPU needs the layer
    assert not cpu_compat.needed(torch.device("cuda", 0))
    with cpu_compat.cpu_compat(torch.device("cpu")):
        assert cpu_compat.active()
        assert torch.cuda.is_available() is False and torch.cuda.device_count() == 0
        assert torch.zeros(2, device="cuda").device.type == "cpu"
        assert isinstance(torch.cuda.get_rng_state(), torch.Tensor)  # activation recompute saves it
    assert torch.cuda.is_available() is True and not cpu_compat.active()
    with cpu_compat.cpu_compat(torch.device("cuda", 0)):
        assert not cpu_compat.active()


def test_sequence_parallel_is_refused_naming_the_key():
    with pytest.raises(ValueError, match="parallel.sequence_parallel=true is not supported"):
        setup.check_parallel(ParallelConfig(sequence_parallel=True))
    setup.check_parallel(ParallelConfig())


def test_precision_auto_is_bf16_on_cuda_and_fp32_on_cpu():
    assert runtime.dtype_of("auto", torch.device("cuda", 0)) == torch.bfloat16
    assert runtime.dtype_of("auto", torch.device("cpu")) == torch.float32
    assert runtime.dtype_of("fp32", torch.device("cuda", 0)) == torch.float32
    with pytest.raises(ValueError, match="trainer.precision"):
        runtime.dtype_of("fp16")
    assert compose([]).trainer.precision == "auto"


def test_model_runtime_decides_the_autos(monkeypatch):
    monkeypatch.setattr(runtime, "_fusion_works", lambda device: True)  # a GPU machine that can compile
    cfg = compose([])
    gpu, cpu = runtime.model_runtime(cfg, torch.device("cuda", 0)), runtime.model_runtime(cfg, torch.device("cpu"), "gloo")
    assert gpu.fuse and not gpu.batch_p2p_sync and gpu.rope == "packed"
    assert not cpu.fuse and cpu.batch_p2p_sync
    assert gpu.static_tokens is None
    static = compose(["packing.pad_to=seq_length", "packing.seq_length=1024"])
    assert runtime.model_runtime(static, torch.device("cpu")).static_tokens == 1024
    with pytest.raises(ValueError, match="perf.compile=layers needs a static token count"):
        runtime.model_runtime(compose(["perf.compile=layers"]), torch.device("cpu"))
    assert runtime.overlap_grad_reduce(compose(["model.freeze_lm=false"]), dp=2)
    assert not runtime.overlap_grad_reduce(compose(["model.freeze_lm=true"]), dp=2)
    assert not runtime.overlap_grad_reduce(compose([]), dp=1)


def test_expandable_segments_set_before_cuda_starts(monkeypatch):
    calls = []
    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF", raising=False)
    monkeypatch.setattr(torch._C, "_accelerator_setAllocatorSettings", calls.append, raising=False)
    setup.configure_cuda_allocator(True)
    assert calls == ["expandable_segments:True"]
    import os

    assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True"
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "max_split_size_mb:128")  # the user's setting wins
    setup.configure_cuda_allocator(True)
    assert calls == ["expandable_segments:True"]


def test_fusion_falls_back_with_one_warning_where_nothing_compiles(monkeypatch, caplog):
    from mmtrain.models import rope

    monkeypatch.setattr(rope, "fused_kernels_work", lambda device, dtype: "InductorError: no C compiler found")
    with caplog.at_level(logging.WARNING, logger="mmtrain"):
        rt = runtime.model_runtime(compose([]), torch.device("cuda", 0))
    assert not rt.fuse
    assert [r.getMessage() for r in caplog.records if "fused kernels unavailable" in r.getMessage() and "no C compiler" in r.getMessage()]
    assert runtime.model_runtime(compose(["perf.fuse=true"]), torch.device("cuda", 0)).fuse  # asked for explicitly
