"""The forgetting check: reference text, probe, measurement and its wiring to the summary."""

from __future__ import annotations

import pytest
import torch

from tunelab import models
from tunelab.evaluate.forgetting import (
    GeneralAbility,
    forgetting_items,
    general_texts,
    measure_general_ability,
    summarize_forgetting,
)
from tunelab.evaluate.probe import load_probe


def test_general_texts_are_prose_from_the_stdlib() -> None:
    docs = general_texts()
    assert len(docs) == 32 and docs == general_texts()  # deterministic
    for doc in docs:
        assert len(doc) >= 300 and doc.endswith(".")
        assert "::=" not in doc and ">>>" not in doc and "\n" not in doc
    assert len(general_texts(5)) == 5


def test_same_model_before_and_after_shows_no_forgetting(tiny_model_dir) -> None:
    model, tok = models.load_model(str(tiny_model_dir), device="cpu")
    before = measure_general_ability(model, tok, batch_size=32, progress=False, n_docs=8)
    after = measure_general_ability(model, tok, batch_size=32, progress=False, n_docs=8)
    assert before.ppl_docs == after.ppl_docs and len(before.ppl_docs) == 8
    n = len(load_probe())  # the shipped probe's items: tests/evaluate/test_probe.py
    assert len(before.probe_scores) == n and len(before.probe_answers) == n
    summary = summarize_forgetting(before, {"ft": after})
    assert not summary.flagged and summary.text.startswith("No measurable forgetting")
    assert [i.name for i in summary.items] == ["general-text perplexity",
                                               "general-knowledge probe accuracy"]
    assert all(i.delta == 0 for i in summary.items)
    # A damaged model (noise on every weight) is flagged on perplexity.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    damaged = measure_general_ability(model, tok, batch_size=32, progress=False, n_docs=8)
    summary = summarize_forgetting(before, {"ft": damaged})
    ppl = summary.items[0]
    assert ppl.after > ppl.before and ppl.ci_low > 0 and ppl.flagged
    assert summary.flagged and "Forgetting detected" in summary.text
    assert GeneralAbility(before.ppl_docs, before.probe_scores,
                          before.probe_answers).to_dict()["perplexity"] > 1


def test_probe_accuracy_drop_is_flagged() -> None:
    before = GeneralAbility(None, [1.0] * 30, [])
    after = GeneralAbility(None, [0.0] * 20 + [1.0] * 10, [])
    (item,) = forgetting_items("LoRA", before, after)
    assert item.name == "LoRA: general-knowledge probe accuracy"
    assert item.flagged and item.delta == pytest.approx(-2 / 3)
    assert "forgot" in item.message
