"""The root config schema behind the Hydra groups in `configs/`: the composition of each stage's own
schema (`<stage>/config.py`, beside the code that reads it).

Every YAML file is merged onto these dataclasses, so a misspelt key or a wrong type fails at
composition time with a message naming the key (OmegaConf struct mode) instead of being ignored.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from omegaconf import MISSING

from mmtrain.balancing.config import BalancingConfig
from mmtrain.data.config import DataConfig
from mmtrain.models.config import DecoderConfig, ModelConfig, ProjectorConfig, VisionConfig
from mmtrain.packing.config import PackingConfig
from mmtrain.parallel.config import ParallelConfig, PerfConfig
from mmtrain.train.config import TrainerConfig

__all__ = [
    "BalancingConfig", "ClusterConfig", "ConfigError", "DataConfig", "DecoderConfig", "MMTrainConfig", "ModelConfig",
    "PackingConfig", "ParallelConfig", "PerfConfig", "ProjectorConfig", "TrainerConfig", "VisionConfig", "compose",
    "register_configs", "to_config",
]


@dataclass
class ClusterConfig:
    name: str = "cpu"
    accelerator: str = "cpu"
    gpus_per_node: int = 0
    gpu_memory_gb: float = 0.0
    peak_tflops_bf16: float = 0.0  # dense bf16 peak per device, for MFU
    # The launch shape a recipe was designed for; mmtrain.launch.torchrun and mmtrain.launch.slurm use these as
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
    perf: PerfConfig = field(default_factory=PerfConfig)
    recipe: Optional[str] = None  # name of the recipe that composed this config, if any


def register_configs() -> None:
    """Register the schema so `configs/config.yaml` can list it first in its defaults."""
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    cs.store(name="mmtrain_schema", node=MMTrainConfig)


class ConfigError(ValueError):
    """A key that is not in the schema, a value of the wrong type, or a config group option that does
    not exist; the message starts with the key (or `group=option`) and says what would be valid."""


# Renamed keys: the old name stays in the schema only to fail naming the new one.
RENAMED = {("packing", "max_images_per_pack"): "packing.max_tiles_per_pack"}


def _check_renamed(out: MMTrainConfig) -> None:
    for (group, old), new in RENAMED.items():
        if getattr(getattr(out, group), old) is not None:
            raise ConfigError(f"{group}.{old} was renamed: use {new}")


def _unknown_keys(node: Any, schema: type, prefix: str = "") -> list[str]:
    """Keys of `node` that the dataclass `schema` (recursively) does not have: `+group.key=...`
    forces a key into a structured config, where it would otherwise be carried and ignored."""
    import dataclasses
    import typing

    from omegaconf import DictConfig

    hints = typing.get_type_hints(schema)
    names = {f.name for f in dataclasses.fields(schema)}
    out = []
    for k in node.keys():
        if k not in names:
            out.append(f"{prefix}{k}")
            continue
        sub = node._get_node(k)
        kind = hints.get(k)
        if isinstance(sub, DictConfig) and not sub._is_none() and dataclasses.is_dataclass(kind):
            out += _unknown_keys(sub, kind, f"{prefix}{k}.")
    return out


def _no_such_key(key: str) -> str:
    """`key`'s message: the closest existing key of its group, else the group's keys."""
    import dataclasses
    import difflib
    import typing

    schema: Any = MMTrainConfig
    *groups, leaf = key.split(".")
    for g in groups:
        kind = typing.get_type_hints(schema).get(g)
        if not dataclasses.is_dataclass(kind):
            return f"{key}: no such config key ({'.'.join(groups[: groups.index(g)]) or 'the config'} has no group {g!r})"
        schema = kind
    names = [f.name for f in dataclasses.fields(schema)]
    where = ".".join(groups) or "the config"
    close = difflib.get_close_matches(leaf, names, n=1)
    hint = f"did you mean {'.'.join([*groups, close[0]])}?" if close else f"{where} has: {', '.join(names)}"
    return f"{key}: no such config key in {where} ({hint})"


def _composition_error(e: Exception) -> Exception:
    """Hydra's / OmegaConf's composition error as a ConfigError naming the key; others unchanged."""
    import dataclasses

    from hydra.errors import ConfigCompositionException, MissingConfigException
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError, ValidationError

    if isinstance(e, MissingConfigException) and e.missing_cfg_file and "/" in e.missing_cfg_file:
        group, option = e.missing_cfg_file.rsplit("/", 1)
        options = ", ".join(e.options or []) or "none"
        return ConfigError(f"{group}={option}: no such {group} config (choose one of: {options})")
    cause = e.__cause__
    if isinstance(e, ConfigCompositionException) and isinstance(cause, (ConfigAttributeError, ConfigKeyError)) and cause.full_key:
        key = str(cause.full_key)
        if isinstance(cause, ConfigKeyError) and "." not in key:  # an unknown top-level group
            return ConfigError(f"{key}: no such config group (groups: {', '.join(f.name for f in dataclasses.fields(MMTrainConfig))})")
        return ConfigError(_no_such_key(key))
    if isinstance(e, ConfigCompositionException) and isinstance(cause, ValidationError) and cause.full_key:
        why = str(cause.msg).splitlines()[0]
        return ConfigError(f"{cause.full_key}: {why}")
    return e


def to_config(cfg: Any) -> MMTrainConfig:
    """Turn a DictConfig (or None) into the typed dataclass, validating on the way. Under
    `model.architecture=pretrained` (model=hf) the model keys are filled from the checkpoint's
    config.json here, so every stage (data, cost model, checkpoints) sees the real architecture."""
    from omegaconf import OmegaConf

    base = OmegaConf.structured(MMTrainConfig)
    if cfg is not None:
        base = OmegaConf.merge(base, cfg)
        unknown = _unknown_keys(base, MMTrainConfig)
        if unknown:
            raise ConfigError("; ".join(_no_such_key(k) for k in unknown))
    out: MMTrainConfig = OmegaConf.to_object(base)  # type: ignore[assignment]
    _check_renamed(out)
    if out.model.architecture == "pretrained":
        from mmtrain.models.hf import resolve

        out.model = resolve(out.model)
    return out


def compose(overrides: list[str] | None = None) -> MMTrainConfig:
    """Compose the Hydra config from Python (tests, the demo, recipe runners)."""
    from pathlib import Path

    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    register_configs()
    config_dir = str(Path(__file__).resolve().parent.parent / "configs")
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=config_dir, version_base=None):
            cfg = hydra_compose(config_name="config", overrides=list(overrides or []))
    except Exception as e:  # noqa: BLE001 - Hydra's composition errors get a message naming the key
        err = _composition_error(e)
        if err is e:
            raise
        raise err from e
    return to_config(cfg)


_ = MISSING  # re-exported for config files that need a required field
