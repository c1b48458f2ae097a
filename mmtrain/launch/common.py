"""Helpers shared by the launchers: compose a recipe the way training will, and its launch shape."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]  # the checkout: configs/ and the run folders live here


@dataclass
class LaunchShape:
    recipe: str | None
    nodes: int
    procs_per_node: int
    tp: int
    pp: int
    gpu: bool  # GPUs to request: a GPU cluster config (cluster.gpus_per_node > 0) not forced to trainer.device=cpu
    exit_code_preempted: int
    output_dir: str
    cluster: str

    @property
    def world_size(self) -> int:
        return self.nodes * self.procs_per_node

    @property
    def dp(self) -> int:
        return self.world_size // (self.tp * self.pp)


def hydra_args(recipe: str | None, overrides: list[str]) -> list[str]:
    """The Hydra command line of the training entry, overrides passed through unchanged."""
    return ([f"recipe={recipe}"] if recipe else []) + list(overrides)


def compose_shape(recipe: str | None, overrides: list[str]) -> LaunchShape:
    """Compose the config (fails early, naming the key, on a typo or a wrong type)."""
    from mmtrain.config import compose

    if recipe and not (REPO / "configs" / "recipe" / f"{recipe}.yaml").is_file():
        known = sorted(p.stem for p in (REPO / "configs" / "recipe").glob("*.yaml"))
        raise SystemExit(f"error: unknown recipe {recipe!r} (configs/recipe/ has: {', '.join(known)})")
    try:
        cfg = compose(hydra_args(recipe, overrides))
    except Exception as e:  # hydra / omegaconf errors name the offending key; drop the traceback
        msg = str(e).strip()
        if e.__cause__ is not None:
            msg += "\n  " + str(e.__cause__).strip().replace("\n", "\n  ")
        raise SystemExit(f"error: invalid config ({type(e).__name__}): {msg}") from None
    return LaunchShape(
        recipe=cfg.recipe,
        nodes=cfg.cluster.nodes,
        procs_per_node=cfg.cluster.procs_per_node,
        tp=cfg.parallel.tensor_model_parallel_size,
        pp=cfg.parallel.pipeline_model_parallel_size,
        gpu=cfg.cluster.gpus_per_node > 0 and cfg.trainer.device != "cpu",
        exit_code_preempted=cfg.trainer.exit_code_preempted,
        output_dir=cfg.trainer.output_dir,
        cluster=cfg.cluster.name,
    )


def check_world(world: int, tp: int, pp: int) -> None:
    if world % (tp * pp) != 0:
        raise SystemExit(
            f"error: world size {world} is not a multiple of TP x PP = {tp} x {pp}; "
            "change --nodes/--nproc-per-node or parallel.*"
        )
