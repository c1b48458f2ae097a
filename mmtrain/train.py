"""Training entry: `python -m mmtrain.train <hydra overrides>`, alone or under torchrun / srun."""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from mmtrain.config import register_configs, to_config

register_configs()


@hydra.main(config_path="../configs", config_name="config", version_base=None)
def main(dcfg: DictConfig) -> None:
    from mmtrain.parallel import setup
    from mmtrain.trainer.loop import train

    cfg = to_config(dcfg)
    try:
        summary = train(cfg)
    finally:
        setup.shutdown()
    import torch.distributed as dist  # noqa: F401  (already torn down; rank known from env)
    import os

    if os.environ.get("RANK", "0") == "0":
        print(
            f"[mmtrain] model={cfg.model.name} packing={'on' if cfg.packing.enabled else 'off'} "
            f"steps={summary['steps']} time_per_sample_ms={summary['time_per_sample_ms']:.2f} "
            f"final_loss={summary['final_loss']:.6f}"
        )


if __name__ == "__main__":
    main()
