"""Preference evaluation: does the model prefer the chosen answer, and by how much?

For each pair, with ``log p(y)`` summed over the answer's target tokens (the same tokens
training scores, :mod:`tunelab.objectives.pairs`), the prompt being the row's own prompt
(few-shot turns included):

* preference accuracy: ``1[log p(chosen) > log p(rejected)]``, the share of pairs where the
  model puts more probability on the chosen answer;
* reward margin: ``beta * ((log p(c) - log p_ref(c)) - (log p(r) - log p_ref(r)))``, DPO's
  implicit reward difference, where the reference is the base with the adapter switched off.
  A model without an adapter (the base itself, a full fine-tune) has no reference here, and
  its margin is ``beta * (log p(c) - log p(r))``; ``reference`` in the results says which.

Both are means over pairs with percentile-bootstrap intervals
(:func:`tunelab.evaluate.stats.bootstrap_mean_ci`), as every task metric is.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from tunelab.data import Record
from tunelab.evaluate.stats import bootstrap_mean_ci
from tunelab.objectives.pairs import PairLogps, collate_pairs
from tunelab.preference import PreferenceExample, encode_pair

REFERENCE_ADAPTER_OFF = "the base, adapter off"


@dataclass
class PairPrompt:
    """One pair as a row asks it: the row's prompt messages and the two answers."""

    id: str
    messages: list[dict[str, str]]
    chosen: str
    rejected: str
    where: str = ""


@dataclass
class PreferenceResult:
    """Per-pair answer log-probs of one system (``ref_*`` empty without a reference)."""

    beta: float
    reference: str | None
    ids: list[str]
    chosen_logp: list[float]
    rejected_logp: list[float]
    ref_chosen_logp: list[float]
    ref_rejected_logp: list[float]

    @property
    def correct(self) -> list[float]:
        return [float(c > r) for c, r in zip(self.chosen_logp, self.rejected_logp, strict=True)]

    @property
    def margins(self) -> list[float]:
        rc = self.ref_chosen_logp or [0.0] * len(self.ids)
        rr = self.ref_rejected_logp or [0.0] * len(self.ids)
        return [self.beta * ((c - a) - (r - b)) for c, r, a, b in
                zip(self.chosen_logp, self.rejected_logp, rc, rr, strict=True)]

    def summary(self, *, seed: int = 0) -> dict[str, Any]:
        """Accuracy and margin, each ``{mean, ci_low, ci_high}`` as task metrics are."""
        def iv(values: list[float]) -> dict[str, float]:
            ci = bootstrap_mean_ci(values, seed=seed)
            return {"mean": ci.estimate, "ci_low": ci.low, "ci_high": ci.high}

        return {"n_pairs": len(self.ids), "beta": self.beta, "reference": self.reference,
                "preference_accuracy": iv(self.correct), "reward_margin": iv(self.margins)}

    def rows(self) -> list[dict[str, Any]]:
        """One readable row per pair (outputs/*.pairs.jsonl)."""
        out = []
        for i, ident in enumerate(self.ids):
            row: dict[str, Any] = {"id": ident, "chosen_logp": round(self.chosen_logp[i], 4),
                                   "rejected_logp": round(self.rejected_logp[i], 4)}
            if self.ref_chosen_logp:
                row.update(ref_chosen_logp=round(self.ref_chosen_logp[i], 4),
                           ref_rejected_logp=round(self.ref_rejected_logp[i], 4))
            row.update(correct=bool(self.correct[i]), margin=round(self.margins[i], 4))
            out.append(row)
        return out


def encode_prompts(pairs: Sequence[PairPrompt], tokenizer: Any
                   ) -> tuple[list[str], list[PreferenceExample]]:
    """Tokenize each pair exactly as preference training would (chat template, answer
    tokens as SFT's targets); pairs with identical answers carry no preference and are
    left out, as training leaves them out."""
    ids, examples = [], []
    for p in pairs:
        path, _, line = p.where.rpartition(", line ")
        record = Record({"prompt": p.messages,
                         "chosen": [{"role": "assistant", "content": p.chosen}],
                         "rejected": [{"role": "assistant", "content": p.rejected}]},
                        path or p.where, int(line) if line.isdigit() else 0)
        ex = encode_pair(record, tokenizer)
        if ex is not None:
            ids.append(p.id)
            examples.append(ex)
    return ids, examples


def has_reference(model: Any) -> bool:
    """An adapter that can be switched off (peft), so the base is the reference."""
    return hasattr(model, "disable_adapter")


@contextmanager
def adapter_off(model: Any) -> Iterator[None]:
    """The base model: adapters disabled. An adapter merged into the weights (compare merges
    LoRA for generation) is unmerged first, as peft requires, and merged back after."""
    merged = any(getattr(m, "merged", False) for m in model.modules())
    if merged:
        model.unmerge_adapter()
    try:
        with model.disable_adapter():
            yield
    finally:
        if merged:
            model.merge_adapter()


@contextmanager
def pair_attention_on(model: Any) -> Iterator[None]:
    """Shared-prompt pair rows need tunelab's packed attention; generation keeps its own."""
    from tunelab.loss import unwrap
    from tunelab.packing import use_packed_attention

    inner = unwrap(model)
    before = inner.config._attn_implementation
    use_packed_attention(model)
    try:
        yield
    finally:
        inner.set_attn_implementation(before)


@torch.no_grad()
def pair_logps(model: Any, pairs: Sequence[PreferenceExample], *, batch_size: int = 8
               ) -> torch.Tensor:
    """``[pairs, 2]`` answer log-probs (chosen, rejected) of ``model`` as it is now."""
    device = next(model.parameters()).device
    scorer = PairLogps(model)
    was_training = model.training
    model.eval()
    out = []
    try:
        for start in range(0, len(pairs), batch_size):
            batch = collate_pairs(pairs[start:start + batch_size])
            batch.pop("ref_logps", None)
            batch = {k: v if k.startswith("tunelab_") else v.to(device)
                     for k, v in batch.items()}
            out.append(scorer(**batch)[0].float().cpu().view(-1, 2))
    finally:
        model.train(was_training)
    return torch.cat(out)


def score_preferences(model: Any, tokenizer: Any, pairs: Sequence[PairPrompt], *,
                      beta: float = 0.1, batch_size: int = 8) -> PreferenceResult:
    """Answer log-probs of every pair under ``model`` and, with an adapter, under the base."""
    ids, examples = encode_prompts(pairs, tokenizer)
    if not examples:
        raise ValueError("no preference pair left: every pair has identical answers")
    with pair_attention_on(model):
        policy = pair_logps(model, examples, batch_size=batch_size)
        ref = None
        if has_reference(model):
            with adapter_off(model):
                ref = pair_logps(model, examples, batch_size=batch_size)
    return PreferenceResult(
        beta=beta, reference=REFERENCE_ADAPTER_OFF if ref is not None else None, ids=ids,
        chosen_logp=policy[:, 0].tolist(), rejected_logp=policy[:, 1].tolist(),
        ref_chosen_logp=ref[:, 0].tolist() if ref is not None else [],
        ref_rejected_logp=ref[:, 1].tolist() if ref is not None else [])
