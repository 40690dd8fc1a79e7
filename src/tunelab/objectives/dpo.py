"""Direct preference optimisation: prefer the chosen answer, relative to a reference model.

With ``log_ratio(y) = log pi(y|x) - log pi_ref(y|x)`` (sums over the answer's target tokens)
and ``delta = log_ratio(chosen) - log_ratio(rejected)``, the loss of one pair is

* ``sigmoid`` (DPO): ``-(1 - eps) log sigma(beta delta) - eps log sigma(-beta delta)``, where
  ``eps`` is ``label_smoothing`` (conservative DPO: the labels are wrong with probability
  ``eps``; ``eps = 0`` is plain DPO);
* ``ipo``: ``(delta' - 1 / (2 beta))^2`` with ``delta'`` the difference of the log-ratios each
  divided by its answer's token count (TRL's length normalisation of IPO);
* ``hinge`` (SLiC): ``max(0, 1 - beta delta)``.

The step's loss is the mean over its pairs. Rewards are ``beta * log_ratio``; the metrics are
their means over the step's pairs, their margin and the share of pairs whose chosen reward is
higher (preference accuracy).

The reference: with LoRA / QLoRA the base with the adapters switched off
(peft's ``disable_adapter``), so no second copy of the model exists; otherwise (full
fine-tuning, or a run starting from an SFT adapter, whose reference is that starting adapter)
the reference log-probs are computed once before training (``precompute_reference``) and
travel with the batch as ``ref_logps``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from tunelab.objectives.pairs import PairLogps

LOSSES = ("sigmoid", "ipo", "hinge")


def dpo_losses(chosen: torch.Tensor, rejected: torch.Tensor, ref_chosen: torch.Tensor,
               ref_rejected: torch.Tensor, *, beta: float, loss_type: str = "sigmoid",
               label_smoothing: float = 0.0, chosen_tokens: torch.Tensor | None = None,
               rejected_tokens: torch.Tensor | None = None) -> torch.Tensor:
    """Per-pair DPO loss (see the module docstring); all inputs are ``[pairs]`` tensors."""
    chosen_ratio, rejected_ratio = chosen - ref_chosen, rejected - ref_rejected
    if loss_type == "sigmoid":
        delta = beta * (chosen_ratio - rejected_ratio)
        return -(1 - label_smoothing) * F.logsigmoid(delta) - label_smoothing * F.logsigmoid(
            -delta)
    if loss_type == "hinge":
        return torch.relu(1 - beta * (chosen_ratio - rejected_ratio))
    if loss_type == "ipo":
        if chosen_tokens is None or rejected_tokens is None:
            raise ValueError("the IPO loss needs each answer's token count")
        delta = (chosen_ratio / chosen_tokens.clamp(min=1)
                 - rejected_ratio / rejected_tokens.clamp(min=1))
        return (delta - 1 / (2 * beta)) ** 2
    raise ValueError(f"unknown DPO loss {loss_type!r}; allowed: {', '.join(LOSSES)}")


def reward_metrics(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor
                   ) -> dict[str, torch.Tensor]:
    """Sums over pairs (the loop divides by the step's pairs): rewards, margin, accuracy."""
    c, r = chosen_rewards.detach(), rejected_rewards.detach()
    return {"rewards/chosen": c.sum(), "rewards/rejected": r.sum(),
            "rewards/margins": (c - r).sum(), "rewards/accuracy": (c > r).float().sum()}


class DPOObjective(torch.nn.Module):
    """``forward(batch) -> (parts, metrics)``: ``parts = {"pairs": summed pair losses}``."""

    metric_unit = "pairs"

    def __init__(self, model: torch.nn.Module, *, beta: float = 0.1, loss_type: str = "sigmoid",
                 label_smoothing: float = 0.0) -> None:
        super().__init__()
        self.logps = PairLogps(model)
        self.model = model
        self.beta, self.loss_type, self.label_smoothing = beta, loss_type, label_smoothing

    @property
    def backbone(self) -> torch.nn.Module:  # what FSDP shards layer by layer
        return self.logps.backbone

    @staticmethod
    def counts(batch: dict[str, Any]) -> dict[str, int]:
        return {"pairs": int(batch["side"].max()) // 2 + 1 if batch["side"].numel() else 0}

    @torch.no_grad()
    def reference_logps(self, batch: dict[str, Any]) -> torch.Tensor:
        """The reference's answer log-probs: the model with its adapters switched off."""
        disable = getattr(self.model, "disable_adapter", None)
        if disable is None:
            raise RuntimeError("no reference: full fine-tuning needs precomputed reference "
                               "log-probs (precompute_ref)")
        with disable():
            return self.logps(**batch)[0]

    def forward(self, ref_logps: torch.Tensor | None = None, **batch: Any
                ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        logps, counts = self.logps(**batch)
        ref = ref_logps if ref_logps is not None else self.reference_logps(batch)
        losses = dpo_losses(logps[0::2], logps[1::2], ref[0::2], ref[1::2], beta=self.beta,
                            loss_type=self.loss_type, label_smoothing=self.label_smoothing,
                            chosen_tokens=counts[0::2], rejected_tokens=counts[1::2])
        ratios = logps.detach() - ref
        metrics = reward_metrics(self.beta * ratios[0::2], self.beta * ratios[1::2])
        return {"pairs": losses.sum()}, metrics
