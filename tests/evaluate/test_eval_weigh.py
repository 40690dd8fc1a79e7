"""One verdict weighing the task gain against the general ability lost (tunelab.evaluate.weigh),
on constructed results."""

from __future__ import annotations

import numpy as np

from tunelab.evaluate import SystemResult, make_verdict, score_forgetting
from tunelab.evaluate.verdict import perplexity_forgetting
from tunelab.report.html import render_html

PROBE = "general-knowledge probe accuracy"


def _scores(n: int, p: float, seed: int) -> list[float]:
    return (np.random.default_rng(seed).random(n) < p).astype(float).tolist()


PROMPT = _scores(200, 0.2, 0)


def _rows(*finetuned: tuple[str, float | list[float]]) -> list[SystemResult]:
    """Zero-shot, few-shot (0.2) and fine-tuned rows: a success rate, or given scores."""
    rows = [SystemResult.from_scores("zero-shot", "zero_shot", [0.0] * 200),
            SystemResult.from_scores("few-shot k=3", "few_shot", PROMPT)]
    for i, (name, p) in enumerate(finetuned):
        scores = p if isinstance(p, list) else _scores(200, p, 10 + i)
        rows.append(SystemResult.from_scores(name, "finetuned", scores, train_time_s=90.0))
    return rows


BEFORE = [1.0] * 34 + [0.0] * 26  # 0.57 on 60 questions, as the quickstart's base


def _probe(after_right: int) -> list:
    """The probe item of a run that still answers ``after_right`` of the 34 it knew."""
    after = [1.0] * after_right + [0.0] * (60 - after_right)
    return [score_forgetting(PROBE, BEFORE, after)]


def _perplexity(rise: float) -> list:
    rng = np.random.default_rng(3)
    before = [(float(rng.normal(3.0, 0.2)) * 50, 50) for _ in range(40)]
    after = [(nll + rise * 50, t) for nll, t in before]
    return [perplexity_forgetting("general-text perplexity", before, after)]


def test_no_forgetting_is_a_plain_win_and_says_general_ability_is_kept() -> None:
    v = make_verdict(_rows(("LoRA", 0.9)), forgetting={"LoRA": _probe(34)})
    assert v.decision == "finetune" and v.forgot == () and v.keeps_both is None
    assert "fine-tuning pays off" in v.text
    assert f"General ability is kept: no measure got worse beyond its interval ({PROBE} " \
           "0.57 -> 0.57 (+0.00 [+0.00, +0.00], +0%))." in v.text


def test_forgetting_beyond_its_interval_is_a_trade_off_not_a_win() -> None:
    items = _probe(2) + _perplexity(0.1)  # probe 0.57 -> 0.03, perplexity +11%
    assert all(i.flagged for i in items)
    v = make_verdict(_rows(("LoRA", 0.9)), forgetting={"LoRA": items})
    assert v.decision == "tradeoff" and v.forgot == ("LoRA",)
    assert "pays off" not in v.text and "not a plain win" in v.text
    gain = f"{v.diff:+.2f} [{v.diff_ci[0]:+.2f}, {v.diff_ci[1]:+.2f}]"
    assert f"LoRA gains {gain} on the task over few-shot k=3 but loses general ability: " \
           f"{PROBE} 0.57 -> 0.03 (-0.53 [" in v.text
    assert "-94%) and general-text perplexity" in v.text and "+11%)" in v.text
    assert "mix general data into training" in v.text
    assert v.best_finetuned.name == "LoRA"  # the task numbers stay those of the run
    html = render_html({"verdict": v})
    assert "A trade-off: the task gains, general ability is lost" in html
    assert "Fine-tuning pays off" not in html


def test_with_two_runs_the_one_that_keeps_both_is_named() -> None:
    rows = _rows(("LoRA", 0.92), ("LoRA + replay", 0.86))
    v = make_verdict(rows, forgetting={"LoRA": _probe(2), "LoRA + replay": _probe(32)})
    assert v.decision == "finetune" and v.keeps_both == "LoRA + replay"
    assert v.best_finetuned.name == "LoRA + replay" and v.forgot == ("LoRA",)
    assert v.diff == rows[3].score - rows[1].score  # the gain of the run that keeps both
    assert v.text.startswith("LoRA + replay keeps both: it scores ")
    assert f"no general measure got worse beyond its interval ({PROBE} 0.57 -> 0.53" in v.text
    assert "LoRA gains " in v.text and "but loses general ability: " in v.text
    assert "a trade-off, not a plain win" in v.text and "Training took 1m 30s." in v.text
    assert v.to_dict()["keeps_both"] == "LoRA + replay" and v.to_dict()["forgot"] == ["LoRA"]


def test_forgetting_within_its_interval_is_a_win_with_the_change_noted() -> None:
    item = _probe(31)[0]  # 3 of 34 answers lost: the interval still includes 0
    assert not item.flagged and item.delta < 0 <= item.ci_high
    v = make_verdict(_rows(("LoRA", 0.9)), forgetting={"LoRA": [item]})
    assert v.decision == "finetune" and v.forgot == ()
    assert "fine-tuning pays off" in v.text
    assert f"General ability is kept: no measure got worse beyond its interval ({PROBE} " \
           f"0.57 -> 0.52 ({item.delta:+.2f} [{item.ci_low:+.2f}, {item.ci_high:+.2f}]" in v.text


def test_a_run_that_keeps_general_ability_but_not_the_gain_does_not_keep_both() -> None:
    # replay answers exactly what prompting answers: no gain on the task at all
    rows = _rows(("LoRA", 0.9), ("LoRA + replay", list(PROMPT)))
    v = make_verdict(rows, forgetting={"LoRA": _probe(2), "LoRA + replay": _probe(34)})
    assert v.decision == "tradeoff" and v.keeps_both is None
    assert "LoRA + replay kept general ability but did not gain enough on the task to beat " \
           "prompting, so no run keeps both." in v.text


def test_a_run_without_measured_forgetting_is_never_said_to_keep_both() -> None:
    rows = _rows(("LoRA", 0.9), ("LoRA + replay", 0.88))
    v = make_verdict(rows, forgetting={"LoRA": _probe(2)})
    assert v.decision == "tradeoff" and v.keeps_both is None
    assert "No fine-tuned run keeps both." in v.text


def test_a_losing_run_that_also_forgot_says_both() -> None:
    v = make_verdict(_rows(("LoRA", 0.05)), forgetting={"LoRA": _probe(2)})
    assert v.decision == "prompting_better" and v.forgot == ("LoRA",)
    assert "prompting is better here" in v.text
    assert f"It also loses general ability: {PROBE} 0.57 -> 0.03 (-0.53 [" in v.text


def test_without_forgetting_the_verdict_is_the_task_verdict() -> None:
    rows = _rows(("LoRA", 0.9))
    assert make_verdict(rows, forgetting={}) == make_verdict(rows)
