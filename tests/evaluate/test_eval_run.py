"""`tunelab eval` mechanics on the tiny model: examples, prompts, batching, loss, outputs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tests.conftest import write_jsonl

from tunelab import data, models
from tunelab.cli import main
from tunelab.errors import ConfigError, DataError, ModelError
from tunelab.evaluate.run import (
    EvalSettings,
    PromptStyle,
    choose_shots,
    evaluate_system,
    examples_from_records,
    examples_nll,
    generate_batched,
    load_eval_examples,
    reference_example,
    resolve_finetuned,
    resolve_metrics,
    run_splits,
)
from tunelab.generate import GenerationSettings, build_prompt, generate
from tunelab.loss import TargetLoss


def _records(rows: list[dict]) -> list[data.Record]:
    return [data.Record(r, "mem.jsonl", i + 1) for i, r in enumerate(rows)]


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return models.load_model(str(tiny_model_dir), device="cpu")


def json_rows(n: int) -> list[dict]:
    return [{"prompt": f"question {i}: capital of France?",
             "completion": json.dumps({"capital": "Paris", "n": i % 3})} for i in range(n)]


# ------------------------------------------------------------------------- examples


def test_examples_from_every_format() -> None:
    pc = examples_from_records(_records([{"prompt": "p", "completion": "c"}]))[0]
    assert pc.messages == [{"role": "user", "content": "p"}] and pc.reference == "c"
    assert pc.id == "mem.jsonl:1"
    ins = examples_from_records(_records([{"instruction": "do", "input": "x", "output": "y",
                                           "id": 7}]))[0]
    assert ins.messages[0]["content"] == "do\n\nx" and ins.reference == "y" and ins.id == "7"
    chat = examples_from_records(_records([{"messages": [
        {"role": "system", "content": "s"}, {"role": "user", "content": "u1"},
        {"role": "assistant", "content": "a1"}, {"role": "user", "content": "u2"},
        {"role": "assistant", "content": "a2"}, {"role": "user", "content": "trailing"}]}]))[0]
    assert chat.reference == "a2" and [m["content"] for m in chat.messages] == ["s", "u1",
                                                                                "a1", "u2"]
    assert chat.question == "u2"


def test_eval_file_without_references_is_rejected(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": "just text"}])
    with pytest.raises(DataError, match="t.jsonl: evaluation needs a reference answer"):
        load_eval_examples(path)
    with pytest.raises(DataError, match="no user turn|starts with an assistant turn"):
        examples_from_records(_records([{"messages": [{"role": "assistant", "content": "a"}]}]))
    with pytest.raises(DataError, match="--limit"):
        load_eval_examples(write_jsonl(tmp_path / "x.jsonl", json_rows(2)), limit=0)


def test_prompt_styles_put_shots_and_instruction_in_turns() -> None:
    ex = examples_from_records(_records([{"prompt": f"q{i}", "completion": f"a{i}"}
                                         for i in range(6)]))
    zero = PromptStyle("z", instruction="Be brief.")
    assert zero.messages(ex[0]) == [{"role": "user", "content": "Be brief.\n\nq0"}]
    few = PromptStyle("f", "few_shot", "Be brief.", "sys", shots=[ex[1], ex[2]])
    msgs = few.messages(ex[0])
    assert [m["role"] for m in msgs] == ["system", "user", "assistant", "user", "assistant",
                                         "user"]
    assert msgs[1]["content"] == "Be brief.\n\nq1" and msgs[2]["content"] == "a1"
    assert msgs[-1]["content"] == "q0"  # the question itself is left as in the data
    assert PromptStyle("ft", "finetuned").messages(ex[0]) == ex[0].messages


def test_choose_shots_is_seeded_and_never_uses_eval_examples() -> None:
    pool = examples_from_records(_records([{"prompt": f"q{i}", "completion": f"a{i}"}
                                           for i in range(10)]))
    a = choose_shots(pool, 3, seed=1)
    assert [s.id for s in a] == [s.id for s in choose_shots(pool, 3, seed=1)]
    assert [s.id for s in a] != [s.id for s in choose_shots(pool, 3, seed=2)]
    shots = choose_shots(pool, 8, seed=0, exclude=pool[:2])
    assert not {s.key() for s in shots} & {e.key() for e in pool[:2]}
    with pytest.raises(DataError, match="needs 9 examples"):
        choose_shots(pool, 9, exclude=pool[:2])
    with pytest.raises(DataError, match="at least 1"):
        choose_shots(pool, 0)


# ----------------------------------------------------------------------- generation


def test_batched_generation_matches_generate(tiny) -> None:
    model, tok = tiny
    shared = "You are a careful assistant. Always answer in one line of JSON. " * 3
    texts = ["question 1: capital of France?", "Tallinn is the capital of Estonia.", "hi",
             "A quick brown fox jumps over the lazy dog.", "0 1 2"]
    prompts = [build_prompt(tok, shared + t) for t in texts]
    settings = GenerationSettings(max_new_tokens=10)
    expected = generate(model, tok, prompts, settings)
    # Shared prefix reused (the long instruction) and plain left padding, across batches.
    for reuse in (True, False):
        got = generate_batched(model, tok, prompts, settings, batch_size=2, progress=False,
                               reuse_prefix=reuse)
        assert [g["text"] for g in got] == [e["text"] for e in expected]
        assert [g["prompt_tokens"] for g in got] == [e["prompt_tokens"] for e in expected]
        assert all(g["seconds"] > 0 for g in got)


def test_shared_prefix_works_through_a_peft_model(tiny_model_dir) -> None:
    from tunelab.adapters import attach_lora

    model, tok = models.load_model(str(tiny_model_dir), device="cpu")
    torch.manual_seed(0)
    lora = attach_lora(model, r=4, alpha=8, dropout=0.0, target_modules="all-linear")
    for name, p in lora.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.5)  # make the adapter change the outputs
    prompts = [build_prompt(tok, "Always answer in JSON, please. " * 4 + q)
               for q in ("capital of France?", "Estonia", "hello world")]
    settings = GenerationSettings(max_new_tokens=8)
    expected = generate(lora, tok, prompts, settings)
    got = generate_batched(lora, tok, prompts, settings, batch_size=2, progress=False)
    assert [g["text"] for g in got] == [e["text"] for e in expected]
    # compare merges a LoRA for speed, then unmerges and unloads to get the base back.
    ids = tok(prompts[0], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        before = lora(input_ids=ids).logits
        lora.merge_adapter()
        merged = generate_batched(lora, tok, prompts, settings, batch_size=2, progress=False)
        assert [m["text"] for m in merged] == [e["text"] for e in expected]
        lora.unmerge_adapter()
        torch.testing.assert_close(lora(input_ids=ids).logits, before, rtol=1e-4, atol=1e-4)
    unloaded = lora.unload()
    fresh, _ = models.load_model(str(tiny_model_dir), device="cpu")
    with torch.no_grad():
        torch.testing.assert_close(unloaded(input_ids=ids).logits, fresh(input_ids=ids).logits,
                                   rtol=1e-4, atol=1e-4)
    plain = generate(unloaded, tok, prompts, settings)
    assert [p["text"] for p in plain] != [e["text"] for e in expected]


def test_sampling_is_seeded(tiny) -> None:
    model, tok = tiny
    prompts = [build_prompt(tok, f"question {i}") for i in range(3)]
    s = GenerationSettings(max_new_tokens=8, temperature=1.0, seed=3)
    a = generate_batched(model, tok, prompts, s, batch_size=2, progress=False)
    b = generate_batched(model, tok, prompts, s, batch_size=2, progress=False)
    assert [x["text"] for x in a] == [x["text"] for x in b]


def test_reference_loss_labels_only_the_answer(tiny) -> None:
    model, tok = tiny
    messages = [{"role": "user", "content": "capital of France?"}]
    ex = reference_example(tok, messages, "Paris")
    targets = [t for t in ex.labels if t != data.IGNORE_INDEX]
    assert tok.decode(targets) == "Paris<|im_end|>"
    prompt_len = len(tok(build_prompt(tok, messages), add_special_tokens=False)["input_ids"])
    assert ex.labels[:prompt_len] == [data.IGNORE_INDEX] * prompt_len
    # Per-example sums add up to the training loss over the same batch.
    other = reference_example(tok, [{"role": "user", "content": "and Estonia?"}], "Tallinn")
    per = examples_nll(model, [ex, other], pad_id=tok.pad_token_id, batch_size=2)
    batch = data.collate([ex, other], tok.pad_token_id)
    with torch.no_grad():
        total, n = TargetLoss(model)(**batch)
    assert sum(x for x, _ in per) == pytest.approx(float(total), rel=1e-4)
    assert sum(k for _, k in per) == int(n)


# ------------------------------------------------------------------------ evaluation


def test_evaluate_system_scores_and_outputs(tiny, tmp_path: Path) -> None:
    model, tok = tiny
    examples = examples_from_records(_records(json_rows(5)))
    settings = EvalSettings(batch_size=2, max_new_tokens=6)
    result = evaluate_system(model, tok, examples, PromptStyle("zs"), settings, progress=False)
    assert result.metrics == ["json_exact", "json_fields", "json_valid"]  # JSON references
    assert all(len(v) == 5 for v in result.scores.values())
    assert set(result.field_scores or {}) == {"capital", "n"}
    row = result.outputs[0]
    assert {"id", "input", "reference", "prediction", "scores", "fields", "finish_reason",
            "prompt_tokens", "completion_tokens", "reference_nll", "prompt"} <= set(row)
    assert result.loss is not None and result.perplexity > 1
    sr = result.system_result()
    assert sr.kind == "zero_shot" and sr.example_ids == result.example_ids
    assert result.summary()["reference_perplexity"]["ci_low"] <= result.perplexity


def test_metric_validation_happens_before_generation() -> None:
    text_refs = examples_from_records(_records([{"prompt": "p", "completion": "not json"}]))
    with pytest.raises(DataError, match="'json_exact' needs a JSON reference"):
        resolve_metrics(["json_exact"], text_refs)
    with pytest.raises(ConfigError, match="unknown metric 'bleu'"):
        resolve_metrics(["bleu"], text_refs)
    assert [m.name for m in resolve_metrics([], text_refs)] == ["exact", "normalized_exact",
                                                                 "rouge_l"]
    assert [m.name for m in resolve_metrics(["exact", "exact", "contains"], text_refs)] == [
        "exact", "contains"]


# --------------------------------------------------------------------- sources and CLI


def test_resolve_finetuned_sources(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="adapter not found"):
        resolve_finetuned(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="not a LoRA adapter, a model folder, or a tunelab"):
        resolve_finetuned(tmp_path / "empty")
    run = tmp_path / "run"
    (run / "adapter").mkdir(parents=True)
    (run / "adapter" / "adapter_config.json").write_text("{}")
    (run / "run_config.json").write_text('{"method": "lora"}')
    src = resolve_finetuned(run)
    assert src.kind == "lora" and src.path == run / "adapter" and src.run_dir == run
    assert resolve_finetuned(run / "adapter").run_dir == run
    full = tmp_path / "full"
    (full / "model").mkdir(parents=True)
    (full / "model" / "config.json").write_text("{}")
    src = resolve_finetuned(full)
    assert src.kind == "full" and src.path == full / "model" and src.method == "full"


def test_run_splits_match_training(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", json_rows(20))
    (tmp_path / "run_config.json").write_text(json.dumps(
        {"data": str(path), "val_fraction": 0.25, "seed": 3, "format": "auto"}))
    train, val, fmt = run_splits(tmp_path)
    expected = data.split_records(data.read_records(path), 0.25, 3)
    assert [r.line for r in train] == [r.line for r in expected[0]]
    assert [r.line for r in val] == [r.line for r in expected[1]] and fmt == "auto"


def test_eval_cli_writes_outputs_and_report(tiny_model_dir, tmp_path: Path, capsys) -> None:
    heldout = write_jsonl(tmp_path / "heldout.jsonl", json_rows(6))
    shots = write_jsonl(tmp_path / "train.jsonl", json_rows(12)[6:])
    out = tmp_path / "eval"
    code = main(["eval", "--model", str(tiny_model_dir), "--data", str(heldout), "--limit", "4",
                 "--metric", "json_fields", "--metric", "exact", "--few-shot", "2",
                 "--shots-from", str(shots), "--instruction", "JSON please.",
                 "--max-new-tokens", "5", "--batch-size", "3", "--out", str(out),
                 "--no-progress"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "few-shot k=2: 4 examples" in printed and "json_fields" in printed
    assert "reference loss" in printed and "per field" in printed
    rows = [json.loads(line) for line in (out / "outputs.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and rows[0]["reference"] == json_rows(1)[0]["completion"]
    assert rows[0]["prompt"][0]["content"].startswith("JSON please.")
    assert len(rows[0]["prompt"]) == 5  # two shots (user, assistant) + the question
    results = json.loads((out / "results.json").read_text())
    assert results["headline_metric"] == "json_fields" and results["kind"] == "few_shot"
    assert (out / "report.html").is_file()


@pytest.mark.parametrize(("args", "message"), [
    (["--metric", "bleu"], "unknown metric 'bleu'"),
    (["--adapter", "/nonexistent/adapter"], "adapter not found"),
    (["--few-shot", "2"], "--few-shot needs --shots-from"),
    (["--metric", "json_exact", "--data", "TEXT"], "evaluation needs a reference answer"),
])
def test_eval_cli_bad_input(tiny_model_dir, tmp_path: Path, capsys, args, message) -> None:
    heldout = write_jsonl(tmp_path / "heldout.jsonl", json_rows(3))
    text = write_jsonl(tmp_path / "text.jsonl", [{"text": "no reference"}])
    args = [str(text) if a == "TEXT" else a for a in args]
    base = ["eval", "--model", str(tiny_model_dir), "--out", str(tmp_path / "o"), "--no-progress"]
    if "--data" not in args:
        base += ["--data", str(heldout)]
    assert main(base + args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and "Traceback" not in err
