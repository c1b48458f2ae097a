"""Recipes compose to the seed's experiments; cluster groups; typos fail naming the key."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from mmtrain.config import compose

REPO = Path(__file__).resolve().parents[3]


@pytest.mark.parametrize("variant,enabled", [([], True), (["packing=disabled"], False), (["packing=default"], True)])
@pytest.mark.parametrize("recipe,world", [("h20_1gpu", 1), ("h20_4gpu_dp4", 4)])
def test_recipe_full_scale(recipe, world, variant, enabled):
    cfg = compose([f"recipe={recipe}", *variant])
    assert cfg.recipe == recipe
    assert cfg.model.name == "llava_mistral7b_clip224"
    assert cfg.cluster.name == "h20" and cfg.cluster.gpu_memory_gb == 96.0 and cfg.cluster.peak_tflops_bf16 == 148.0
    assert cfg.parallel.tensor_model_parallel_size == 1 and cfg.parallel.pipeline_model_parallel_size == 1
    assert cfg.cluster.nodes * cfg.cluster.procs_per_node == world  # DP = world / (TP x PP)
    assert cfg.packing.enabled is enabled
    assert (cfg.packing.seq_length, cfg.packing.buffer_size, cfg.packing.algorithm) == (8192, 100, "default")
    assert (cfg.data.min_tiles, cfg.data.max_tiles) == (1, 20)
    assert cfg.trainer.micro_batch_size == 1
    assert cfg.trainer.global_batch_size == (2 if world == 1 else 8)
    assert cfg.trainer.precision == "bf16"
    assert cfg.trainer.exit_code_preempted == 75


@pytest.mark.parametrize("recipe", ["h20_1gpu", "h20_4gpu_dp4"])
def test_recipe_cpu_smoke_scale(recipe):
    cfg = compose([f"recipe={recipe}", "model=tiny", "cluster=cpu"])
    assert cfg.model.name == "tiny" and cfg.cluster.name == "cpu"
    assert cfg.trainer.max_steps <= 5 and cfg.data.num_samples <= 64 and cfg.trainer.precision == "fp32"
    assert cfg.packing.seq_length == 512
    # command-line values still win over the smoke scale
    cfg = compose([f"recipe={recipe}", "model=tiny", "cluster=cpu", "trainer.max_steps=7", "packing.seq_length=1024"])
    assert cfg.trainer.max_steps == 7 and cfg.packing.seq_length == 1024


def test_cpu_cluster_alone_does_not_shrink_a_run():
    plain = compose([])
    assert (plain.trainer.max_steps, plain.data.num_samples) == (10, 256)
    explicit = compose(["cluster=cpu", "trainer.max_steps=50", "data.num_samples=1000"])
    assert (explicit.trainer.max_steps, explicit.data.num_samples) == (50, 1000)


def test_clusters():
    h100 = compose(["cluster=h100"]).cluster
    assert (h100.gpu_memory_gb, h100.peak_tflops_bf16, h100.gpus_per_node) == (80.0, 989.0, 8)
    h20 = compose(["cluster=h20"]).cluster
    assert (h20.gpu_memory_gb, h20.peak_tflops_bf16, h20.gpus_per_node) == (96.0, 148.0, 8)
    # the recipe on another GPU cluster keeps its full scale
    cfg = compose(["recipe=h20_1gpu", "cluster=h100"])
    assert cfg.cluster.name == "h100" and cfg.packing.seq_length == 8192


@pytest.mark.parametrize("override,message", [
    ("cluster.gpus_per_nod=3", "cluster.gpus_per_nod: no such config key in cluster (did you mean cluster.gpus_per_node?)"),
    ("cluster.gpus_per_node=many", "cluster.gpus_per_node: Value 'many' of type 'str' could not be converted to Integer"),
    ("packing.seq_length=8k", "packing.seq_length: Value '8k' of type 'str' could not be converted to Integer"),
    ("+packing.seq_lenght=4096", "packing.seq_lenght: no such config key in packing (did you mean packing.seq_length?)"),
    ("clusterx.nodes=2", "clusterx: no such config group (groups: model, data, packing, balancing, parallel, trainer, "
                         "cluster, perf, recipe)"),
])
def test_typos_fail_naming_the_key(override, message):
    from mmtrain.config import ConfigError

    with pytest.raises(ConfigError) as err:
        compose(["recipe=h20_1gpu", override])
    assert str(err.value) == message


def test_cfg_job_from_the_command_line():
    res = subprocess.run([sys.executable, "-m", "mmtrain.train", "recipe=h20_4gpu_dp4", "--cfg", "job"],
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    cfg = OmegaConf.create(res.stdout)
    assert cfg.recipe == "h20_4gpu_dp4"
    assert cfg.parallel.tensor_model_parallel_size == 1 and cfg.parallel.pipeline_model_parallel_size == 1
    assert cfg.cluster.procs_per_node == 4
    assert cfg.packing.enabled is True and cfg.packing.seq_length == 8192 and cfg.packing.buffer_size == 100


@pytest.mark.parametrize("scale", [["cluster=h20"], ["model=tiny", "cluster=cpu"]], ids=["full", "cpu_smoke"])
def test_h20_4gpu_dp4_gives_every_rank_work_every_step(scale):
    """Global batch 8 = 8 packs a step on 4 ranks: 2 packs each, balanced (the seed's shapes at full
    scale: 1-20 tiles x 256 tokens, seq 8192; and the CPU smoke scale)."""
    from mmtrain.steps.simulate import figures, run_steps

    cfg = compose(["recipe=h20_4gpu_dp4", *scale, "trainer.max_steps=12"])
    steps, _ = run_steps(cfg, dp=4)
    for st in steps:
        assert [sum(len(mb) for mb in r) for r in st.rank_micro_batches] == [2, 2, 2, 2]
        assert min(st.predicted_rank_cost) > 0
    assert figures(steps, cfg.packing.seq_length)["straggler"] <= 1.01


def test_a_renamed_key_fails_naming_the_new_one():
    with pytest.raises(ValueError, match="packing.max_tiles_per_pack"):
        compose(["packing.max_images_per_pack=4"])
    assert compose(["packing.max_tiles_per_pack=4"]).packing.max_tiles_per_pack == 4
