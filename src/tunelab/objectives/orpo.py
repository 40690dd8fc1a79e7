"""Odds-ratio preference optimisation: SFT on the chosen answer plus a preference term,
in one stage, with no reference model.

With ``l(y) = (1/|y|) sum_j log p(y_j | x, y_<j)``, the mean token log-prob of an answer, the
odds of an answer are ``odds(y) = p / (1 - p)`` with ``p = exp(l(y))``, and

    log_odds = (l(c) - l(r)) - (log(1 - exp l(c)) - log(1 - exp l(r)))
    L = NLL(chosen) - beta * mean_pairs log sigma(log_odds)

where ``NLL(chosen)`` is the mean cross-entropy over every chosen answer token of the step
(the SFT loss, on the answers only). Rewards are ``beta * l(y)`` (TRL's ORPO convention).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from tunelab.objectives.dpo import reward_metrics
from tunelab.objectives.pairs import PairLogps


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """``log(1 - exp(x))`` for ``x < 0``, accurate at both ends (Maechler 2012)."""
    return torch.where(x > -0.6931471805599453, torch.log(-torch.expm1(x)),
                       torch.log1p(-torch.exp(x)))


def odds_ratio_terms(chosen_mean: torch.Tensor, rejected_mean: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(log sigma(log_odds), log_odds)`` per pair from mean token log-probs."""
    chosen_mean, rejected_mean = chosen_mean.float(), rejected_mean.float()
    log_odds = (chosen_mean - rejected_mean) - (log1mexp(chosen_mean) - log1mexp(rejected_mean))
    return F.logsigmoid(log_odds), log_odds


class ORPOObjective(torch.nn.Module):
    """``parts = {"tokens": chosen NLL sum, "pairs": -beta * sum log sigma(log_odds)}``."""

    metric_unit = "pairs"

    def __init__(self, model: torch.nn.Module, *, beta: float = 0.1) -> None:
        super().__init__()
        self.logps = PairLogps(model)
        self.model = model
        self.beta = beta

    @property
    def backbone(self) -> torch.nn.Module:
        return self.logps.backbone

    @staticmethod
    def counts(batch: dict[str, Any]) -> dict[str, int]:
        side = batch["side"]
        return {"pairs": int(side.max()) // 2 + 1 if side.numel() else 0,
                "tokens": int((side % 2 == 0).sum())}

    def forward(self, ref_logps: torch.Tensor | None = None, **batch: Any
                ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        logps, counts = self.logps(**batch)
        mean = logps / counts.clamp(min=1)
        ratio, log_odds = odds_ratio_terms(mean[0::2], mean[1::2])
        metrics = reward_metrics(self.beta * mean[0::2], self.beta * mean[1::2])
        metrics["log_odds_ratio"] = log_odds.detach().sum()
        return {"tokens": -logps[0::2].sum(), "pairs": -self.beta * ratio.sum()}, metrics
