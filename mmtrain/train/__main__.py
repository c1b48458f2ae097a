"""Training entry: `python -m mmtrain.train <hydra overrides>`, alone or under torchrun / srun."""

from __future__ import annotations

from mmtrain import quiet

quiet.install()  # before megatron-core is imported

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from mmtrain.config import expand_scale_argv, register_configs, to_config  # noqa: E402

register_configs()


@hydra.main(config_path="../../configs", config_name="config", version_base=None)
def main(dcfg: DictConfig) -> None:
    from mmtrain.parallel import setup
    from mmtrain.train.loop import train

    cfg = to_config(dcfg)
    try:
        summary = train(cfg)
    finally:
        setup.shutdown()
    import os

    if os.environ.get("RANK", "0") == "0":
        print(
            f"[mmtrain] model={cfg.model.name} packing={'on' if cfg.packing.enabled else 'off'} "
            f"steps={summary['steps']} time_per_sample_ms={summary['time_per_sample_ms']:.2f} "
            f"final_loss={summary['final_loss']:.6f}"
        )


if __name__ == "__main__":
    import sys

    from mmtrain.config import ConfigError

    try:  # scale=NAME -> the recipe's overrides, before Hydra parses the command line
        sys.argv[1:] = expand_scale_argv(sys.argv[1:])
    except ConfigError as e:
        sys.exit(f"error: {e}")
    main()
