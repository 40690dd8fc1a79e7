"""Verdict decisions and the forgetting summary."""

from __future__ import annotations

import numpy as np
import pytest

from tunelab.evaluate import (
    SystemResult,
    forgetting_summary,
    make_verdict,
    score_forgetting,
)
from tunelab.evaluate.verdict import format_bytes, format_duration, token_ratio_phrase


def _scores(n: int, p: float, seed: int) -> list[float]:
    return (np.random.default_rng(seed).random(n) < p).astype(float).tolist()


def _rows(prompt_scores: list[float], ft_scores: list[float]) -> list[SystemResult]:
    return [
        SystemResult.from_scores("zero-shot", "zero_shot", [0.0] * len(prompt_scores),
                                 prompt_tokens=150),
        SystemResult.from_scores("few-shot k=3", "few_shot", prompt_scores, prompt_tokens=900,
                                 latency_s=0.4),
        SystemResult.from_scores("QLoRA adapter", "finetuned", ft_scores, prompt_tokens=150,
                                 latency_s=0.2, train_time_s=725.0,
                                 peak_memory_bytes=int(7.9 * 2**30)),
    ]


def test_finetuning_pays_off() -> None:
    v = make_verdict(_rows(_scores(200, 0.41, 0), _scores(200, 0.87, 1)))
    assert v.decision == "finetune"
    assert v.best_prompt is not None and v.best_prompt.name == "few-shot k=3"
    assert v.best_finetuned is not None and v.best_finetuned.name == "QLoRA adapter"
    assert v.diff_method == "paired" and v.n_examples == 200
    assert v.diff_ci is not None and v.diff_ci[0] > 0
    assert v.diff == pytest.approx(v.best_finetuned.score - v.best_prompt.score)
    assert "fine-tuning pays off" in v.text
    assert "a sixth of the prompt tokens" in v.text
    assert "12m 5s" in v.text and "7.9 GiB" in v.text
    assert f"{v.best_prompt.score:.2f} [{v.best_prompt.ci_low:.2f}" in v.text


def test_prompting_better() -> None:
    v = make_verdict(_rows(_scores(200, 0.8, 2), _scores(200, 0.4, 3)))
    assert v.decision == "prompting_better"
    assert v.diff_ci is not None and v.diff_ci[1] < 0
    assert "prompting is better" in v.text


def test_tie_prefers_prompting_and_mentions_tokens() -> None:
    base = _scores(200, 0.6, 4)
    ft = list(base)
    ft[0], ft[1] = 1 - ft[0], 1 - ft[1]  # nearly identical systems
    v = make_verdict(_rows(base, ft))
    assert v.decision == "prefer_prompting"
    assert v.diff_ci is not None and v.diff_ci[0] <= 0 <= v.diff_ci[1]
    assert "within the interval" in v.text and "costs no training" in v.text
    assert "a sixth of the prompt tokens per request" in v.text


def test_min_gain() -> None:
    rows = _rows(_scores(300, 0.5, 5), _scores(300, 0.7, 6))
    assert make_verdict(rows).decision == "finetune"
    v = make_verdict(rows, min_gain=0.5)
    assert v.decision == "prefer_prompting" and "below the 0.50" in v.text


def test_aligns_by_example_ids() -> None:
    p = _scores(100, 0.3, 7)
    f = _scores(100, 0.9, 8)
    ids = [f"ex{i}" for i in range(100)]
    order = list(reversed(range(100)))
    rows = [SystemResult("few", "few_shot", float(np.mean(p)), per_example=p, example_ids=ids),
            SystemResult("ft", "finetuned", float(np.mean(f)), per_example=[f[i] for i in order],
                         example_ids=[ids[i] for i in order])]
    v = make_verdict(rows)
    aligned = make_verdict([SystemResult("few", "few_shot", float(np.mean(p)), per_example=p),
                            SystemResult("ft", "finetuned", float(np.mean(f)), per_example=f)])
    assert v.diff_method == "paired"
    assert v.diff_ci == aligned.diff_ci


def test_unpaired_and_interval_fallbacks() -> None:
    rows = [SystemResult.from_scores("few", "few_shot", _scores(80, 0.3, 9)),
            SystemResult.from_scores("ft", "finetuned", _scores(120, 0.9, 10))]
    v = make_verdict(rows)
    assert v.diff_method == "unpaired" and v.decision == "finetune"
    # Only summary intervals: non-overlap decides, overlap prefers prompting.
    v = make_verdict([{"name": "few", "kind": "few_shot", "score": 0.4, "ci_low": 0.3,
                       "ci_high": 0.5},
                      {"name": "ft", "kind": "finetuned", "score": 0.8, "ci_low": 0.7,
                       "ci_high": 0.9}])
    assert v.diff_method == "intervals" and v.decision == "finetune" and v.diff_ci is None
    v = make_verdict([{"name": "few", "kind": "few_shot", "score": 0.4, "ci_low": 0.3,
                       "ci_high": 0.5},
                      {"name": "ft", "kind": "finetuned", "score": 0.45, "ci_low": 0.35,
                       "ci_high": 0.55}])
    assert v.decision == "prefer_prompting"
    v = make_verdict([{"name": "few", "kind": "few_shot", "score": 0.4},
                      {"name": "ft", "kind": "finetuned", "score": 0.9}])
    assert v.diff_method == "none" and v.decision == "prefer_prompting"


def test_incomplete() -> None:
    assert make_verdict([]).decision == "incomplete"
    v = make_verdict([{"name": "few", "kind": "few_shot", "score": 0.4}])
    assert v.decision == "incomplete" and v.best_finetuned is None
    v = make_verdict([{"name": "ft", "kind": "finetuned", "score": 0.4}])
    assert v.decision == "incomplete" and "baseline" in v.text


def test_bad_kind() -> None:
    with pytest.raises(ValueError, match="kind"):
        SystemResult("x", "lora", 0.5)


def test_verdict_to_dict() -> None:
    d = make_verdict(_rows(_scores(50, 0.2, 11), _scores(50, 0.9, 12))).to_dict()
    assert d["decision"] == "finetune" and d["best_finetuned"] == "QLoRA adapter"
    assert isinstance(d["diff_ci"], list) and len(d["diff_ci"]) == 2


def test_formatting_helpers() -> None:
    assert token_ratio_phrase(150, 900) == "a sixth of the prompt tokens"
    assert token_ratio_phrase(450, 900) == "half of the prompt tokens"
    assert token_ratio_phrase(400, 1000) == "40% of the prompt tokens"
    assert token_ratio_phrase(10, 1000) == "100x fewer prompt tokens"
    assert token_ratio_phrase(2500, 1000) == "2.5x the prompt tokens"
    assert token_ratio_phrase(1000, 1000) is None
    assert token_ratio_phrase(None, 1000) is None
    assert format_duration(4.2) == "4.2s" and format_duration(95) == "1m 35s"
    assert format_duration(3725) == "1h 2m"
    assert format_bytes(8_482_000_000) == "7.9 GiB" and format_bytes(512) == "512 B"


def test_forgetting_flags_perplexity_rise() -> None:
    rng = np.random.default_rng(13)
    before = [(float(rng.normal(3.0, 0.2)) * 50, 50) for _ in range(60)]
    after = [(nll + 10.0, t) for nll, t in before]
    probe = _scores(100, 0.6, 14)
    s = forgetting_summary(ppl_before=before, ppl_after=after, probe_before=probe,
                           probe_after=probe)
    assert s.flagged
    ppl, acc = s.items
    assert ppl.name == "general-text perplexity" and ppl.flagged and not ppl.higher_is_better
    assert ppl.delta > 0 and ppl.ci_low > 0 and ppl.after > ppl.before
    assert not acc.flagged and acc.delta == 0.0
    assert "Forgetting detected" in s.text and "perplexity" in s.text
    assert s.to_dict()["items"][0]["flagged"] is True


def test_forgetting_flags_probe_drop_but_not_gain() -> None:
    before = _scores(300, 0.7, 15)
    worse = list(before)
    for i in range(0, 300, 4):
        worse[i] = 0.0
    drop = score_forgetting("probe", before, worse)
    assert drop.flagged and drop.ci_high < 0 and "got worse" in drop.message
    gain = score_forgetting("probe", worse, before)
    assert not gain.flagged and gain.ci_low > 0 and "improved" in gain.message


def test_forgetting_no_change_and_not_measured() -> None:
    before = [(150.0, 50)] * 30
    s = forgetting_summary(ppl_before=before, ppl_after=before)
    assert not s.flagged and "No measurable forgetting" in s.text
    assert forgetting_summary().text == "Forgetting was not measured."


def test_forgetting_advice_is_given_once_when_both_measures_got_worse() -> None:
    rng = np.random.default_rng(21)
    before = [(float(rng.normal(3.0, 0.2)) * 50, 50) for _ in range(60)]
    after = [(nll + 10.0, t) for nll, t in before]
    probe = [1.0] * 40
    s = forgetting_summary(ppl_before=before, ppl_after=after, probe_before=probe,
                           probe_after=[0.0] * 40)
    assert [i.flagged for i in s.items] == [True, True]
    assert s.text.count("lower learning rate") == 1 and s.text.endswith("into training.")
    assert s.text.count("forgot some general ability") == 2
