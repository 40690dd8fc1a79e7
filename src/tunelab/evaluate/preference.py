"""Preference evaluation: does the model prefer the chosen answer, and by how much?

For each pair, with ``log p(y)`` summed over the answer's target tokens (the same tokens
training scores, :mod:`tunelab.objectives.pairs`):

* preference accuracy: ``1[log p(chosen) > log p(rejected)]``, the share of pairs where the
  model puts more probability on the chosen answer;
* reward margin: ``beta * ((log p(c) - log p_ref(c)) - (log p(r) - log p_ref(r)))``, DPO's
  implicit reward difference, where the reference is the base with the adapter switched off
  (without an adapter, the margin is ``beta * (log p(c) - log p(r))``).

Both are means over pairs with percentile-bootstrap intervals
(:func:`tunelab.evaluate.stats.bootstrap_mean_ci`).
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext
from typing import Any

import torch

from tunelab.evaluate.stats import Interval, bootstrap_mean_ci
from tunelab.objectives.pairs import PairLogps, collate_pairs
from tunelab.preference import PreferenceExample


@torch.no_grad()
def pair_logps(model: Any, pairs: Sequence[PreferenceExample], *, batch_size: int = 8,
               reference: bool = False) -> torch.Tensor:
    """``[pairs, 2]`` answer log-probs (chosen, rejected); ``reference``: adapters off."""
    device = next(model.parameters()).device
    scorer = PairLogps(model).eval()
    off = model.disable_adapter() if reference else nullcontext()
    out = []
    with off:
        for start in range(0, len(pairs), batch_size):
            batch = collate_pairs(pairs[start:start + batch_size])
            batch.pop("ref_logps", None)
            batch = {k: v if k.startswith("tunelab_") else v.to(device)
                     for k, v in batch.items()}
            out.append(scorer(**batch)[0].float().cpu().view(-1, 2))
    return torch.cat(out)


def preference_metrics(model: Any, pairs: Sequence[PreferenceExample], *, beta: float = 0.1,
                       batch_size: int = 8, seed: int = 0) -> dict[str, Any]:
    """Accuracy and reward margin with intervals, plus the per-pair values."""
    policy = pair_logps(model, pairs, batch_size=batch_size)
    has_ref = hasattr(model, "disable_adapter")
    ref = (pair_logps(model, pairs, batch_size=batch_size, reference=True) if has_ref
           else torch.zeros_like(policy))
    correct = (policy[:, 0] > policy[:, 1]).float().numpy()
    margin = (beta * ((policy[:, 0] - ref[:, 0]) - (policy[:, 1] - ref[:, 1]))).numpy()
    accuracy: Interval = bootstrap_mean_ci(correct, seed=seed)
    margins: Interval = bootstrap_mean_ci(margin, seed=seed)
    return {"n_pairs": len(pairs), "beta": beta, "reference": "adapter off" if has_ref else None,
            "preference_accuracy": accuracy.to_dict(), "reward_margin": margins.to_dict(),
            "per_pair": [{"chosen_logp": float(p[0]), "rejected_logp": float(p[1]),
                          "correct": bool(c), "margin": float(m)}
                         for p, c, m in zip(policy, correct, margin, strict=True)]}
