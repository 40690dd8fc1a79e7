"""Did fine-tuning make the model forget? Measure general ability before and after.

Two measures, each computed on the base model ("before") and on the fine-tuned model
("after"), on exactly the same items, so the change gets a *paired* bootstrap interval
(:func:`tunelab.evaluate.verdict.forgetting_summary`):

* **general-text perplexity**: token-weighted perplexity on a fixed set of English prose
  paragraphs (higher after = worse);
* **general-knowledge probe**: accuracy on :data:`PROBE`, short factual questions scored
  with the ``contains`` metric against a list of accepted answers (lower after = worse).

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

**Which probe.** The quickstart's task is about countries (capital, region, population,
currency), so a capital-city probe would measure the training data, not general
knowledge. :data:`PROBE` asks 30 everyday science, language, arithmetic and culture questions
and deliberately none about countries, capitals, currencies or populations.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from tunelab.evaluate.metrics import contains

log = logging.getLogger(__name__)

GENERAL_TEXT_SOURCE = "pydoc_data.topics (Python reference manual prose, PSF licence)"
N_DOCS = 32
DOC_TOKENS = 128
MIN_PARAGRAPH_CHARS = 300

# (question, accepted answers). Scored with `contains` (normalised, whole words) against any
# accepted answer. No item is about countries, capitals, currencies or populations, which is
# what the quickstart's task trains on.
PROBE: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("What is the chemical symbol for gold?", ("Au",)),
    ("How many legs does a spider have?", ("8", "eight")),
    ("Who wrote the play Romeo and Juliet?", ("Shakespeare",)),
    ("Which planet is known as the Red Planet?", ("Mars",)),
    ("What is the largest planet in our solar system?", ("Jupiter",)),
    ("What gas do plants absorb from the air for photosynthesis?",
     ("carbon dioxide", "CO2")),
    ("At how many degrees Celsius does water boil at sea level?", ("100",)),
    ("How many days are there in a week?", ("7", "seven")),
    ("What is the opposite of the word hot?", ("cold",)),
    ("How many sides does a triangle have?", ("3", "three")),
    ("What is 7 times 8?", ("56", "fifty-six", "fifty six")),
    ("What is the largest mammal on Earth?", ("blue whale",)),
    ("Who painted the Mona Lisa?", ("Leonardo", "da Vinci")),
    ("Which organ pumps blood through the human body?", ("heart",)),
    ("What sweet food do bees make?", ("honey",)),
    ("What is the hardest natural substance?", ("diamond", "diamonds")),
    ("How many hours are there in a day?", ("24", "twenty-four", "twenty four")),
    ("What colour do you get by mixing blue and yellow paint?", ("green",)),
    ("Which star is at the centre of our solar system?", ("Sun",)),
    ("What is the chemical formula of water?", ("H2O",)),
    ("Who developed the theory of relativity?", ("Einstein",)),
    ("What is the square root of 81?", ("9", "nine")),
    ("What is the past tense of the verb go?", ("went",)),
    ("Which animal is known as the king of the jungle?", ("lion",)),
    ("How many minutes are in an hour?", ("60", "sixty")),
    ("Which planet is closest to the Sun?", ("Mercury",)),
    ("Which musical instrument has 88 black and white keys?", ("piano",)),
    ("What is the plural of the word mouse?", ("mice",)),
    ("Who was the first person to walk on the Moon?", ("Armstrong",)),
    ("What do caterpillars turn into?", ("butterfly", "butterflies", "moth", "moths")),
)
PROBE_SUFFIX = " Answer in a few words."
PROBE_MAX_NEW_TOKENS = 24


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


def probe_prompts() -> list[str]:
    return [q + PROBE_SUFFIX for q, _ in PROBE]


def score_probe(answers: Sequence[str]) -> list[float]:
    """1.0 where an answer contains one of the accepted answers of its probe question."""
    return [max(contains(a, ok) for ok in accepted)
            for a, (_, accepted) in zip(answers, PROBE, strict=True)]


@dataclass
class GeneralAbility:
    """One model's general-ability numbers: per-document ``(nll_sum, n_tokens)`` on the
    general text and per-question 0/1 probe scores (with the answers, for reading)."""

    ppl_docs: list[tuple[float, int]] | None = None
    probe_scores: list[float] | None = None
    probe_answers: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        from tunelab.evaluate.stats import corpus_perplexity

        return {"perplexity": corpus_perplexity(self.ppl_docs) if self.ppl_docs else None,
                "probe_accuracy": (sum(self.probe_scores) / len(self.probe_scores)
                                   if self.probe_scores else None),
                "probe": [{"question": q, "accepted": list(ok), "answer": a, "score": s}
                          for (q, ok), a, s in zip(PROBE, self.probe_answers,
                                                   self.probe_scores or [], strict=False)],
                "seconds": round(self.seconds, 2)}


def measure_general_ability(model: Any, tokenizer: Any, *, batch_size: int = 16,
                            progress: bool = True, desc: str = "general",
                            n_docs: int = N_DOCS, doc_tokens: int = DOC_TOKENS
                            ) -> GeneralAbility:
    """Perplexity on :func:`general_texts` and accuracy on :data:`PROBE` for one model."""
    import time

    from tunelab.evaluate.run import generate_batched, text_nll
    from tunelab.generate import GenerationSettings, build_prompt

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
    prompts = [build_prompt(tokenizer, p) for p in probe_prompts()]
    outs = generate_batched(model, tokenizer, prompts,
                            GenerationSettings(max_new_tokens=PROBE_MAX_NEW_TOKENS),
                            batch_size=batch_size, progress=progress, desc=f"{desc}: probe")
    result.probe_answers = [o["text"] for o in outs]
    result.probe_scores = score_probe(result.probe_answers)
    result.seconds = time.perf_counter() - start
    return result


def forgetting_items(name: str | None, before: GeneralAbility, after: GeneralAbility,
                     *, seed: int = 0) -> list[Any]:
    """The :class:`~tunelab.evaluate.verdict.ForgettingItem` list of one fine-tuned system;
    names are prefixed with the system's name when given (several systems in one report)."""
    from tunelab.evaluate.verdict import perplexity_forgetting, score_forgetting

    prefix = f"{name}: " if name else ""
    items = []
    if before.ppl_docs and after.ppl_docs:
        items.append(perplexity_forgetting(f"{prefix}general-text perplexity",
                                           before.ppl_docs, after.ppl_docs, seed=seed))
    if before.probe_scores and after.probe_scores:
        items.append(score_forgetting(f"{prefix}general-knowledge probe accuracy",
                                      before.probe_scores, after.probe_scores, seed=seed))
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
