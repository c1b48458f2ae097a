"""Structured config schema behind the Hydra groups in `configs/`.

Every YAML file is merged onto these dataclasses, so a misspelt key or a wrong type fails at
composition time with a message naming the key (OmegaConf struct mode) instead of being ignored.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from omegaconf import MISSING


@dataclass
class DecoderConfig:
    num_layers: int = 2
    hidden_size: int = 64
    num_attention_heads: int = 4
    num_query_groups: int = 2
    ffn_hidden_size: int = 128
    vocab_size: int = 256
    rotary_base: float = 10000.0
    norm_epsilon: float = 1e-5
    init_method_std: float = 0.02


@dataclass
class VisionConfig:
    num_layers: int = 2
    hidden_size: int = 32
    num_attention_heads: int = 2
    ffn_hidden_size: int = 64
    image_size: int = 28  # tile side in pixels
    patch_size: int = 7
    in_channels: int = 3
    class_token: bool = False  # LLaVA drops CLIP's class token: tokens per tile = (image_size / patch_size)^2
    norm_epsilon: float = 1e-5


@dataclass
class ProjectorConfig:
    ffn_hidden_size: int = 64  # hidden width of the 2-layer GELU MLP


@dataclass
class ModelConfig:
    name: str = "tiny"
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    vision: VisionConfig = field(default_factory=VisionConfig)
    projector: ProjectorConfig = field(default_factory=ProjectorConfig)
    freeze_lm: bool = False
    freeze_vit: bool = False
    freeze_projector: bool = False
    # auto | flash_attn | transformer_engine | torch_varlen | reference
    attention_backend: str = "auto"


@dataclass
class DataConfig:
    name: str = "synthetic_tiles"
    num_samples: int = 256
    min_tiles: int = 1
    max_tiles: int = 20
    tile_distribution: str = "uniform"  # uniform | geometric
    min_text_tokens: int = 16
    max_text_tokens: int = 128
    seed: int = 1234  # data generation seed (independent of trainer.seed, which drives shuffling/init)
    shuffle: bool = True
    # fail | skip: what a corrupt/missing sample does during training (skips are counted in metrics)
    bad_sample_policy: str = "fail"
    source: Optional[str] = None  # path for file-backed sources (llava json, webdataset, length table)
    image_root: Optional[str] = None


@dataclass
class PackingConfig:
    enabled: bool = True
    seq_length: int = 512  # pack capacity in decoder tokens (image tokens after expansion included)
    # samples per online packing buffer; None = trainer.global_batch_size (each step packs exactly the
    # samples an unpacked step sees)
    buffer_size: Optional[int] = None
    algorithm: str = "default"
    max_images_per_pack: Optional[int] = None  # cap on tiles per pack (ViT memory); None = no cap
    align: int = 1  # pad each pack to a multiple of this (TP/SP/CP/FP8 divisibility)
    segment_align: int = 1  # pad each sample segment to a multiple of this (CP: 2*cp; FP8: 16)
    oversize_policy: str = "error"  # error | truncate | drop
    # unpacked runs: "seq_length" pads every sample to packing.seq_length (the seed's baseline);
    # "none" runs each sample at its own length.
    pad_unpacked_to: str = "seq_length"
    plan: Optional[str] = None  # offline PLAN.jsonl from `mmtrain pack`; None = online packing
    # carry under-filled packs into the next buffer (better fill). None = auto: off when buffer_size
    # equals trainer.global_batch_size, so each step packs exactly the samples an unpacked step sees.
    carry_over: Optional[bool] = None


@dataclass
class BalancingConfig:
    enabled: bool = True
    strategy: str = "default"  # how packs are assigned to (DP rank, micro-batch); see mmtrain.balancing
    pipeline_order: bool = True  # reorder micro-batches to shrink 1F1B bubbles when PP > 1
    # cost-model coefficients (JSON/YAML from `mmtrain calibrate`); None = FLOP formulas of the model shape
    cost_model: Optional[str] = None


@dataclass
class ParallelConfig:
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    sequence_parallel: bool = False
    use_distributed_optimizer: Optional[bool] = None  # None = on with CUDA, off on CPU
    backend: str = "auto"  # auto | nccl | gloo


@dataclass
class TrainerConfig:
    max_steps: int = 10
    global_batch_size: int = 16  # samples per optimizer step
    micro_batch_size: int = 1  # packs (or padded samples when packing is off) per micro-batch
    seed: int = 42
    precision: str = "fp32"  # fp32 | bf16
    output_dir: str = "outputs/run"
    lr: float = 1e-3
    min_lr: float = 0.0
    warmup_steps: int = 0
    lr_decay_style: str = "constant"  # constant | cosine | linear
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    clip_grad: float = 1.0
    device: str = "auto"  # auto | cpu | cuda
    progress_bar: str = "auto"  # auto (only on a terminal) | on | off
    log_sample_ids: bool = False
    save_interval: int = 0  # steps between checkpoints; 0 = only at preemption / end when > 0 steps
    keep_last: int = 2
    resume: str = "auto"  # auto | never | <checkpoint path>
    max_consecutive_nonfinite: int = 3
    exit_code_preempted: int = 75


@dataclass
class ClusterConfig:
    name: str = "cpu"
    accelerator: str = "cpu"
    gpus_per_node: int = 0
    gpu_memory_gb: float = 0.0
    peak_tflops_bf16: float = 0.0  # dense bf16 peak per device, for MFU
    # The launch shape a recipe was designed for; launch/torchrun.py and launch/slurm.py use these as
    # defaults (world size = nodes * procs_per_node, DP = world / (TP * PP)). Training itself ignores them.
    nodes: int = 1
    procs_per_node: int = 1


@dataclass
class MMTrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    packing: PackingConfig = field(default_factory=PackingConfig)
    balancing: BalancingConfig = field(default_factory=BalancingConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    recipe: Optional[str] = None  # name of the recipe that composed this config, if any


def register_configs() -> None:
    """Register the schema so `configs/config.yaml` can list it first in its defaults."""
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    cs.store(name="mmtrain_schema", node=MMTrainConfig)


def to_config(cfg: Any) -> MMTrainConfig:
    """Turn a DictConfig (or None) into the typed dataclass, validating on the way."""
    from omegaconf import OmegaConf

    base = OmegaConf.structured(MMTrainConfig)
    if cfg is not None:
        base = OmegaConf.merge(base, cfg)
    return OmegaConf.to_object(base)  # type: ignore[return-value]


def compose(overrides: list[str] | None = None) -> MMTrainConfig:
    """Compose the Hydra config from Python (tests, the demo, recipe runners)."""
    from pathlib import Path

    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    register_configs()
    config_dir = str(Path(__file__).resolve().parent.parent / "configs")
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=config_dir, version_base=None):
        cfg = hydra_compose(config_name="config", overrides=list(overrides or []))
    return to_config(cfg)


_ = MISSING  # re-exported for config files that need a required field
