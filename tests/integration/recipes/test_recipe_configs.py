"""Recipes compose to the seed's experiments (one file each, named model_hardware_layout, with short
names for the seed's two); scale=smoke; cluster groups; typos and removed keys fail naming the key."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from mmtrain.config import compose

REPO = Path(__file__).resolve().parents[3]


@pytest.mark.parametrize("variant,enabled", [([], True), (["packing=disabled"], False), (["packing=default"], True)])
@pytest.mark.parametrize("recipe,name,world", [
    ("h20_1gpu", "llava7b_clip224_h20x1_tp1pp1dp1", 1), ("llava7b_clip224_h20x1_tp1pp1dp1", "llava7b_clip224_h20x1_tp1pp1dp1", 1),
    ("h20_4gpu_dp4", "llava7b_clip224_h20x4_tp1pp1dp4", 4), ("llava7b_clip224_h20x4_tp1pp1dp4", "llava7b_clip224_h20x4_tp1pp1dp4", 4),
])
def test_recipe_full_scale(recipe, name, world, variant, enabled):
    cfg = compose([f"recipe={recipe}", *variant])
    assert cfg.recipe == name and cfg.scale == "full"
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
    cfg = compose([f"recipe={recipe}", "scale=smoke"])
    assert cfg.model.name == "tiny" and cfg.cluster.name == "cpu" and cfg.scale == "smoke"
    assert (cfg.trainer.max_steps, cfg.data.num_samples, cfg.trainer.precision) == (4, 64, "fp32")
    assert (cfg.packing.seq_length, cfg.packing.buffer_size) == (512, 16)
    full = compose([f"recipe={recipe}"])  # what the smoke keeps: the experiment's shape
    assert (cfg.trainer.global_batch_size, cfg.cluster.procs_per_node, cfg.data.max_tiles) == (
        full.trainer.global_batch_size, full.cluster.procs_per_node, full.data.max_tiles)
    # command-line values win over the scale's, whatever their order
    for order in (["scale=smoke", "trainer.max_steps=7", "model=llava_mistral7b_clip224"],
                  ["trainer.max_steps=7", "model=llava_mistral7b_clip224", "scale=smoke"]):
        cfg = compose([f"recipe={recipe}", *order, "packing.seq_length=1024"])
        assert (cfg.trainer.max_steps, cfg.packing.seq_length, cfg.model.name) == (7, 1024, "llava_mistral7b_clip224")
        assert cfg.cluster.name == "cpu" and cfg.data.num_samples == 64


def test_scale_errors_and_no_recipe():
    with pytest.raises(ValueError, match=r"scale=huge: recipe llava7b_clip224_h20x1_tp1pp1dp1 has no such scale \(scales: full, smoke\)"):
        compose(["recipe=h20_1gpu", "scale=huge"])
    # without a recipe the default config already is the CPU smoke: scale=smoke changes nothing
    plain, smoke = compose([]), compose(["scale=smoke"])
    assert (smoke.model.name, smoke.trainer.max_steps, smoke.data.num_samples) == (plain.model.name, 10, 256)


def test_cpu_cluster_alone_does_not_shrink_a_run():
    plain = compose([])
    assert (plain.trainer.max_steps, plain.data.num_samples) == (10, 256)
    explicit = compose(["cluster=cpu", "trainer.max_steps=50", "data.num_samples=1000"])
    assert (explicit.trainer.max_steps, explicit.data.num_samples) == (50, 1000)
    # a recipe on cluster=cpu without a scale is its smoke (the form it had before scale=), scale=full
    # runs the full experiment on the CPU
    short, smoke = compose(["recipe=h20_1gpu", "model=tiny", "cluster=cpu"]), compose(["recipe=h20_1gpu", "scale=smoke"])
    assert short == smoke and short.scale == "smoke" and (short.packing.seq_length, short.trainer.max_steps) == (512, 4)
    cfg = compose(["recipe=h20_1gpu", "cluster=cpu", "scale=full"])
    assert (cfg.cluster.name, cfg.packing.seq_length, cfg.trainer.max_steps, cfg.model.name) == (
        "cpu", 8192, 100, "llava_mistral7b_clip224")


def test_one_file_per_recipe_named_after_model_hardware_layout():
    recipes = sorted(p.stem for p in (REPO / "configs" / "recipe").glob("*.yaml"))
    aliases = {"h20_1gpu": "llava7b_clip224_h20x1_tp1pp1dp1", "h20_4gpu_dp4": "llava7b_clip224_h20x4_tp1pp1dp4"}
    assert not (REPO / "configs" / "recipe_scale").exists()
    for name in recipes:
        cfg = compose([f"recipe={name}"])
        assert cfg.recipe == aliases.get(name, name)
        if name in aliases:
            continue
        par = cfg.parallel
        world = cfg.cluster.nodes * cfg.cluster.procs_per_node
        dp = world // (par.tensor_model_parallel_size * par.pipeline_model_parallel_size)
        layout = f"tp{par.tensor_model_parallel_size}pp{par.pipeline_model_parallel_size}dp{dp}"
        assert name.endswith(f"_{cfg.cluster.name}x{world}_{layout}"), (name, cfg.cluster.name, world, layout)
        assert "smoke" in cfg.scales, f"recipe {name} has no CPU smoke scale"


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
                         "cluster, perf, recipe, scale, scales)"),
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
    assert cfg.recipe == "llava7b_clip224_h20x4_tp1pp1dp4"
    assert cfg.parallel.tensor_model_parallel_size == 1 and cfg.parallel.pipeline_model_parallel_size == 1
    assert cfg.cluster.procs_per_node == 4
    assert cfg.packing.enabled is True and cfg.packing.seq_length == 8192 and cfg.packing.buffer_size == 100


@pytest.mark.parametrize("scale", [["cluster=h20"], ["scale=smoke"]], ids=["full", "cpu_smoke"])
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
    # one device knob: the others fail naming it
    with pytest.raises(ValueError, match=r"cluster.accelerator was renamed or removed: the device is trainer.device"):
        compose(["cluster.accelerator=gpu"])
    with pytest.raises(ValueError, match=r"parallel.backend was renamed or removed: .*follows trainer.device"):
        compose(["parallel.backend=gloo"])


@pytest.mark.parametrize("data,field,owner", [
    ("lengths", "num_samples", "synthetic_tiles"), ("lengths", "image_root", "llava_json"),
    ("synthetic_tiles", "source", "lengths"), ("llava_json", "tile_distribution", "synthetic_tiles"),
])
def test_each_data_source_owns_its_fields(data, field, owner):
    """data=<source> takes that source's fields only: another source's field fails naming the key."""
    from mmtrain.config import ConfigError
    from mmtrain.data.config import SOURCES

    assert field in SOURCES[owner].__dataclass_fields__ and field not in SOURCES[data].__dataclass_fields__
    with pytest.raises(ConfigError) as err:
        compose([f"data={data}", f"data.{field}=1"])
    owners = " | data=".join(n for n, c in SOURCES.items() if field in c.__dataclass_fields__)
    assert f"data={owner}" in f"data={owners}"
    assert str(err.value) == (f"data.{field}: not a field of this data source; {field} belongs to data={owners} "
                              "(each source has its own fields: mmtrain/data/config.py)")
    cfg = compose([f"data={data}"] + (["data.source=x"] if data != "synthetic_tiles" else []))
    assert type(cfg.data) is SOURCES[data] and cfg.data.name == data


@pytest.mark.parametrize("scale", [[], ["scale=smoke"]], ids=["full", "smoke"])
def test_a_recipe_takes_another_data_source(scale):
    """A recipe sets no data.* key, so `data=lengths data.source=T` swaps its data (what `mmtrain
    simulate --dp 4 recipe=h20_4gpu_dp4 data=lengths ...` does); the smoke's data.* keys give way too."""
    from mmtrain.data.config import LengthsData

    table = str(REPO / "tests" / "assets" / "llava_pretrain_native_smoke.csv")
    cfg = compose(["recipe=h20_4gpu_dp4", *scale, "data=lengths", f"data.source={table}"])
    assert type(cfg.data) is LengthsData and cfg.data.source == table
    assert cfg.trainer.global_batch_size == 8 and cfg.packing.seq_length == (512 if scale else 8192)
    # choosing another group of the same schema keeps the scale's values (compare's packing=default)
    cfg = compose(["recipe=h20_4gpu_dp4", *scale, "packing=default"])
    assert (cfg.packing.seq_length, cfg.packing.buffer_size) == ((512, 16) if scale else (8192, 100))
