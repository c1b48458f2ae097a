"""The root config schema behind the Hydra groups in `configs/`: the composition of each stage's own
schema (`<stage>/config.py`, beside the code that reads it).

Every YAML file is merged onto these dataclasses, so a misspelt key or a wrong type fails at
composition time with a message naming the key (OmegaConf struct mode) instead of being ignored.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from omegaconf import MISSING

from mmtrain.balancing.config import BalancingConfig
from mmtrain.data.config import SOURCES, DataConfig, LengthsData, LlavaJsonData, SyntheticTilesData
from mmtrain.models.config import DecoderConfig, ModelConfig, ProjectorConfig, VisionConfig
from mmtrain.packing.config import PackingConfig
from mmtrain.parallel.config import ParallelConfig, PerfConfig
from mmtrain.train.config import TrainerConfig

__all__ = [
    "BalancingConfig", "ClusterConfig", "ConfigError", "DataConfig", "DecoderConfig", "LengthsData", "LlavaJsonData",
    "MMTrainConfig", "ModelConfig", "PackingConfig", "ParallelConfig", "PerfConfig", "ProjectorConfig",
    "SyntheticTilesData", "TrainerConfig", "VisionConfig", "compose", "expand_scale", "register_configs", "to_config",
]


@dataclass
class ClusterConfig:
    name: str = "cpu"
    gpus_per_node: int = 0  # > 0: a GPU cluster (trainer.device=auto then means CUDA, and refuses a machine without it)
    gpu_memory_gb: float = 0.0
    peak_tflops_bf16: float = 0.0  # dense bf16 peak per device, for MFU
    # The launch shape a recipe was designed for; mmtrain.launch.torchrun and mmtrain.launch.slurm use these as
    # defaults (world size = nodes * procs_per_node, DP = world / (TP * PP)). Training itself ignores them.
    nodes: int = 1
    procs_per_node: int = 1
    accelerator: Optional[str] = None  # removed: set only to fail naming trainer.device


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
    # scale=NAME runs the recipe at one of its `scales` (a list of overrides each, e.g. `smoke`: the
    # tiny-model CPU run of the same experiment); `full` (the default) is the recipe as written.
    # Applied by `expand_scale` before composition, so command-line overrides still win.
    scale: str = "full"
    # (without a recipe, scale=smoke adds nothing: the default config is already the CPU smoke)
    scales: Dict[str, List[str]] = field(default_factory=lambda: {"smoke": []})


def register_configs() -> None:
    """Register the schema so `configs/config.yaml` can list it first in its defaults."""
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    cs.store(name="mmtrain_schema", node=MMTrainConfig)
    for name, schema in SOURCES.items():  # configs/data/<name>.yaml extends <name>_schema
        cs.store(group="data", name=f"{name}_schema", node=schema)


class ConfigError(ValueError):
    """A key that is not in the schema, a value of the wrong type, or a config group option that does
    not exist; the message starts with the key (or `group=option`) and says what would be valid."""


# Renamed or removed keys: the old name stays in the schema only to fail naming what replaces it.
RENAMED = {
    ("packing", "max_images_per_pack"): "use packing.max_tiles_per_pack",
    ("cluster", "accelerator"): "the device is trainer.device=auto|cpu|cuda (auto is CUDA on a cluster "
                                "with gpus_per_node > 0)",
    ("parallel", "backend"): "the process-group backend follows trainer.device (nccl on CUDA, gloo on the CPU)",
}


def _check_renamed(out: MMTrainConfig) -> None:
    for (group, old), new in RENAMED.items():
        if getattr(getattr(out, group), old) is not None:
            raise ConfigError(f"{group}.{old} was renamed or removed: {new}")


def _override_key(override: str) -> str:
    """`model=tiny` -> model, `+trainer.x=1` -> trainer.x, `override /cluster=cpu` -> cluster."""
    key = override.split("=", 1)[0].strip()
    key = key.removeprefix("override ").lstrip("+~").strip().lstrip("/")
    return key.split("@", 1)[0]


def expand_scale(overrides: list[str]) -> list[str]:
    """Hydra overrides with `scale=NAME` replaced by the chosen recipe's `scales.NAME` overrides,
    placed first, minus any key the caller sets and any data.* key that the caller's `data=` source
    does not have (the caller's settings win). `recipe=R cluster=cpu` without a scale means
    scale=smoke, the form the smoke had before scales existed (`scale=full` runs the full experiment
    on the CPU). Every entry point (training, the launchers, compare, simulate, pack, analyze, eval)
    composes through this."""
    overrides = list(overrides)
    chosen = [o for o in overrides if _override_key(o) == "scale" and "=" in o]
    values = {_override_key(o): o.split("=", 1)[1].strip() for o in overrides if "=" in o}
    if chosen:
        scale = chosen[-1].split("=", 1)[1].strip()
    elif values.get("recipe") and values.get("cluster") == "cpu":
        scale = "smoke"
    else:
        return overrides
    rest = [o for o in overrides if o not in chosen]
    if scale == "full":
        return rest
    cfg = _hydra_compose(rest)
    scales = dict(cfg.scales or {})
    if scale not in scales:
        where = f"recipe {cfg.recipe}" if cfg.recipe else "the root config (no recipe chosen)"
        raise ConfigError(f"scale={scale}: {where} has no such scale (scales: full, {', '.join(sorted(scales)) or '-'})")
    given = {_override_key(o) for o in rest}
    # a key the caller sets wins; a data source the caller chooses keeps only the scale's keys it has
    # (data=lengths drops the smoke's data.num_samples=64, a synthetic-only field)
    chosen_data = [o.split("=", 1)[1].strip() for o in rest if _override_key(o) == "data"]
    fields = set(SOURCES[chosen_data[-1]].__dataclass_fields__) if chosen_data and chosen_data[-1] in SOURCES else None

    def keep(o: str) -> bool:
        key = _override_key(o)
        if key in given:
            return False
        return fields is None or not key.startswith("data.") or key.split(".", 1)[1] in fields

    added = [o for o in scales[scale] if keep(o)]
    return added + rest + [f"scale={scale}"]


def _unknown_keys(node: Any, schema: type, prefix: str = "") -> list[str]:
    """Keys of `node` that the dataclass `schema` (recursively) does not have: `+group.key=...`
    forces a key into a structured config, where it would otherwise be carried and ignored."""
    import dataclasses
    import typing

    from omegaconf import DictConfig, OmegaConf

    hints = typing.get_type_hints(schema)
    names = {f.name for f in dataclasses.fields(schema)}
    out = []
    for k in node.keys():
        if k not in names:
            out.append(f"{prefix}{k}")
            continue
        sub = node._get_node(k)
        kind = hints.get(k)
        actual = OmegaConf.get_type(sub) if isinstance(sub, DictConfig) and not sub._is_none() else None
        if dataclasses.is_dataclass(kind) and dataclasses.is_dataclass(actual) and issubclass(actual, kind):
            kind = actual  # e.g. data: the chosen source's own schema (LengthsData, ...)
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
    if groups == ["data"]:  # each data=<source> owns its fields: say whose field it is
        owners = [n for n, c in SOURCES.items() if leaf in {f.name for f in dataclasses.fields(c)}]
        if owners:
            return (f"{key}: not a field of this data source; {leaf} belongs to data={' | data='.join(owners)} "
                    "(each source has its own fields: mmtrain/data/config.py)")
        names = sorted({f.name for c in SOURCES.values() for f in dataclasses.fields(c)})
        close = difflib.get_close_matches(leaf, names, n=1)
        return f"{key}: no such config key in data" + (f" (did you mean data.{close[0]}?)" if close else "")
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


def expand_scale_argv(argv: list[str]) -> list[str]:
    """`expand_scale` on a Hydra command line: flags (`--cfg job`, `-m`) and `hydra.*` keys pass through."""
    plain = [a for a in argv if "=" in a and not a.startswith("-") and not _override_key(a).startswith("hydra.")]
    flags = [a for a in argv if a not in plain]
    return flags + expand_scale(plain)


def _hydra_compose(overrides: list[str]):
    from pathlib import Path

    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    register_configs()
    config_dir = str(Path(__file__).resolve().parent.parent / "configs")
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=config_dir, version_base=None):
            return hydra_compose(config_name="config", overrides=list(overrides))
    except Exception as e:  # noqa: BLE001 - Hydra's composition errors get a message naming the key
        err = _composition_error(e)
        if err is e:
            raise
        raise err from e


def compose(overrides: list[str] | None = None) -> MMTrainConfig:
    """Compose the Hydra config from Python (tests, the CLIs, the launchers), `scale=` applied."""
    return to_config(_hydra_compose(expand_scale(list(overrides or []))))


_ = MISSING  # re-exported for config files that need a required field
