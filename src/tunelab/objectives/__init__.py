"""Training objectives: each maps a micro-batch to summed loss parts and summed metrics.

An objective is an ``nn.Module`` (so DDP / FSDP see every parameter it uses) with

* ``counts(batch) -> {unit: n}``: how many units (target tokens, pairs) the batch holds;
* ``forward(**batch) -> (parts, metrics)``: ``parts[unit]`` is the loss summed over that
  unit, ``metrics`` are sums over ``metric_unit`` (or over the unit ``metric_units`` names
  for that metric).

The loop divides each part by its unit's count over the whole step (every micro-batch and
process) and adds them: the step's loss is then the mean the objective defines, however the
step is split. It never asks which objective it runs.
"""

from __future__ import annotations

import torch

from tunelab.objectives.dpo import DPOObjective
from tunelab.objectives.orpo import ORPOObjective
from tunelab.objectives.replay_kl import ReplayKLObjective
from tunelab.objectives.sft import SFTObjective

OBJECTIVES = ("sft", "dpo", "orpo")
PREFERENCE = ("dpo", "orpo")

__all__ = ["DPOObjective", "ORPOObjective", "ReplayKLObjective", "SFTObjective",
           "build_objective", "OBJECTIVES"]


def build_objective(cfg, model: torch.nn.Module) -> torch.nn.Module:
    """The objective ``cfg.objective`` names, around ``model``."""
    if cfg.objective == "dpo":
        return DPOObjective(model, beta=cfg.beta, loss_type=cfg.dpo_loss,
                            label_smoothing=cfg.label_smoothing)
    if cfg.objective == "orpo":
        return ORPOObjective(model, beta=cfg.beta)
    if getattr(cfg, "replay_kl", 0.0):
        return ReplayKLObjective(model, weight=cfg.replay_kl)
    return SFTObjective(model)
