"""The quickstart's whole story, on the tiny model and a tiny countries-like file."""

from __future__ import annotations

import json
from pathlib import Path

from tests.conftest import write_jsonl

from tunelab import quickstart


def test_quickstart_story_on_the_tiny_model(tiny_model_dir, tmp_path: Path, monkeypatch,
                                            capsys) -> None:
    rows = [{"prompt": f"{c} has capital {k}.",
             "completion": json.dumps({"country": c, "capital": k})}
            for c, k in [("Chad", "N'Djamena"), ("Peru", "Lima"), ("Fiji", "Suva"),
                         ("Mali", "Bamako"), ("Laos", "Vientiane"), ("Togo", "Lome"),
                         ("Iran", "Tehran"), ("Cuba", "Havana"), ("Oman", "Muscat"),
                         ("Chile", "Santiago"), ("Nepal", "Kathmandu"), ("Spain", "Madrid")]]
    data = write_jsonl(tmp_path / "countries.jsonl", rows)
    monkeypatch.setattr(quickstart, "dataset_path", lambda: data)
    monkeypatch.setattr(quickstart, "QUICKSTART", {
        **quickstart.QUICKSTART, "model": str(tiny_model_dir), "batch_size": 4,
        "device": "cpu", "eval_every": 1, "save_every": 0})
    monkeypatch.setattr(quickstart, "MAX_NEW_TOKENS", 6)
    out = tmp_path / "qs"
    html = quickstart.run_quickstart(str(out), max_steps=2, progress=False)
    assert html == out / "compare" / "report.html" and html.is_file()
    printed = capsys.readouterr().out
    for text in ("[1/2] LoRA fine-tuning", "[2/2] 3 held-out sentences", "json_exact [95% CI]",
                 "few-shot k=3", "LoRA (2 steps)", "verdict:", "forgetting:", "curves (",
                 f"report: {html}", f"adapter saved to {out / 'adapter'}", "quickstart took"):
        assert text in printed, text
    report = json.loads((out / "compare" / "report.json").read_text())
    assert [s["kind"] for s in report["systems"]] == ["zero_shot", "few_shot", "finetuned"]
    assert report["config"]["instruction"] == quickstart.SCHEMA_INSTRUCTION
    assert (out / "report.html").is_file()  # the training run's own report
    # The held-out examples are exactly the run's validation split.
    from tunelab.data import read_records, split_records

    _, val = split_records(read_records(data), 0.25, 0)
    assert [e["reference"] for e in report["examples"]] == [r.data["completion"] for r in val]
