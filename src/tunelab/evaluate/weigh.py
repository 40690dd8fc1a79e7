"""One verdict that weighs what the task gained against the general ability lost.

:func:`tunelab.evaluate.verdict.make_verdict` decides on the task alone: the interval of
``d = score(fine-tuned) - score(best prompting)``. A fine-tuned run *forgot* when one of its
forgetting items is flagged: the interval of ``after - before`` of a general measure (probe
accuracy, text perplexity) excludes 0 in the bad direction. With ``F`` the best fine-tuned
row by task score and ``P`` the best prompting row:

* ``F`` pays off on the task and forgot nothing -> ``"finetune"``, a plain win; where
  forgetting was measured the text says so, with each measure's change and interval;
* ``F`` pays off but forgot -> the other fine-tuned rows that also pay off on the task
  (their own interval against ``P`` above ``min_gain``) and forgot nothing measured *keep
  both*; the best of them by score, ``K``, becomes the verdict's row: ``"finetune"``, the
  text naming ``K`` and the trade-off ``F`` made. With no such row -> ``"tradeoff"``: the
  text says what ``F`` gains and what it loses, each with its interval;
* ``F`` does not pay off -> the task decision stands; what ``F`` lost is added to the text.

A row whose forgetting was not measured is never said to keep both.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

from tunelab.evaluate.verdict import (
    PROMPTING_KINDS,
    ForgettingItem,
    SystemResult,
    Verdict,
    _best,
    _cost_sentence,
    _fmt_diff,
    _fmt_score,
    make_verdict,
    token_ratio_phrase,
)

KEEP_ADVICE = ("To keep both, mix general data into training (data: a list of weighted "
               "sources) or lower the learning rate.")


def _item(value: ForgettingItem | Mapping[str, Any]) -> ForgettingItem:
    if isinstance(value, ForgettingItem):
        return value
    names = ForgettingItem.__dataclass_fields__
    return ForgettingItem(**{k: v for k, v in value.items() if k in names})


def change_phrase(item: ForgettingItem) -> str:
    """``general-knowledge probe accuracy 0.57 -> 0.03 (-0.53 [-0.63, -0.43], -94%)``."""
    digits = ".2f" if item.higher_is_better else ".3g"
    rel = f", {item.delta / item.before:+.0%}" if item.before else ""
    return (f"{item.name} {item.before:{digits}} -> {item.after:{digits}} "
            f"({item.delta:+{digits}} [{item.ci_low:+{digits}}, {item.ci_high:+{digits}}]{rel})")


def _join(phrases: Sequence[str]) -> str:
    return phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]


def _gain(row: SystemResult, prompting: Sequence[SystemResult], **kw: Any) -> Verdict:
    """The task verdict of ``row`` alone against the prompting rows."""
    return make_verdict([*prompting, row], **kw)


def _gain_words(v: Verdict) -> str:
    return _fmt_diff(v.diff, v.diff_ci) if v.diff is not None else "an unknown amount"


def weigh_forgetting(task: Verdict, systems: Sequence[SystemResult],
                     forgetting: Mapping[str, Sequence[ForgettingItem | Mapping[str, Any]]],
                     *, min_gain: float = 0.0, **kw: Any) -> Verdict:
    """``task`` (the task-only verdict of ``systems``) weighed against each fine-tuned row's
    forgetting items (rules in the module docstring)."""
    items = {name: [_item(i) for i in found] for name, found in forgetting.items() if found}
    lost = {name: [i for i in found if i.flagged] for name, found in items.items()}
    forgot = tuple(s.name for s in systems if s.kind == "finetuned" and lost.get(s.name))
    ft, pr = task.best_finetuned, task.best_prompt
    if ft is None or pr is None:
        return replace(task, forgot=forgot)
    measured = items.get(ft.name)
    if task.decision != "finetune":
        if lost.get(ft.name):
            loss = _join([change_phrase(i) for i in lost[ft.name]])
            return replace(task, forgot=forgot,
                           text=f"{task.text} It also loses general ability: {loss}.")
        return replace(task, forgot=forgot)
    if not lost.get(ft.name):
        if not measured:
            return replace(task, forgot=forgot)
        kept = _join([change_phrase(i) for i in measured])
        return replace(task, forgot=forgot, text=f"{task.text} General ability is kept: no "
                       f"measure got worse beyond its interval ({kept}).")

    prompting = [s for s in systems if s.kind in PROMPTING_KINDS]
    gain_kw = {"min_gain": min_gain, **kw}
    trade = (f"{ft.name} gains {_gain_words(task)} on the task over {pr.name} but loses "
             f"general ability: {_join([change_phrase(i) for i in lost[ft.name]])}")
    keepers, too_small = [], []
    for row in systems:
        if row.kind != "finetuned" or row is ft or not items.get(row.name) or lost.get(row.name):
            continue
        alone = _gain(row, prompting, **gain_kw)
        (keepers if alone.decision == "finetune" else too_small).append(row)
    keeper = _best(keepers)
    if keeper is not None:
        alone = _gain(keeper, prompting, **gain_kw)
        kept = _join([change_phrase(i) for i in items[keeper.name]])
        text = (f"{keeper.name} keeps both: it scores {_fmt_score(keeper)} against "
                f"{pr.name}'s {_fmt_score(pr)}, a gain of {_gain_words(alone)} on the task, "
                f"and no general measure got worse beyond its interval ({kept}). {trade}; "
                "that is a trade-off, not a plain win." + _cost_sentence(keeper))
        return replace(alone, text=text, forgot=forgot, keeps_both=keeper.name)
    tokens = token_ratio_phrase(ft.prompt_tokens, pr.prompt_tokens)
    head = f"{pr.name} scores {_fmt_score(pr)}; {ft.name} {_fmt_score(ft)}"
    text = (f"{head}{f' with {tokens}' if tokens else ''}. {trade}. A trade-off, not a plain "
            "win: take it only if the task is all the model must do." + _cost_sentence(ft))
    if too_small:
        names = _join([r.name for r in too_small])
        text += (f" {names} kept general ability but did not gain enough on the task to beat "
                 "prompting, so no run keeps both.")
    elif len([s for s in systems if s.kind == "finetuned"]) > 1:
        text += " No fine-tuned run keeps both."
    text += f" {KEEP_ADVICE}"
    return replace(task, decision="tradeoff", text=text, forgot=forgot)
