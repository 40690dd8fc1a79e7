"""SFT plus a pull towards the base model's distribution on replay rows (``replay_kl``).

On the target positions ``R`` of replay rows (the batch's :data:`tunelab.data.REPLAY_KEY`),
with ``p_base`` the base model's next-token distribution and ``p`` the trained model's,

    KL_t = sum_v p_base(v | x_<t) (log p_base(v | x_<t) - log p(v | x_<t))

and the step's loss is ``mean_{t in targets} -log p(y_t) + replay_kl * mean_{t in R} KL_t``:
the objective returns ``parts = {"targets": CE sum, "replay_targets": replay_kl * KL sum}``
and the loop divides each by its unit's count over the whole step (tunelab.objectives).
The cross-entropy alone fits the base's greedy answers; the KL term also keeps the rest of
the base's distribution (the tokens it did not pick), as distillation does.

The base is the model with its LoRA adapters switched off (peft's ``disable_adapter``): no
second copy of the weights, one extra forward without gradients on a micro-batch that
holds a replay row. At step 0 LoRA's ``B = 0``, so model and base agree and the term is 0.

The term is a training regulariser: in eval mode (validation) only the cross-entropy is
computed, so validation losses compare with those of runs without it. The ``replay_kl``
metric is the step's mean KL per replay target token.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Any

import torch
import torch.nn.functional as F

from tunelab.data import IGNORE_INDEX, REPLAY_KEY
from tunelab.objectives.sft import SFTObjective


def kl_to_base_sum(logits: torch.Tensor, base_logits: torch.Tensor) -> torch.Tensor:
    """``sum_t KL(p_base_t || p_t)`` over rows of ``[n, vocab]`` logits (fp32)."""
    return F.kl_div(F.log_softmax(logits.float(), dim=-1),
                    F.log_softmax(base_logits.float(), dim=-1),
                    log_target=True, reduction="sum")


def replay_targets(batch: dict[str, Any]) -> torch.Tensor:
    """Bool ``[rows, T-1]``: the predicted positions whose target belongs to a replay row."""
    targets = batch["labels"][:, 1:] != IGNORE_INDEX
    flag = batch.get(REPLAY_KEY)
    return targets & flag[:, 1:].to(targets.device) if flag is not None \
        else torch.zeros_like(targets)


class ReplayKLObjective(SFTObjective):
    """``forward(batch) -> (parts, metrics)``: SFT's cross-entropy and the weighted KL sum
    over replay target tokens (module docstring)."""

    metric_unit = "targets"
    metric_units = {"replay_kl": "replay_targets"}  # averaged over replay target tokens

    def __init__(self, model: torch.nn.Module, *, weight: float) -> None:
        super().__init__(model)
        self.weight = weight

    @staticmethod
    def counts(batch: dict[str, Any]) -> dict[str, int]:
        return {"targets": int((batch["labels"][:, 1:] != IGNORE_INDEX).sum()),
                "replay_targets": int(replay_targets(batch).sum())}

    def base(self) -> AbstractContextManager[Any]:
        """The base model: the adapters switched off for the ``with`` block."""
        disable = getattr(self.model, "disable_adapter", None)
        if disable is None:
            raise RuntimeError("replay_kl needs a LoRA model (the base is the model with its "
                               "adapters off)")
        return disable()

    def forward(self, **batch: Any) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        hidden = self.hidden_states(**{k: v for k, v in batch.items() if k != "labels"})
        loss_sum, _ = self.target_loss(hidden, batch["labels"])
        if not self.training:
            return {"targets": loss_sum}, {}
        picked = replay_targets(batch)
        if not bool(picked.any()):
            # the same metric keys on every micro-batch and process: the loop all-reduces them
            return {"targets": loss_sum}, {"replay_kl": loss_sum.new_zeros(())}
        logits = self.logits(hidden[:, :-1][picked])
        with torch.no_grad(), self.base():
            base_hidden = self.hidden_states(**{k: v for k, v in batch.items() if k != "labels"})
            base_logits = self.logits(base_hidden[:, :-1][picked])
        kl = kl_to_base_sum(logits, base_logits)
        return ({"targets": loss_sum, "replay_targets": self.weight * kl},
                {"replay_kl": kl.detach()})
