"""Supervised fine-tuning: mean next-token cross-entropy over the step's target tokens.

``parts = {"targets": sum_t -log p(y_t)}``; the loop divides it by the step's target tokens
(all micro-batches and processes), so the gradient is that of the mean over every target token
however the step is split. The computation is :class:`tunelab.loss.TargetLoss`.
"""

from __future__ import annotations

from typing import Any

import torch

from tunelab.data import IGNORE_INDEX
from tunelab.loss import TargetLoss


class SFTObjective(TargetLoss):
    metric_unit = "targets"

    @staticmethod
    def counts(batch: dict[str, Any]) -> dict[str, int]:
        return {"targets": int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())}

    def forward(self, **batch: Any) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        loss_sum, _ = super().forward(**batch)
        return {"targets": loss_sum}, {}
