"""`tunelab compare` on the tiny model: rows, costs, verdict, forgetting, curves, report, CLI."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
from tests.conftest import write_jsonl

from tunelab.cli import main
from tunelab.config import build_config
from tunelab.evaluate.compare import (
    FinetunedSystem,
    finetuned_system,
    format_table,
    run_compare,
    slug,
)
from tunelab.evaluate.run import (
    EvalResult,
    EvalSettings,
    examples_from_records,
    resolve_finetuned,
    run_splits,
)
from tunelab.train import train

TESTS = Path(__file__).resolve().parents[1]


def _rows(n: int) -> list[dict]:
    return [{"prompt": f"question {i}: capital of France?",
             "completion": json.dumps({"capital": "Paris", "n": i % 3})} for i in range(n)]


@pytest.fixture(scope="module")
def runs(tiny_model_dir, tmp_path_factory):
    """A LoRA run and a full fine-tuning run of the tiny model on the same data."""
    root = tmp_path_factory.mktemp("compare-runs")
    path = write_jsonl(root / "data.jsonl", _rows(24))
    common = {"model": str(tiny_model_dir), "data": str(path), "val_fraction": 0.25,
              "eval_every": 1, "batch_size": 4, "device": "cpu", "seed": 0}
    train(build_config({**common, "out": str(root / "lora"), "method": "lora", "lora_r": 4,
                        "lr": 5e-3, "max_steps": 3}), progress=False)
    train(build_config({**common, "out": str(root / "full"), "method": "full", "lr": 1e-3,
                        "max_steps": 2}), progress=False)
    return root


def report_forgot(result) -> list[str]:
    return sorted(json.loads(result.json_path.read_text())["verdict"]["forgot"])


def test_training_runs_write_their_report(runs) -> None:
    for name in ("lora", "full"):
        report = json.loads((runs / name / "report.json").read_text())
        assert report["curves"]["records"] and "overfit" in report["curves"]
        assert report["config"]["method"] == name
        assert report["config"]["data_stats"]["records"] == 18
        assert (runs / name / "report.html").is_file()


def test_compare_end_to_end(runs, tiny_model_dir, tmp_path: Path) -> None:
    train_recs, val_recs, _ = run_splits(runs / "lora")
    examples = examples_from_records(val_recs)
    pool = examples_from_records(train_recs)
    finetuned = [finetuned_system(resolve_finetuned(runs / "lora")),
                 FinetunedSystem("full FT", resolve_finetuned(runs / "full"))]
    assert finetuned[0].name == "LoRA (lora)"
    result = run_compare(examples, settings=EvalSettings(batch_size=16, max_new_tokens=5),
                         out=tmp_path / "cmp", model_spec=str(tiny_model_dir),
                         shots_pool=pool, few_shot=[2, 1], instruction="Reply with JSON.",
                         finetuned=finetuned, progress=False)
    names = [e.name for e in result.evals]
    assert names == ["zero-shot", "few-shot k=1", "few-shot k=2", "LoRA (lora)", "full FT"]
    tokens = {e.name: e.prompt_tokens for e in result.evals}
    assert tokens["few-shot k=2"] > tokens["few-shot k=1"] > tokens["zero-shot"]
    assert tokens["LoRA (lora)"] < tokens["zero-shot"]  # no instruction
    ft = result.evals[3]
    summary = json.loads((runs / "lora" / "summary.json").read_text())
    assert ft.train_time_s == summary["train_seconds"]
    assert ft.peak_memory_bytes == summary["peak_memory_bytes"]
    # Verdict, forgetting (items per system with two fine-tuned rows), curves.
    assert result.verdict.decision in ("finetune", "tradeoff", "prompting_better",
                                       "prefer_prompting")
    assert result.verdict.diff_method == "paired"
    item_names = [i.name for i in result.forgetting.items]
    assert item_names == ["LoRA (lora): general-text perplexity",
                          "LoRA (lora): general-knowledge probe accuracy",
                          "full FT: general-text perplexity",
                          "full FT: general-knowledge probe accuracy"]
    # the verdict weighed each run's own forgetting: it names exactly the runs whose items
    # are flagged in the forgetting section
    flagged = {i.name.split(": ")[0] for i in result.forgetting.items if i.flagged}
    assert set(result.verdict.forgot) == flagged
    assert report_forgot(result) == sorted(flagged)
    assert set(result.overfit) == {"LoRA (lora)", "full FT"}
    # Files: report + one readable JSONL per row.
    report = json.loads(result.json_path.read_text())
    assert [s["name"] for s in report["systems"]] == names
    assert report["verdict"]["text"] == result.verdict.text
    assert report["curves"]["overfit"]["best_step"] is not None
    assert report["forgetting"]["items"] and report["general_ability"]["base"]["probe"]
    assert set(report["field_scores"]) == set(names)
    assert report["examples"][0]["LoRA (lora)"].startswith("[")
    assert report["config"]["few_shot"]["few-shot k=1"]
    for name in names:
        lines = (tmp_path / "cmp" / "outputs" / f"{slug(name)}.jsonl").read_text().splitlines()
        assert len(lines) == len(examples)
    html = result.html_path.read_text()
    for section in ("verdict", "scores", "compare", "metrics", "fields", "curves",
                    "forgetting", "examples"):
        assert f'id="{section}"' in html, section
    assert "few-shot k=2" in result.table and "train time" in result.table


def test_compare_cli_uses_the_runs_split(runs, tiny_model_dir, tmp_path: Path,
                                         capsys) -> None:
    out = tmp_path / "cli"
    code = main(["compare", "--adapter", f"mine={runs / 'lora'}", "--few-shot", "1",
                 "--max-new-tokens", "4", "--batch-size", "8", "--no-forgetting",
                 "--metric", "json_fields", "--out", str(out), "--no-progress"])
    assert code == 0  # --model defaults to the run's base model
    printed = capsys.readouterr().out
    assert "json_fields [95% CI]" in printed and "mine" in printed
    assert "verdict:" in printed and f"report: {out / 'report.html'}" in printed
    report = json.loads((out / "report.json").read_text())
    assert report["config"]["model"] == str(tiny_model_dir)
    assert "validation split" in report["summary"]
    assert len(report["examples"]) == 6 and "forgetting" not in report


@pytest.mark.parametrize(("args", "message"), [
    (["--few-shot", "1"], "--few-shot needs solved examples"),
    (["--few-shot", "0", "--shots-from", "DATA"], "--few-shot K must be at least 1"),
    (["--adapter", "/nonexistent/run"], "adapter not found"),
    (["--metric", "nope"], "unknown metric 'nope'"),
    (["--adapter", "a=RUN", "--adapter", "a=RUN"], "two rows are named 'a'"),
])
def test_compare_cli_bad_input(runs, tiny_model_dir, tmp_path: Path, capsys, args,
                               message) -> None:
    data = write_jsonl(tmp_path / "d.jsonl", _rows(4))
    args = [a.replace("DATA", str(data)).replace("RUN", str(runs / "lora")) for a in args]
    assert main(["compare", "--model", str(tiny_model_dir), "--data", str(data), "--out",
                 str(tmp_path / "o"), "--no-progress", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and "Traceback" not in err


def test_compare_needs_data_or_a_run(tiny_model_dir, tmp_path: Path, capsys) -> None:
    assert main(["compare", "--model", str(tiny_model_dir), "--out", str(tmp_path)]) == 2
    assert "--data FILE is required" in capsys.readouterr().err


def test_format_table() -> None:
    def result(name: str, kind: str, scores: list[float], **kw) -> EvalResult:
        return EvalResult(name, kind, ["exact", "contains"], {"exact": scores,
                                                             "contains": scores},
                          [str(i) for i in range(len(scores))], [], 123.4, 0.25, 1.0, **kw)

    table = format_table([result("zero-shot", "zero_shot", [0, 0, 1, 0]),
                          result("LoRA", "finetuned", [1, 1, 1, 0], train_time_s=95.0,
                                 peak_memory_bytes=2 * 2**30)])
    lines = table.splitlines()
    assert lines[0].split()[:4] == ["system", "kind", "exact", "[95%"]
    assert "contains" in lines[0] and "ref ppl" not in lines[0]
    assert "0.25 [" in lines[2] and "250 ms" in lines[2] and lines[2].rstrip().endswith("-")
    assert "1m 35s" in lines[3] and "2.0 GiB" in lines[3] and "fine-tuned" in lines[3]
    assert len({len(line) for line in lines[:2]}) == 1  # header and rule line up


# ----------------------------------------------------------------------------- browser


def _browser():
    name = "tunelab_tests_browser"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, TESTS / "browser.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    browser = sys.modules[name]
    browser.require_browser()
    return browser


def test_compare_report_renders_in_chromium(runs, tiny_model_dir, tmp_path: Path,
                                            artifacts: Path) -> None:
    browser = _browser()
    train_recs, val_recs, _ = run_splits(runs / "lora")
    result = run_compare(examples_from_records(val_recs),
                         settings=EvalSettings(batch_size=8, max_new_tokens=4),
                         out=tmp_path / "cmp", model_spec=str(tiny_model_dir),
                         shots_pool=examples_from_records(train_recs), few_shot=[1],
                         finetuned=[finetuned_system(resolve_finetuned(runs / "lora"))],
                         progress=False)
    shot = browser.render_page(result.html_path, artifacts / "compare-report.png")
    assert not browser.is_blank_png(shot.screenshot)
    assert shot.console_errors == []
    assert shot.external_requests == []
    run_shot = browser.render_page(runs / "lora" / "report.html", artifacts / "run-report.png")
    assert not browser.is_blank_png(run_shot.screenshot)
    assert run_shot.console_errors == [] and run_shot.external_requests == []
