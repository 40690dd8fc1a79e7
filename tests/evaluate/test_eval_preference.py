"""`tunelab eval` / `compare` on preference pairs: accuracy and reward margin with intervals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tests.conftest import packed_lora_model, write_jsonl

from tunelab import data
from tunelab.cli import main
from tunelab.config import build_config
from tunelab.evaluate.compare import finetuned_system, run_compare
from tunelab.evaluate.preference import PairPrompt, score_preferences
from tunelab.evaluate.run import (
    EvalSettings,
    examples_from_records,
    resolve_finetuned,
    run_splits,
)
from tunelab.train import train

ANSWERS = ["Paris", "Tallinn", "Madrid and more", "no idea"]


def _mirrored_pairs() -> list[PairPrompt]:
    """Every pair twice, answers swapped: exactly one of the two is right, so accuracy is
    exactly 1/2 whatever the model (unless two log-probs tie)."""
    out = []
    for i in range(4):
        prompt = [{"role": "user", "content": f"question {i}: capital of France?"}]
        a, b = ANSWERS[i], ANSWERS[(i + 1) % 4]
        out += [PairPrompt(f"q{i}", prompt, a, b, f"p.jsonl, line {2 * i + 1}"),
                PairPrompt(f"q{i}-swapped", prompt, b, a, f"p.jsonl, line {2 * i + 2}")]
    return out


@torch.no_grad()
def _answer_logp(model, tokenizer, prompt, answer: str) -> float:
    """log p(answer | prompt) from a plain forward of ``prompt + answer`` alone."""
    ex = data.encode_record(data.Record({"messages": prompt + [{"role": "assistant",
                                                                "content": answer}]}, "m", 1),
                            "chat", tokenizer)
    ids = torch.tensor([ex.input_ids])
    labels = torch.tensor(ex.labels[1:])
    logits = model(input_ids=ids).logits[0, :-1].float()
    keep = labels != data.IGNORE_INDEX
    return float(logits.log_softmax(-1)[keep].gather(1, labels[keep, None]).sum())


def test_accuracy_and_margin_equal_a_direct_computation(tiny_model_dir, tiny_tokenizer):
    model = packed_lora_model(tiny_model_dir)  # LoRA with non-zero B: policy != reference
    pairs = _mirrored_pairs()
    beta = 0.3
    result = score_preferences(model, tiny_tokenizer, pairs, beta=beta, batch_size=3)

    policy = [(_answer_logp(model, tiny_tokenizer, p.messages, p.chosen),
               _answer_logp(model, tiny_tokenizer, p.messages, p.rejected)) for p in pairs]
    with model.disable_adapter():
        ref = [(_answer_logp(model, tiny_tokenizer, p.messages, p.chosen),
                _answer_logp(model, tiny_tokenizer, p.messages, p.rejected)) for p in pairs]
    correct = [float(c > r) for c, r in policy]
    margins = [beta * ((c - rc) - (r - rr)) for (c, r), (rc, rr) in zip(policy, ref, strict=True)]

    assert result.ids == [p.id for p in pairs] and result.reference
    assert result.chosen_logp == pytest.approx([c for c, _ in policy], abs=1e-4)
    assert result.ref_rejected_logp == pytest.approx([r for _, r in ref], abs=1e-4)
    assert result.correct == correct and sum(correct) == len(pairs) / 2
    assert result.margins == pytest.approx(margins, abs=1e-4)
    summary = result.summary(seed=0)
    acc, margin = summary["preference_accuracy"], summary["reward_margin"]
    assert acc["mean"] == 0.5 and acc["ci_low"] < 0.5 < acc["ci_high"]
    assert margin["mean"] == pytest.approx(sum(margins) / len(margins), abs=1e-4)
    assert margin["ci_low"] <= margin["mean"] <= margin["ci_high"]

    # compare scores LoRA merged into the weights: the reference unmerges, then merges back
    model.merge_adapter()
    merged = score_preferences(model, tiny_tokenizer, pairs, beta=beta)
    assert merged.margins == pytest.approx(margins, abs=1e-4)
    assert any(getattr(m, "merged", False) for m in model.modules())


def _pair_rows(n: int) -> list[dict]:
    return [{"prompt": f"question {i}: capital of France?", "chosen": "Paris",
             "rejected": ["Tallinn", "Rome", "Oslo"][i % 3]} for i in range(n)]


@pytest.fixture(scope="module")
def dpo_run(tiny_model_dir, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("dpo-run")
    pairs = write_jsonl(root / "pairs.jsonl", _pair_rows(16))
    train(build_config({"model": str(tiny_model_dir), "data": str(pairs), "out": str(root / "run"),
                        "objective": "dpo", "beta": 0.5, "max_steps": 4, "lr": 5e-3,
                        "batch_size": 4, "val_fraction": 0.25, "device": "cpu"}),
          progress=False)
    return root / "run"


def test_compare_on_a_dpo_runs_pairs_reports_preference_per_row(dpo_run, tiny_model_dir,
                                                                tmp_path):
    train_recs, val_recs, _ = run_splits(dpo_run)
    examples = examples_from_records(val_recs)  # the run's own held-out pairs
    assert all(ex.rejected and ex.reference == "Paris" for ex in examples)
    result = run_compare(examples, settings=EvalSettings(max_new_tokens=3, beta=0.5),
                         out=tmp_path / "cmp", model_spec=str(tiny_model_dir),
                         shots_pool=examples_from_records(train_recs), few_shot=[1],
                         finetuned=[finetuned_system(resolve_finetuned(dpo_run), "dpo")],
                         forgetting=False, progress=False)
    assert "pref acc [95% CI]" in result.table and "reward margin" in result.table
    report = json.loads(result.json_path.read_text())
    prefs = report["preference"]
    assert list(prefs) == ["zero-shot", "few-shot k=1", "dpo"]
    for name, pref in prefs.items():
        assert pref["n_pairs"] == len(examples) and pref["beta"] == 0.5
        acc = pref["preference_accuracy"]
        assert acc["ci_low"] <= acc["mean"] <= acc["ci_high"]
        rows = [json.loads(x) for x in
                (tmp_path / "cmp" / "outputs" / f"{name.replace(' ', '-').replace('=', '-')}"
                 ".pairs.jsonl").read_text().splitlines()]
        assert acc["mean"] == sum(r["correct"] for r in rows) / len(rows)
        if pref["reference"] is None:  # no adapter: the margin is beta * the log-prob gap
            assert [r["correct"] for r in rows] == [r["margin"] > 0 for r in rows]
    assert prefs["zero-shot"]["reference"] is None and prefs["dpo"]["reference"]
    # the trained pairs are easy: DPO prefers chosen on all of them, by a positive margin
    assert prefs["dpo"]["preference_accuracy"]["mean"] == 1.0
    assert prefs["dpo"]["reward_margin"]["ci_low"] > 0
    assert report["metric_table"]["dpo"]["preference accuracy"] == 1.0
    assert all("preference" in r for r in report["results"])
    assert "Preference pairs" in result.html_path.read_text()


def test_compare_cli_scores_preference_data_beside_a_task_set(dpo_run, tiny_model_dir, tmp_path,
                                                              capsys):
    task = write_jsonl(tmp_path / "task.jsonl",
                       [{"prompt": f"question {i}: capital of France?", "completion": "Paris"}
                        for i in range(5)])
    pairs = write_jsonl(tmp_path / "pairs.jsonl", _pair_rows(7))
    out = tmp_path / "cmp"
    assert main(["compare", "--model", str(tiny_model_dir), "--data", str(task),
                 "--preference-data", str(pairs), "--adapter", f"dpo={dpo_run}",
                 "--no-forgetting", "--max-new-tokens", "3", "--out", str(out),
                 "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "pref acc [95% CI]" in printed and "no reference model" in printed
    report = json.loads((out / "report.json").read_text())
    assert report["config"]["n_examples"] == 5  # the task metric: on the task set
    assert {p["n_pairs"] for p in report["preference"].values()} == {7}
    # task rows are not pairs: their outputs carry no per-pair numbers
    row = json.loads((out / "outputs" / "dpo.jsonl").read_text().splitlines()[0])
    assert "preference" not in row


def test_eval_cli_preference_errors_name_the_file(tiny_model_dir, tmp_path, capsys):
    task = write_jsonl(tmp_path / "task.jsonl", [{"prompt": "q", "completion": "a"}])
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "q", "chosen": "a", "rejected": "b"},
                                               {"prompt": "q", "chosen": "a"}])
    base = ["eval", "--model", str(tiny_model_dir), "--out", str(tmp_path / "o"),
            "--no-progress"]
    assert main(base + ["--data", str(bad)]) == 2
    assert "bad.jsonl, line 2, field 'rejected'" in capsys.readouterr().err
    assert main(base + ["--data", str(task), "--preference-data", str(task)]) == 2
    assert "--preference-data needs prompt/chosen/rejected" in capsys.readouterr().err
