"""Did fine-tuning make the model forget? Measure general ability before and after.

Two measures, each computed on the base model ("before") and on the fine-tuned model
("after"), on exactly the same items, so the change gets a *paired* bootstrap interval
(:func:`tunelab.evaluate.verdict.forgetting_summary`):

* **general-text perplexity**: token-weighted perplexity on a fixed set of English prose
  paragraphs (higher after = worse);
* **general-knowledge probe**: accuracy on tunelab's multiple-choice probe, per-item 0/1
  (lower after = worse), and on every harness task the user adds.

**Which general text.** It must exist on a fresh machine without network, be legal to use,
and be the same for before and after. We use the prose paragraphs of Python's own reference
documentation, ``pydoc_data.topics``: it is part of the standard library of every CPython
(it backs ``help()``), released under the PSF licence, and is plain technical English
that none of a user's fine-tuning data is likely to be. Shipping an excerpt of a
public-domain book would add a licence-bearing asset for no gain in what the measure
tells, and a dataset download would break offline use. Only prose paragraphs are kept
(grammar productions and code examples are dropped by :func:`_is_prose`), and the texts are
cut to :data:`DOC_TOKENS` tokens so the measure takes seconds. The exact text depends on the
Python version; before and after are always computed in the same process, so the *change*
is comparable. If a stripped-down Python lacks ``pydoc_data``, the perplexity measure is
skipped with a message rather than failing the run.

**Which probe.** :mod:`tunelab.evaluate.probe`: 252 multiple-choice items in five skills
(facts, language, arithmetic, reasoning, code reading), shipped under CC0, scored by
log-likelihood over the choices through lm-evaluation-harness when it is installed (else by
tunelab's own scorer, same numbers). The quickstart's task is about countries (capital,
region, population, currency), so a capital-city probe would measure the training data, not
general ability: no item is about countries, capitals, currencies or populations. A user's
own harness tasks (``--probe-task FILE.yaml``) are measured beside it, each its own item.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from tunelab.evaluate.probe import ProbeResult, load_probe, run_probes

log = logging.getLogger(__name__)

GENERAL_TEXT_SOURCE = "pydoc_data.topics (Python reference manual prose, PSF licence)"
N_DOCS = 32
DOC_TOKENS = 128
MIN_PARAGRAPH_CHARS = 300

def _is_prose(paragraph: str) -> bool:
    """A paragraph of running English text: not indented (code, grammar), mostly letters,
    ending a sentence, and long enough to be worth a perplexity."""
    lines = paragraph.splitlines()
    if not lines or any(line.startswith((" ", "\t")) for line in lines):
        return False
    text = " ".join(line.strip() for line in lines)
    if len(text) < MIN_PARAGRAPH_CHARS or not text.endswith("."):
        return False
    letters = sum(c.isalpha() or c.isspace() for c in text)
    if letters / len(text) < 0.9 or "::=" in text or ">>>" in text:
        return False
    return True


def general_texts(n_docs: int = N_DOCS) -> list[str]:
    """Up to ``n_docs`` prose paragraphs from ``pydoc_data.topics``, one per topic (sorted
    topics, first prose paragraph of each), so the set is spread over the manual."""
    try:
        from pydoc_data.topics import topics
    except ImportError:  # a stripped Python without pydoc_data
        return []
    docs = []
    for name in sorted(topics):
        for paragraph in re.split(r"\n\s*\n", topics[name]):
            if _is_prose(paragraph):
                docs.append(" ".join(line.strip() for line in paragraph.splitlines()))
                break
        if len(docs) >= n_docs:
            break
    return docs


@dataclass
class GeneralAbility:
    """One model's general-ability numbers: per-document ``(nll_sum, n_tokens)`` on the
    general text, per-item 0/1 scores on tunelab's probe (with the chosen answers, for
    reading), and every probe task's full result (tunelab's first, then the user's)."""

    ppl_docs: list[tuple[float, int]] | None = None
    probe_scores: list[float] | None = None
    probe_answers: list[str] = field(default_factory=list)
    seconds: float = 0.0
    probes: list[ProbeResult] = field(default_factory=list)

    @property
    def extra_probes(self) -> list[ProbeResult]:
        """The user's probe tasks (every task after tunelab's own)."""
        return self.probes[1:]

    def to_dict(self, *, seed: int = 0) -> dict[str, Any]:
        from tunelab.evaluate.stats import corpus_perplexity

        own = self.probes[0] if self.probes else None
        items = load_probe() if own is not None else []
        return {"perplexity": corpus_perplexity(self.ppl_docs) if self.ppl_docs else None,
                "probe_accuracy": (sum(self.probe_scores) / len(self.probe_scores)
                                   if self.probe_scores else None),
                "probe_backend": own.backend if own else None,
                "probe_by_skill": own.by_skill() if own else {},
                "probe": [{"id": it.id, "skill": it.skill, "question": it.question,
                           "choices": list(it.choices), "gold": it.choices[it.answer],
                           "picked": a, "score": s}
                          for it, a, s in zip(items, self.probe_answers,
                                              self.probe_scores or [], strict=False)],
                "probe_tasks": [r.to_dict(seed=seed) for r in self.extra_probes],
                "seconds": round(self.seconds, 2)}


def measure_general_ability(model: Any, tokenizer: Any, *, batch_size: int = 16,
                            progress: bool = True, desc: str = "general",
                            n_docs: int = N_DOCS, doc_tokens: int = DOC_TOKENS,
                            probe_tasks: Sequence[str] = ()) -> GeneralAbility:
    """Perplexity on :func:`general_texts`, accuracy on tunelab's probe and on every harness
    task of ``probe_tasks`` (:func:`tunelab.evaluate.probe.run_probes`) for one model."""
    import time

    from tunelab.evaluate.run import text_nll

    start = time.perf_counter()
    texts = general_texts(n_docs)
    result = GeneralAbility()
    if texts:
        result.ppl_docs = text_nll(model, tokenizer, texts, max_tokens=doc_tokens,
                                   batch_size=batch_size, progress=progress,
                                   desc=f"{desc}: text perplexity")
    else:
        log.warning("pydoc_data is not installed in this Python: skipping the general-text "
                    "perplexity part of the forgetting check")
    result.probes = run_probes(model, tokenizer, probe_tasks, batch_size=batch_size,
                               progress=progress, desc=f"{desc}: probe")
    own = result.probes[0]
    result.probe_scores = list(own.scores)
    result.probe_answers = [_choice_text(it.choices, p) for it, p in
                            zip(load_probe(), own.picks, strict=True)]
    result.seconds = time.perf_counter() - start
    return result


def _choice_text(choices: Sequence[str], pick: int) -> str:
    return choices[pick] if 0 <= pick < len(choices) else ""


def forgetting_items(name: str | None, before: GeneralAbility, after: GeneralAbility,
                     *, seed: int = 0) -> list[Any]:
    """The :class:`~tunelab.evaluate.verdict.ForgettingItem` list of one fine-tuned system
    (perplexity, tunelab's probe, then each user probe task measured on both); names are
    prefixed with the system's name when given (several systems in one report)."""
    from tunelab.evaluate.verdict import perplexity_forgetting, score_forgetting

    prefix = f"{name}: " if name else ""
    items = []
    if before.ppl_docs and after.ppl_docs:
        items.append(perplexity_forgetting(f"{prefix}general-text perplexity",
                                           before.ppl_docs, after.ppl_docs, seed=seed))
    if before.probe_scores and after.probe_scores:
        items.append(score_forgetting(f"{prefix}general-knowledge probe accuracy",
                                      before.probe_scores, after.probe_scores, seed=seed))
    after_tasks = {r.task: r for r in after.extra_probes}
    for b in before.extra_probes:
        a = after_tasks.get(b.task)
        if a is not None and a.scores and b.scores:
            items.append(score_forgetting(f"{prefix}{b.task} {b.metric}", b.scores, a.scores,
                                          seed=seed))
    return items


def summarize_forgetting(before: GeneralAbility, after: dict[str, GeneralAbility],
                         *, seed: int = 0) -> Any:
    """One :class:`~tunelab.evaluate.verdict.ForgettingSummary` over every fine-tuned
    system in ``after`` (names prefix the items only when there are several)."""
    from tunelab.evaluate.verdict import forgetting_summary

    several = len(after) > 1
    items = []
    for name, ability in after.items():
        items.extend(forgetting_items(name if several else None, before, ability, seed=seed))
    return forgetting_summary(extra=items, seed=seed)
