"""Start-up noise filter, called first by every entry point (`mmtrain <command>`, `python -m
mmtrain.train`, the launchers).

Why: importing megatron-core on a machine without Transformer Engine, Apex or a CUDA runtime prints
about a dozen warnings about optional fused kernels that mmtrain never uses, which buries the
command's own output (and a run's per-step lines in a Slurm log). Only those known third-party
import-time messages are silenced; warnings from mmtrain itself and anything else still show.
`MMTRAIN_SHOW_WARNINGS=1` turns the filter off.
"""

from __future__ import annotations

import logging
import os
import warnings

# Packages whose import-time UserWarning / FutureWarning / DeprecationWarning are about optional
# kernels or their own deprecations (matched against the module that issues the warning).
_NOISY_MODULES = r"(megatron|transformer_engine|apex|torch\.distributed\.distributed_c10d|torch\.cuda)(\..*)?$"
# Logger -> level below which its records are dropped: megatron's INFO lines about missing optional
# dependencies, GPTModel's deprecation notice (every build), torch's "No CUDA runtime is found".
_NOISY_LOGGERS = {
    "megatron": logging.WARNING,
    "megatron.core.models.gpt.gpt_model": logging.ERROR,
    "torch.utils.cpp_extension": logging.ERROR,
}


def install() -> None:
    """Silence the known third-party start-up warnings (idempotent)."""
    if os.environ.get("MMTRAIN_SHOW_WARNINGS", "") not in ("", "0"):
        return
    for category in (UserWarning, FutureWarning, DeprecationWarning):
        warnings.filterwarnings("ignore", category=category, module=_NOISY_MODULES)
    for name, level in _NOISY_LOGGERS.items():
        logging.getLogger(name).setLevel(level)
