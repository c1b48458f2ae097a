"""Balancing schema (`balancing=`): how packs form steps and are assigned to DP ranks and micro-batches."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass
class BalancingConfig:
    enabled: bool = True  # false: strategy none, no pipeline reordering
    # default | lpt | karmarkar_karp | none (mmtrain.balancing.assemble): how a window's packs form
    # steps and how a step's packs split over (DP rank, micro-batch)
    strategy: str = "default"
    pipeline_order: bool = True  # reorder micro-batches to shrink 1F1B bubbles when PP > 1
    # steps assembled together: the window of packs is at least this many steps (whole packer buffers)
    window_steps: int = 32
    # cost-model coefficients (JSON/YAML from `mmtrain calibrate`); None = FLOP formulas of the model
    cost_model: Optional[str] = None
    # fit the cost model to the measured per-rank times of this many steps (after the first), then
    # use it; 0 = off (then `mmtrain simulate` predicts exactly the schedule training runs)
    calibrate_steps: int = 0
