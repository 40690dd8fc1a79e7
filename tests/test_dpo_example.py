"""examples/dpo/pipeline.py end to end on the tiny Llama: SFT, pairs from its own sampled
answers, DPO from the SFT adapter, compare with preference accuracy (seconds, not minutes)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from tunelab.evaluate.metrics import json_exact

PIPELINE = Path(__file__).resolve().parent.parent / "examples" / "dpo" / "pipeline.py"


def _pipeline():
    spec = importlib.util.spec_from_file_location("dpo_pipeline", PIPELINE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_dpo_pipeline_runs_every_stage_at_toy_size(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "dpo-example"
    assert _pipeline().main(["--quick", "--model", str(tiny_model_dir), "--out", str(out),
                             "--max-new-tokens", "6", "--n-eval", "6", "--no-progress"]) == 0
    stats = json.loads((out / "pairs" / "stats.json").read_text())
    pairs = [json.loads(x) for x in (out / "pairs" / "train.jsonl").read_text().splitlines()]
    assert len(pairs) == stats["train"]["pairs"] > 0
    # rejected answers are the model's wrong ones; chosen is the right record
    assert all(json_exact(p["rejected"], p["chosen"]) == 0.0 for p in pairs)
    assert (out / "dpo" / "adapter").is_dir()
    run_config = json.loads((out / "dpo" / "run_config.json").read_text())
    assert run_config["objective"] == "dpo"
    assert run_config["init_adapter"] == str(out / "sft" / "adapter")

    summary = json.loads((out / "summary.json").read_text())
    names = [r["name"] for r in summary["rows"]]
    assert names == ["few-shot k=3", "SFT (4 steps)", "SFT+DPO (4 steps)"]
    n_held = stats["heldout"]["pairs"]
    for row in summary["rows"]:
        pref = row["preference"]
        assert pref["n_pairs"] == n_held
        acc = pref["preference_accuracy"]
        assert acc["ci_low"] <= acc["mean"] <= acc["ci_high"]
    assert summary["rows"][0]["preference"]["reference"] is None  # the base: no adapter
    diff = summary["dpo_minus_sft"]
    assert set(diff["fields"]) == {"country", "capital", "region", "population", "currency"}
    assert "preference_accuracy" in diff
    table = (out / "table.md").read_text()
    assert table.startswith("| system | exact records [95% CI] |")
    assert "SFT+DPO − SFT (paired)" in table and table in capsys.readouterr().out
