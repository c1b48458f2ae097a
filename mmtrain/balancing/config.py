"""Balancing schema (`balancing=`): how packs are assigned to DP ranks and micro-batches."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass
class BalancingConfig:
    enabled: bool = True
    strategy: str = "default"  # how packs are assigned to (DP rank, micro-batch); see mmtrain.balancing
    pipeline_order: bool = True  # reorder micro-batches to shrink 1F1B bubbles when PP > 1
    # cost-model coefficients (JSON/YAML from `mmtrain calibrate`); None = FLOP formulas of the model shape
    cost_model: Optional[str] = None
