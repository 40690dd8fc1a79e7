"""Preference data, the shared-prompt pair row, and DPO / ORPO training on the tiny Llama."""

from __future__ import annotations

import json
import logging
import math

import pytest
import torch

from tests.conftest import packed_lora_model, write_jsonl
from tunelab import data, preference
from tunelab.config import build_config
from tunelab.errors import ConfigError, DataError
from tunelab.objectives import DPOObjective
from tunelab.objectives.pairs import PairLogps, collate_pairs
from tunelab.train import train


def rec(row: dict, line: int = 1) -> data.Record:
    return data.Record(row, "pairs.jsonl", line)


def answer_targets(ex: preference.PreferenceExample, side: str) -> list[int]:
    return [t for t in getattr(ex, f"{side}_labels") if t != data.IGNORE_INDEX]


# ----------------------------------------------------------------------------- data


def test_string_pair_is_tokenized_exactly_as_sft(tiny_tokenizer):
    row = {"prompt": "capital of France?", "chosen": "Paris", "rejected": "Tallinn"}
    ex = preference.encode_pair(rec(row), tiny_tokenizer)
    for side in ("chosen", "rejected"):
        sft = data.encode_record(rec({"prompt": row["prompt"], "completion": row[side]}),
                                 "prompt_completion", tiny_tokenizer)
        targets = [t for t in sft.labels if t != data.IGNORE_INDEX]
        assert answer_targets(ex, side) == targets  # loss on the same tokens as SFT
        # prompt + answer is SFT's row up to its last target (end-of-turn included)
        last = max(i for i, t in enumerate(sft.labels) if t != data.IGNORE_INDEX)
        assert ex.prompt + getattr(ex, side) == sft.input_ids[:last + 1]
    assert ex.chosen[-1] == tiny_tokenizer.eos_token_id  # the model learns to stop


def test_chat_and_implicit_prompt_forms_give_the_same_pair(tiny_tokenizer):
    system = {"role": "system", "content": "answer in one word"}
    user = {"role": "user", "content": "capital of France?"}
    good = {"role": "assistant", "content": "Paris"}
    bad = {"role": "assistant", "content": "Tallinn"}
    explicit = preference.encode_pair(rec({"prompt": [system, user], "chosen": [good],
                                           "rejected": [bad]}), tiny_tokenizer)
    implicit = preference.encode_pair(rec({"chosen": [system, user, good],
                                           "rejected": [system, user, bad]}), tiny_tokenizer)
    assert explicit == implicit
    assert tiny_tokenizer.decode(explicit.prompt).startswith("<|im_start|>system")
    assert tiny_tokenizer.decode(explicit.chosen) == "Paris<|im_end|>"


def test_multi_turn_prompt_scores_only_the_last_answer(tiny_tokenizer):
    turns = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hello world"},
             {"role": "user", "content": "capital of France?"}]
    ex = preference.encode_pair(rec({"prompt": turns, "chosen": "Paris", "rejected": "Tallinn"}),
                                tiny_tokenizer)
    assert tiny_tokenizer.decode(answer_targets(ex, "rejected")) == "Tallinn<|im_end|>"
    assert "hello world" in tiny_tokenizer.decode(ex.prompt)


@pytest.mark.parametrize("row,field,message", [
    ({"prompt": "q", "chosen": "a"}, "rejected", "missing field"),
    ({"prompt": "q", "chosen": "a", "rejected": "  "}, "rejected", "empty answer"),
    ({"prompt": "q", "chosen": [{"role": "assistant", "content": "a"},
                                {"role": "assistant", "content": "b"}], "rejected": "c"},
     "chosen", "one assistant message"),
    ({"chosen": [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "a"}],
      "rejected": [{"role": "user", "content": "q2"}, {"role": "assistant", "content": "b"}]},
     "rejected[0]", "do not share their prompt"),
    ({"chosen": [{"role": "user", "content": "q"}, {"role": "assistant", "content": ""}],
      "rejected": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "b"}]},
     "chosen[1].content", "empty answer"),
    ({"prompt": "q", "chosen": [{"role": "robot", "content": "a"}], "rejected": "b"},
     "chosen[0].role", "unknown role"),
])
def test_bad_pairs_name_file_line_and_field(tiny_tokenizer, row, field, message):
    with pytest.raises(DataError) as err:
        preference.encode_pairs([rec({"prompt": "ok", "chosen": "a", "rejected": "b"}),
                                 rec(row, line=2)], tiny_tokenizer)
    text = str(err.value)
    assert text.startswith("pairs.jsonl, line 2, field '" + field + "'")
    assert message in text


@pytest.mark.parametrize("turn,suffix,message", [
    ({"role": "robot", "content": "q"}, ".role", "unknown role 'robot'"),
    ({"role": "user", "content": 3}, ".content", "content must be a string, got int"),
    ("q", "", "expected an object with 'role' and 'content'"),
])
def test_sft_and_preference_chat_fields_fail_with_the_same_words(tiny_tokenizer, turn, suffix,
                                                                 message):
    # one validator serves both readers: the same bad turn reads the same in either file
    errors = []
    for row, name in (({"messages": [turn, {"role": "assistant", "content": "a"}]}, "messages"),
                      ({"prompt": [turn], "chosen": "a", "rejected": "b"}, "prompt")):
        with pytest.raises(DataError) as err:
            if name == "messages":
                data.to_messages(rec(row, line=4), "chat")
            else:
                preference.to_pair(rec(row, line=4))
        text = str(err.value)
        assert text.startswith(f"pairs.jsonl, line 4, field '{name}[0]{suffix}'")
        assert message in text
        errors.append(text.replace("messages[0]", "X").replace("prompt[0]", "X"))
    assert errors[0] == errors[1]


def test_identical_answers_are_dropped_and_counted(tiny_tokenizer, caplog):
    rows = [{"prompt": "q", "chosen": "a", "rejected": "b"},
            {"prompt": "q", "chosen": "same", "rejected": "same"}]
    with caplog.at_level(logging.WARNING):
        examples, stats = preference.encode_pairs([rec(r, i + 1) for i, r in enumerate(rows)],
                                                  tiny_tokenizer)
    assert len(examples) == 1 and stats.n_dropped == 1
    assert "1 preference record(s) dropped" in caplog.text


def test_overlength_pairs_are_truncated_dropped_or_refused(tiny_tokenizer):
    row = {"prompt": "word " * 40, "chosen": "Paris", "rejected": "Tallinn"}
    (ex,), stats = preference.encode_pairs([rec(row)], tiny_tokenizer, max_length=16)
    assert stats.n_truncated == 1
    assert len(ex.prompt) + max(len(ex.chosen), len(ex.rejected)) <= 16
    assert tiny_tokenizer.decode(answer_targets(ex, "chosen")) == "Paris<|im_end|>"
    with pytest.raises(DataError, match="over max_length 16"):
        preference.encode_pairs([rec(row)], tiny_tokenizer, max_length=16, overlength="error")


# ------------------------------------------------------------------ the pair row


def test_pair_row_log_probs_and_grads_equal_separate_rows(tiny_model_dir, tiny_tokenizer):
    """prompt computed once, rejected after chosen in the same row: each answer's log-prob
    and its gradients are those of a row holding only prompt + answer."""
    model = packed_lora_model(tiny_model_dir)
    rows = [{"prompt": "capital of France? " * (1 + i), "chosen": "Paris " * (1 + i % 2),
             "rejected": "Tallinn is it"} for i in range(3)]
    examples, _ = preference.encode_pairs([rec(r, i) for i, r in enumerate(rows)],
                                          tiny_tokenizer)
    logps, counts = PairLogps(model)(**collate_pairs(examples))
    logps.sum().backward()
    packed = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    alone = []
    for ex in examples:
        for ids, labels in ((ex.chosen, ex.chosen_labels), (ex.rejected, ex.rejected_labels)):
            row = torch.tensor([ex.prompt + ids])
            logits = model(input_ids=row).logits[0, :-1].float().log_softmax(-1)
            target = torch.tensor([data.IGNORE_INDEX] * len(ex.prompt) + labels)[1:]
            keep = target != data.IGNORE_INDEX
            alone.append(logits[keep].gather(1, target[keep, None]).sum())
    alone = torch.stack(alone)
    alone.sum().backward()
    torch.testing.assert_close(logps, alone, rtol=1e-5, atol=1e-5)
    assert counts.tolist() == [len(answer_targets(ex, s)) for ex in examples
                              for s in ("chosen", "rejected")]
    for name, grad in packed.items():
        scale = float(grad.abs().max())
        torch.testing.assert_close(grad, model.get_parameter(name).grad, rtol=1e-4,
                                   atol=1e-5 * max(scale, 1e-6))


def test_dpo_reference_is_the_base_with_adapters_off(tiny_model_dir, tiny_tokenizer):
    model = packed_lora_model(tiny_model_dir)
    examples, _ = preference.encode_pairs(
        [rec({"prompt": "q?", "chosen": "Paris", "rejected": "Tallinn"})], tiny_tokenizer)
    batch = collate_pairs(examples)
    objective = DPOObjective(model, beta=0.5)
    ref = objective.reference_logps(batch)
    with model.disable_adapter():
        base = PairLogps(model)(**batch)[0]
    torch.testing.assert_close(ref, base)
    assert not torch.allclose(ref, PairLogps(model)(**batch)[0])  # the adapter matters
    # given the reference's log-probs, the loss uses them rather than a fresh pass
    parts, _ = objective(ref_logps=PairLogps(model)(**batch)[0].detach(), **batch)
    assert float(parts["pairs"]) == pytest.approx(math.log(2), rel=1e-6)


# ------------------------------------------------------------------ config and training


@pytest.mark.parametrize("values,message", [
    ({"objective": "dpo", "beta": 0}, "must be > 0"),
    ({"objective": "kto"}, "allowed: sft, dpo, orpo"),
    ({"objective": "orpo", "label_smoothing": 0.1}, "label_smoothing applies"),
    ({"objective": "dpo", "dpo_loss": "ipo", "label_smoothing": 0.1}, "label_smoothing"),
    ({"objective": "dpo", "method": "full", "init_adapter": "."}, "init_adapter"),
    ({"objective": "dpo", "init_adapter": "/no/such/adapter"}, "is not a folder"),
])
def test_preference_config_errors(values, message):
    with pytest.raises(ConfigError, match=message):
        build_config({"data": "x.jsonl", **values})


PAIRS = [{"prompt": f"question {i}: capital of France?", "chosen": "Paris",
          "rejected": "Tallinn"} for i in range(16)]


def _metrics(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_objective_and_data_must_agree(tiny_model_dir, tmp_path, qa_data):
    pairs = write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    with pytest.raises(ConfigError, match="objective: dpo or orpo"):
        train(build_config({"model": str(tiny_model_dir), "data": str(pairs),
                            "out": str(tmp_path / "a"), "max_steps": 1}), progress=False)
    with pytest.raises(DataError, match="needs preference records"):
        train(build_config({"model": str(tiny_model_dir), "data": str(qa_data),
                            "objective": "dpo", "out": str(tmp_path / "b"), "max_steps": 1}),
              progress=False)


@pytest.mark.parametrize("objective", ["dpo", "orpo"])
def test_preference_training_learns_and_logs_reward_metrics(tiny_model_dir, tmp_path, objective):
    pairs = write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    out = tmp_path / objective
    train(build_config({"model": str(tiny_model_dir), "data": str(pairs), "out": str(out),
                        "objective": objective, "beta": 0.5, "max_steps": 8, "lr": 5e-3,
                        "batch_size": 4, "eval_every": 8, "val_fraction": 0.25,
                        "device": "cpu"}), progress=False)
    rows = _metrics(out)
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracy"):
        assert all(key in r for r in rows)
    assert rows[-1]["rewards/margins"] > rows[0]["rewards/margins"]
    assert rows[-1]["rewards/accuracy"] == 1.0
    assert rows[-1]["train_loss"] < rows[0]["train_loss"]
    assert "val_rewards/accuracy" in rows[-1] and "val_loss" in rows[-1]
    if objective == "dpo":  # the policy starts as the reference: the loss starts at log 2
        assert rows[0]["train_loss"] == pytest.approx(math.log(2), rel=1e-5)
        # tunelab eval on preference data: accuracy and margin with bootstrap intervals
        from tunelab.cli import main

        assert main(["eval", "--model", str(tiny_model_dir), "--adapter", str(out / "adapter"),
                     "--data", str(pairs), "--beta", "0.5", "--out", str(tmp_path / "ev"),
                     "--device", "cpu", "--max-new-tokens", "3", "--no-progress"]) == 0
        result = json.loads((tmp_path / "ev" / "results.json").read_text())["preference"]
        assert result["n_pairs"] == len(PAIRS) and result["reference"]
        assert result["preference_accuracy"]["mean"] == 1.0
        margin = result["reward_margin"]
        assert 0 < margin["ci_low"] <= margin["mean"] <= margin["ci_high"]
        per_pair = [json.loads(x) for x in
                    (tmp_path / "ev" / "pairs.jsonl").read_text().splitlines()]
        assert margin["mean"] == pytest.approx(
            sum(p["margin"] for p in per_pair) / len(PAIRS), rel=1e-3)
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    report = json.loads((out / "report.json").read_text())
    assert report["curves"]["records"][-1]["rewards/margins"] == rows[-1]["rewards/margins"]
    html = (out / "report.html").read_text()
    assert "Preference accuracy" in html and "chosen reward" in html


def test_dpo_from_an_sft_adapter_and_full_finetuning(tiny_model_dir, tmp_path, qa_data):
    """init_adapter: the reference is the starting SFT adapter (so the first DPO loss is
    log 2 although the adapter differs from the base); full fine-tuning: the reference is
    precomputed from the starting weights."""
    sft = tmp_path / "sft"
    train(build_config({"model": str(tiny_model_dir), "data": str(qa_data), "out": str(sft),
                        "max_steps": 3, "lr": 5e-3, "device": "cpu"}), progress=False)
    pairs = write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    for name, extra in (("from-sft", {"init_adapter": str(sft / "adapter")}),
                        ("full", {"method": "full", "lr": 1e-4})):
        out = tmp_path / name
        train(build_config({"model": str(tiny_model_dir), "data": str(pairs), "out": str(out),
                            "objective": "dpo", "max_steps": 3, "lr": 5e-3, "batch_size": 4,
                            "device": "cpu", **extra}), progress=False)
        rows = _metrics(out)
        assert rows[0]["train_loss"] == pytest.approx(math.log(2), rel=1e-5)
        assert rows[-1]["train_loss"] < rows[0]["train_loss"]
    from safetensors.torch import load_file
    start = load_file(sft / "adapter" / "adapter_model.safetensors")
    tuned = load_file(tmp_path / "from-sft" / "adapter" / "adapter_model.safetensors")
    assert start.keys() == tuned.keys()
    assert any(not torch.equal(start[k], tuned[k]) for k in start)


def test_plan_accounts_for_the_dpo_reference():
    from tunelab.plan import build_plan

    kw = {"methods": ("full", "lora"), "gpu": "cpu", "tokens": 100_000, "epochs": 2.0}
    sft, dpo = build_plan("smollm2-135m", **kw), build_plan("smollm2-135m", objective="dpo", **kw)
    for method, passes in (("lora", 1.0), ("full", 0.5)):  # full: precomputed once, 2 epochs
        a, b = sft.methods[method], dpo.methods[method]
        assert b.memory.total == a.memory.total  # no second copy of the model
        extra = b.time.flops_per_token - a.time.flops_per_token
        forward = (a.time.flops_per_token / 3 if method == "full" else None)
        if forward is not None:
            assert extra == pytest.approx(passes * forward)
        assert extra > 0
    assert any("objective dpo" in line for line in dpo.assumptions)
    with pytest.raises(ConfigError, match="unknown objective"):
        build_plan("smollm2-135m", objective="kto", **kw)


def test_training_form_takes_the_objective_and_beta():
    from tunelab.ui.forms import FieldError, train_config

    cfg = train_config({"data": "pairs.jsonl", "objective": "dpo", "beta": "0.2"})
    assert (cfg.objective, cfg.beta) == ("dpo", 0.2)
    with pytest.raises(FieldError) as err:
        train_config({"data": "pairs.jsonl", "objective": "kto"})
    assert err.value.errors[0]["field"] == "objective"
