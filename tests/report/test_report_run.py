"""The training-run report: built from a run directory's files, never fatal."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from tunelab.report.run import build_run_report, read_metrics, write_run_report


def _fake_run(folder: Path, *, overfit: bool = True) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for step in range(1, 31):
        rec = {"step": step, "train_loss": 2.0 / step, "lr": 1e-3}
        if step % 5 == 0:
            rec["val_loss"] = ([1.5, 1.0, 0.8, 0.9, 1.0, 1.1][step // 5 - 1] if overfit
                               else 1.5 / step)
        lines.append(json.dumps(rec))
    (folder / "metrics.jsonl").write_text("\n".join(lines) + '\n{"step": 31, "train_lo')
    (folder / "summary.json").write_text(json.dumps({
        "steps": 30, "final_train_loss": 0.07, "final_val_loss": 1.1, "best_val_loss": 0.8,
        "best_step": 15, "train_seconds": 208.0, "tokens_per_second": 151.0,
        "peak_memory_bytes": 2 * 2**30, "data_stats": {"records": 178, "truncated": 0,
                                                       "dropped": 0}}))
    (folder / "run_config.json").write_text(json.dumps({
        "model": "smollm2-135m", "data": "countries.jsonl", "method": "lora", "lora_r": 16,
        "device": "cpu"}))
    return folder


def test_run_report_has_curves_flag_config_and_licence(tmp_path: Path) -> None:
    run = _fake_run(tmp_path / "run")
    assert len(read_metrics(run / "metrics.jsonl")) == 30  # torn last line skipped
    html = write_run_report(run)
    assert html == run / "report.html"
    report = json.loads((run / "report.json").read_text())
    flag = report["curves"]["overfit"]
    assert flag["detected"] and flag["best_step"] == 15 and flag["start_step"] == 20
    assert report["config"]["lora_r"] == 16 and report["config"]["data_stats"]["records"] == 178
    assert report["config"]["results"]["train_seconds"] == 208.0
    assert "LoRA fine-tune of smollm2-135m on countries.jsonl: 30 steps in 3m 28s (151 " in \
        report["summary"]
    assert report["environment"]["device"] == "cpu"
    assert report["licence"][0]["id"] == "apache-2.0"
    text = html.read_text()
    assert "overfitting from step 20" in text and "best step 15" in text
    assert 'id="curves"' in text and 'id="licence"' in text


def test_no_overfitting_and_unfinished_run(tmp_path: Path) -> None:
    run = _fake_run(tmp_path / "run", overfit=False)
    assert not build_run_report(run)["curves"]["overfit"].detected
    (run / "summary.json").unlink()
    report = build_run_report(run)
    assert "has not finished" in report["summary"] and "curves" in report


def test_a_broken_run_directory_never_raises(tmp_path: Path, caplog) -> None:
    run = _fake_run(tmp_path / "run")
    (run / "summary.json").write_text("{not json")
    with caplog.at_level(logging.WARNING):
        assert write_run_report(run) is None
    assert "could not write the run report" in caplog.text
    assert write_run_report(tmp_path / "missing" / "deeper").is_file()  # empty report
