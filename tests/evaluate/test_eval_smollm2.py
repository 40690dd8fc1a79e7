"""A tiny `tunelab compare` end to end on the real SmolLM2-135M-Instruct (slow)."""

from __future__ import annotations

import json

import pytest

from tunelab.cli import main
from tunelab.config import build_config
from tunelab.quickstart import SCHEMA_INSTRUCTION, dataset_path
from tunelab.train import train

pytestmark = pytest.mark.slow


def test_compare_zero_few_shot_and_adapter_on_smollm2(tmp_path, capsys):
    run = tmp_path / "run"
    train(build_config({"model": "smollm2-135m", "data": str(dataset_path()),
                        "out": str(run), "max_steps": 3, "batch_size": 4, "lr": 1e-3,
                        "val_fraction": 0.25, "eval_every": 3, "max_length": 256,
                        "device": "cpu"}), progress=False)
    assert (run / "report.html").is_file()
    out = tmp_path / "compare"
    # No --data: the run's own validation split; shots from its training split.
    code = main(["compare", "--adapter", f"lora-3={run}", "--few-shot", "1", "--limit", "8",
                 "--instruction", SCHEMA_INSTRUCTION, "--max-new-tokens", "48",
                 "--batch-size", "8", "--out", str(out), "--no-progress"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "json_exact [95% CI]" in printed and "verdict:" in printed
    assert "forgetting:" in printed and "curves (lora-3)" in printed
    report = json.loads((out / "report.json").read_text())
    rows = {s["name"]: s for s in report["systems"]}
    assert list(rows) == ["zero-shot", "few-shot k=1", "lora-3"]
    # Few-shot pays for its examples in prompt tokens; the adapter needs no instruction.
    assert (rows["few-shot k=1"]["prompt_tokens"] > rows["zero-shot"]["prompt_tokens"]
            > rows["lora-3"]["prompt_tokens"])
    assert rows["lora-3"]["train_time_s"] > 0 and rows["lora-3"]["peak_memory_bytes"] > 0
    assert report["verdict"]["diff_method"] == "paired"
    assert report["verdict"]["n_examples"] == 8
    names = [i["name"] for i in report["forgetting"]["items"]]
    assert names == ["general-text perplexity", "general-knowledge probe accuracy"]
    base = report["general_ability"]["base"]
    assert 1 < base["perplexity"] < 100  # SmolLM2 reads English prose well
    assert base["probe_accuracy"] > 0.3  # and knows some general facts
    outputs = (out / "outputs" / "few-shot-k-1.jsonl").read_text().splitlines()
    assert len(outputs) == 8 and json.loads(outputs[0])["prediction"]
    assert report["licence"][0]["id"] == "apache-2.0"
