"""Turn evaluation numbers into a decision a user can act on.

**Was fine-tuning worth it?** :func:`make_verdict` compares the best prompting system
(zero- or few-shot) with the best fine-tuned one and decides from the interval of the score
difference ``d = score(best fine-tuned) - score(best prompting)``:

* interval entirely above ``min_gain`` (default 0) -> ``"finetune"``: fine-tuning pays off;
* interval entirely below 0 -> ``"prompting_better"``: the fine-tuned model is worse;
* otherwise -> ``"prefer_prompting"``: the systems are within noise of each other, and
  prompting costs no training, so prefer it (the text notes any prompt-token savings that
  fine-tuning would still bring, since those matter at high request volume).

Given each fine-tuned row's forgetting (``forgetting=``), the verdict weighs both
(:mod:`tunelab.evaluate.weigh`): a run that forgot beyond its interval is not a plain win
(``"tradeoff"``), unless another run gains on the task and keeps general ability, which the
verdict then names.

The interval comes from the paired bootstrap when both systems have per-example scores on the
same examples (aligned by ``example_ids`` when given); from an unpaired bootstrap when the
per-example scores are on different examples; and, without per-example scores, the decision
falls back to non-overlap of the two systems' own intervals (a conservative test) and
``diff_ci`` is ``None``. With no fine-tuned or no prompting row the decision is
``"incomplete"``.

**Did fine-tuning make the model forget?** :func:`forgetting_summary` reports before/after
deltas of general-text perplexity and general-knowledge probe accuracy, each with a paired
bootstrap interval, and flags a delta whose interval excludes 0 in the bad direction
(perplexity up, accuracy down).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal

from tunelab.evaluate.stats import (
    DEFAULT_LEVEL,
    DEFAULT_RESAMPLES,
    Interval,
    bootstrap_mean_ci,
    corpus_perplexity,
    paired_bootstrap_diff,
    paired_perplexity_diff,
    unpaired_bootstrap_diff,
)

Kind = Literal["zero_shot", "few_shot", "finetuned"]
KINDS: tuple[str, ...] = ("zero_shot", "few_shot", "finetuned")
PROMPTING_KINDS: tuple[str, ...] = ("zero_shot", "few_shot")
Decision = Literal["finetune", "tradeoff", "prompting_better", "prefer_prompting",
                   "incomplete"]
DiffMethod = Literal["paired", "unpaired", "intervals", "none"]


@dataclass
class SystemResult:
    """One evaluated system (a row of the comparison).

    ``score`` is the mean metric over the evaluation set and ``[ci_low, ci_high]`` its
    interval; ``per_example`` are the per-example scores (aligned with ``example_ids`` when
    given). Costs: ``prompt_tokens`` and ``latency_s`` are means *per request*;
    ``train_time_s`` and ``peak_memory_bytes`` apply to fine-tuned rows.
    """

    name: str
    kind: str
    score: float
    ci_low: float | None = None
    ci_high: float | None = None
    per_example: list[float] | None = None
    example_ids: list[str] | None = None
    prompt_tokens: float | None = None
    latency_s: float | None = None
    train_time_s: float | None = None
    peak_memory_bytes: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"system {self.name!r}: kind must be one of {KINDS}, got "
                             f"{self.kind!r}")

    @classmethod
    def from_scores(cls, name: str, kind: str, per_example: Sequence[float], *,
                    n_resamples: int = DEFAULT_RESAMPLES, level: float = DEFAULT_LEVEL,
                    seed: int = 0, **costs: Any) -> SystemResult:
        """Build a row from per-example scores, computing the mean and its bootstrap CI."""
        ci = bootstrap_mean_ci(per_example, n_resamples=n_resamples, level=level, seed=seed)
        return cls(name=name, kind=kind, score=ci.estimate, ci_low=ci.low, ci_high=ci.high,
                   per_example=[float(s) for s in per_example], **costs)

    @classmethod
    def from_mapping(cls, row: Mapping[str, Any]) -> SystemResult:
        """Build from a dict with the same keys (unknown keys are ignored)."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in row.items() if k in names})

    def to_dict(self, *, include_per_example: bool = False) -> dict[str, Any]:
        d = asdict(self)
        if not include_per_example:
            d.pop("per_example")
            d.pop("example_ids")
        return d


@dataclass(frozen=True)
class Verdict:
    """The decision, its plain-language explanation, and the numbers it follows from.

    ``diff`` is ``best_finetuned.score - best_prompt.score``; ``diff_ci`` its interval (see
    ``diff_method``), ``None`` when it could not be computed. ``forgot``: the fine-tuned rows
    whose general ability fell beyond its interval; ``keeps_both``: the row that gains on the
    task and forgot nothing measured, when the best-scoring row forgot
    (:mod:`tunelab.evaluate.weigh`).
    """

    decision: Decision
    text: str
    best_prompt: SystemResult | None
    best_finetuned: SystemResult | None
    diff: float | None
    diff_ci: tuple[float, float] | None
    diff_method: DiffMethod = "none"
    n_examples: int | None = None
    forgot: tuple[str, ...] = ()
    keeps_both: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "decision": self.decision,
            "text": self.text,
            "best_prompt": None if self.best_prompt is None else self.best_prompt.name,
            "best_finetuned": None if self.best_finetuned is None else self.best_finetuned.name,
            "diff": self.diff,
            "diff_ci": None if self.diff_ci is None else list(self.diff_ci),
            "diff_method": self.diff_method,
            "n_examples": self.n_examples,
            "forgot": list(self.forgot),
            "keeps_both": self.keeps_both,
        }


# --------------------------------------------------------------------------------------------
# Formatting helpers (shared with the report)
# --------------------------------------------------------------------------------------------


def format_duration(seconds: float) -> str:
    """``3725 -> "1h 2m"``, ``95 -> "1m 35s"``, ``4.2 -> "4.2s"``."""
    if seconds < 60:
        return f"{seconds:.1f}s" if seconds < 10 else f"{seconds:.0f}s"
    minutes, secs = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes}m {secs}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h {minutes}m"


def format_bytes(n: float) -> str:
    """Binary units: ``8_482_000_000 -> "7.9 GiB"``."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(value) < 1024:
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"


def _fmt_score(row: SystemResult) -> str:
    if row.ci_low is None or row.ci_high is None:
        return f"{row.score:.2f}"
    return f"{row.score:.2f} [{row.ci_low:.2f}, {row.ci_high:.2f}]"


def _fmt_diff(diff: float, ci: tuple[float, float] | None) -> str:
    if ci is None:
        return f"{diff:+.2f}"
    return f"{diff:+.2f} [{ci[0]:+.2f}, {ci[1]:+.2f}]"


_FRACTIONS = {2: "half", 3: "a third", 4: "a quarter", 5: "a fifth", 6: "a sixth",
              7: "a seventh", 8: "an eighth", 9: "a ninth", 10: "a tenth"}


def token_ratio_phrase(tokens: float | None, baseline: float | None) -> str | None:
    """Describe ``tokens`` relative to ``baseline``: ``"a sixth of the prompt tokens"``,
    ``"40% of the prompt tokens"``, ``"2.5x the prompt tokens"``; ``None`` when unknown or
    within 10% of each other."""
    if tokens is None or baseline is None or baseline <= 0 or tokens < 0:
        return None
    ratio = tokens / baseline
    if 0.9 <= ratio <= 1.1:
        return None
    if ratio > 1.1:
        return f"{ratio:.1f}x the prompt tokens"
    if ratio == 0:
        return "no prompt tokens"
    inverse = 1 / ratio
    k = round(inverse)
    if k in _FRACTIONS and abs(inverse - k) <= 0.1 * k:
        return f"{_FRACTIONS[k]} of the prompt tokens"
    if inverse > 10:
        return f"{inverse:.0f}x fewer prompt tokens"
    return f"{ratio:.0%} of the prompt tokens"


# --------------------------------------------------------------------------------------------
# Verdict
# --------------------------------------------------------------------------------------------


def _best(rows: Iterable[SystemResult]) -> SystemResult | None:
    # Highest score; ties go to the cheaper prompt (fewer tokens per request).
    ranked = sorted(rows, key=lambda r: (-r.score, r.prompt_tokens if r.prompt_tokens
                                         is not None else float("inf")))
    return ranked[0] if ranked else None


def _aligned(ft: SystemResult, pr: SystemResult) -> tuple[list[float], list[float]] | None:
    """Per-example scores of both systems on the same examples, in the same order."""
    a, b = ft.per_example, pr.per_example
    if a is None or b is None:
        return None
    if ft.example_ids is not None and pr.example_ids is not None:
        if len(ft.example_ids) != len(a) or len(pr.example_ids) != len(b):
            return None
        if list(ft.example_ids) == list(pr.example_ids):
            return list(a), list(b)
        if set(ft.example_ids) != set(pr.example_ids) or len(set(ft.example_ids)) != len(a):
            return None
        # Same examples in a different order: realign by id.
        by_id = dict(zip(pr.example_ids, b, strict=True))
        return list(a), [by_id[i] for i in ft.example_ids]
    return (list(a), list(b)) if len(a) == len(b) else None


def _cost_sentence(ft: SystemResult) -> str:
    parts = []
    if ft.train_time_s is not None:
        parts.append(f"training took {format_duration(ft.train_time_s)}")
    if ft.peak_memory_bytes is not None:
        parts.append(f"peaked at {format_bytes(ft.peak_memory_bytes)}")
    if not parts:
        return ""
    sentence = " and ".join(parts)
    return " " + sentence[0].upper() + sentence[1:] + "."


def make_verdict(rows: Sequence[SystemResult | Mapping[str, Any]], *, min_gain: float = 0.0,
                 n_resamples: int = DEFAULT_RESAMPLES, level: float = DEFAULT_LEVEL,
                 seed: int = 0,
                 forgetting: Mapping[str, Sequence[ForgettingItem | Mapping[str, Any]]]
                 | None = None) -> Verdict:
    """Decide whether fine-tuning pays off over prompting (rules in the module docstring).

    ``rows`` are :class:`SystemResult` or dicts with its fields. ``min_gain`` is the smallest
    improvement worth a training run: "finetune" needs the whole interval of the difference
    above it. ``forgetting`` maps a fine-tuned row's name to its forgetting items (before and
    after the fine-tuning, with intervals); with it the verdict weighs both
    (:func:`tunelab.evaluate.weigh.weigh_forgetting`).
    """
    systems = [r if isinstance(r, SystemResult) else SystemResult.from_mapping(r) for r in rows]
    if forgetting is not None:
        from tunelab.evaluate.weigh import weigh_forgetting

        task = make_verdict(systems, min_gain=min_gain, n_resamples=n_resamples, level=level,
                            seed=seed)
        return weigh_forgetting(task, systems, forgetting, min_gain=min_gain,
                                n_resamples=n_resamples, level=level, seed=seed)
    pr = _best(r for r in systems if r.kind in PROMPTING_KINDS)
    ft = _best(r for r in systems if r.kind == "finetuned")

    if ft is None or pr is None:
        if ft is None and pr is None:
            text = "No systems were evaluated, so there is nothing to compare."
        elif ft is None:
            text = (f"{pr.name} scores {_fmt_score(pr)}; no fine-tuned model was evaluated, so "
                    "there is no verdict on fine-tuning yet.")
        else:
            text = (f"{ft.name} scores {_fmt_score(ft)}; no zero- or few-shot baseline was "
                    "evaluated, so it is unknown whether fine-tuning pays off: evaluate a "
                    "prompting baseline on the same examples.")
        return Verdict("incomplete", text, pr, ft, None, None)

    diff = ft.score - pr.score
    diff_ci: tuple[float, float] | None = None
    method: DiffMethod
    n: int | None = None
    aligned = _aligned(ft, pr)
    if aligned is not None:
        iv: Interval = paired_bootstrap_diff(aligned[0], aligned[1], n_resamples=n_resamples,
                                             level=level, seed=seed)
        method, diff, diff_ci, n = "paired", iv.estimate, (iv.low, iv.high), iv.n
    elif ft.per_example and pr.per_example:
        iv = unpaired_bootstrap_diff(ft.per_example, pr.per_example, n_resamples=n_resamples,
                                     level=level, seed=seed)
        method, diff, diff_ci = "unpaired", iv.estimate, (iv.low, iv.high)
    elif None not in (ft.ci_low, ft.ci_high, pr.ci_low, pr.ci_high):
        method = "intervals"
    else:
        method = "none"

    if diff_ci is not None:
        pays_off, worse = diff_ci[0] > min_gain, diff_ci[1] < 0
    elif method == "intervals":
        # Non-overlapping intervals imply a significant difference; overlap does not imply
        # its absence, so this can only err towards "prefer prompting".
        pays_off = ft.ci_low > pr.ci_high and diff > min_gain  # type: ignore[operator]
        worse = ft.ci_high < pr.ci_low  # type: ignore[operator]
    else:
        pays_off = worse = False

    tokens = token_ratio_phrase(ft.prompt_tokens, pr.prompt_tokens)
    head = f"{pr.name} scores {_fmt_score(pr)}; {ft.name} {_fmt_score(ft)}"
    if tokens is not None:
        head += f" with {tokens}"
    diff_words = {
        "paired": f"paired difference {_fmt_diff(diff, diff_ci)} over {n} examples",
        "unpaired": f"difference {_fmt_diff(diff, diff_ci)}, unpaired (different examples)",
        "intervals": f"difference {diff:+.2f}; judged from the two intervals",
        "none": f"difference {diff:+.2f} with no interval",
    }[method]

    if pays_off:
        decision: Decision = "finetune"
        text = f"{head}: fine-tuning pays off here ({diff_words})." + _cost_sentence(ft)
    elif worse:
        decision = "prompting_better"
        text = (f"{head}: prompting is better here ({diff_words}); the fine-tuned model scores "
                "lower, so keep prompting.")
    else:
        decision = "prefer_prompting"
        if method == "none":
            reason = "without intervals the difference cannot be told from noise"
        elif diff_ci is not None and diff_ci[0] > 0:
            reason = f"the gain is below the {min_gain:.2f} worth a training run"
        else:
            reason = "prompting is within the interval of fine-tuning"
        text = f"{head}: {reason} ({diff_words}): prefer prompting, it costs no training."
        if tokens is not None and ft.prompt_tokens < pr.prompt_tokens:  # type: ignore[operator]
            text += (f" The fine-tuned model would still use {tokens} per request, which "
                     "matters if you serve many requests.")
    return Verdict(decision, text, pr, ft, diff, diff_ci, method, n)


# --------------------------------------------------------------------------------------------
# Forgetting
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ForgettingItem:
    """A before/after comparison of one general-ability measure.

    ``delta = after - before`` with interval ``[ci_low, ci_high]``. ``flagged`` is true when
    the interval excludes 0 in the bad direction: below 0 if ``higher_is_better`` (accuracy),
    above 0 otherwise (perplexity).
    """

    name: str
    before: float
    after: float
    delta: float
    ci_low: float
    ci_high: float
    higher_is_better: bool
    flagged: bool
    message: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class ForgettingSummary:
    items: list[ForgettingItem] = field(default_factory=list)
    flagged: bool = False
    text: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"items": [i.to_dict() for i in self.items], "flagged": self.flagged,
                "text": self.text}


FORGETTING_ADVICE = ("Try a lower learning rate, fewer epochs, a smaller LoRA rank, or mixing "
                     "general data into training.")


def _forgetting_item(name: str, before: float, after: float, iv: Interval,
                     higher_is_better: bool) -> ForgettingItem:
    worse = iv.high < 0 if higher_is_better else iv.low > 0
    better = iv.low > 0 if higher_is_better else iv.high < 0
    rel = f", {iv.estimate / before:+.0%}" if before else ""
    interval = f"{iv.estimate:+.3g} [{iv.low:+.3g}, {iv.high:+.3g}]{rel}"
    change = f"{before:.3g} -> {after:.3g} ({interval})"
    if worse:
        message = (f"{name} got worse, {change}: the fine-tuned model forgot some general "
                   "ability.")
    elif better:
        message = f"{name} improved, {change}."
    else:
        message = f"{name} {change}: no measurable change."
    return ForgettingItem(name, before, after, iv.estimate, iv.low, iv.high, higher_is_better,
                          worse, message)


def score_forgetting(name: str, before: Sequence[float], after: Sequence[float], *,
                     higher_is_better: bool = True, n_resamples: int = DEFAULT_RESAMPLES,
                     level: float = DEFAULT_LEVEL, seed: int = 0) -> ForgettingItem:
    """Before/after per-example scores of a probe (e.g. general-knowledge accuracy).

    Paired bootstrap of ``mean(after) - mean(before)`` when both lists have the same length
    (the same probe questions), unpaired otherwise.
    """
    diff = paired_bootstrap_diff if len(before) == len(after) else unpaired_bootstrap_diff
    iv = diff(after, before, n_resamples=n_resamples, level=level, seed=seed)
    b = sum(before) / len(before)
    a = sum(after) / len(after)
    return _forgetting_item(name, b, a, iv, higher_is_better)


def perplexity_forgetting(name: str, before: Sequence[tuple[float, int]],
                          after: Sequence[tuple[float, int]], *,
                          n_resamples: int = DEFAULT_RESAMPLES, level: float = DEFAULT_LEVEL,
                          seed: int = 0) -> ForgettingItem:
    """Before/after perplexity on the same general-text documents, given per-document
    ``(nll_sum, n_tokens)``; paired bootstrap over documents. Higher perplexity is worse."""
    iv = paired_perplexity_diff(before, after, n_resamples=n_resamples, level=level, seed=seed)
    b, a = corpus_perplexity(before), corpus_perplexity(after)
    return _forgetting_item(name, b, a, iv, higher_is_better=False)


def forgetting_summary(*, ppl_before: Sequence[tuple[float, int]] | None = None,
                       ppl_after: Sequence[tuple[float, int]] | None = None,
                       probe_before: Sequence[float] | None = None,
                       probe_after: Sequence[float] | None = None,
                       extra: Sequence[ForgettingItem] = (),
                       n_resamples: int = DEFAULT_RESAMPLES, level: float = DEFAULT_LEVEL,
                       seed: int = 0) -> ForgettingSummary:
    """Summarise forgetting: general-text perplexity (per-document ``(nll_sum, n_tokens)``
    before and after fine-tuning) and general-knowledge probe accuracy (per-question 0/1
    before and after), plus any ``extra`` items. Each pair is used only if both sides are
    given."""
    items: list[ForgettingItem] = []
    if ppl_before is not None and ppl_after is not None:
        items.append(perplexity_forgetting("general-text perplexity", ppl_before, ppl_after,
                                           n_resamples=n_resamples, level=level, seed=seed))
    if probe_before is not None and probe_after is not None:
        items.append(score_forgetting("general-knowledge probe accuracy", probe_before,
                                      probe_after, n_resamples=n_resamples, level=level,
                                      seed=seed))
    items.extend(extra)
    flagged = [i for i in items if i.flagged]
    if not items:
        text = "Forgetting was not measured."
    elif flagged:
        # the advice once, however many measures got worse
        text = " ".join(["Forgetting detected:", *(i.message for i in flagged), FORGETTING_ADVICE])
    else:
        text = "No measurable forgetting: " + " ".join(i.message for i in items)
    return ForgettingSummary(items, bool(flagged), text)
