"""``tunelab sweep``: the grid, the frontier and recommendation, and a two-run sweep of the
tiny model end to end (trained, compared, reported, and not retrained when run again)."""

from __future__ import annotations

import json

import pytest

from tests.conftest import write_jsonl
from tunelab.cli import main
from tunelab.errors import ConfigError
from tunelab.sweep import frontier, grid, parse_axes, recommend


def test_grid_is_the_product_of_the_axes_in_order():
    points = grid(parse_axes(["lr=1e-4,3e-4", "lora_r=8,16"]))
    assert [p.name for p in points] == ["lr=1e-4_lora_r=8", "lr=1e-4_lora_r=16",
                                        "lr=3e-4_lora_r=8", "lr=3e-4_lora_r=16"]


@pytest.mark.parametrize(("specs", "message"), [
    (["lr"], "write KEY=V1,V2"),
    (["lrr=1e-4"], "'lrr' is not a config key"),
    (["out=a,b"], "the sweep sets it"),
    (["lr=1e-4", "lr=3e-4"], "given twice"),
    (["lr=1e-4,,3e-4"], "empty or repeated value"),
    ([], "at least one axis"),
])
def test_bad_axes_get_one_clear_error(specs, message):
    with pytest.raises(ConfigError, match=message):
        parse_axes(specs)


def test_frontier_keeps_the_runs_no_other_run_beats_on_both():
    points = {"a": (0.0, 0.5), "b": (-0.3, 0.9), "c": (-0.4, 0.6), "d": (-0.1, 0.7)}
    assert frontier(points) == ["b", "d", "a"]  # c is beaten by b (and d) on both


def test_recommendation_prefers_a_run_that_kept_general_ability():
    scores = {"a": 0.5, "b": 0.9, "d": 0.7}
    best, why = recommend(scores, forgot={"b"}, on_frontier=["b", "d", "a"])
    assert best == "d" and "forgot nothing" in why
    best, why = recommend(scores, forgot={"a", "b", "d"}, on_frontier=["b", "d", "a"])
    assert best == "b" and "trade-off" in why


def test_a_two_run_sweep_trains_scores_and_resumes(tiny_model_dir, tmp_path, capsys):
    rows = [{"prompt": f"question {i}: capital of France?",
             "completion": json.dumps({"capital": "Paris", "n": i % 3})} for i in range(16)]
    write_jsonl(tmp_path / "data.jsonl", rows)
    config = tmp_path / "sweep.yaml"
    config.write_text(f"model: {tiny_model_dir}\ndata: data.jsonl\nmethod: lora\nlora_r: 4\n"
                      "batch_size: 4\nmax_steps: 2\nval_fraction: 0.25\ndevice: cpu\n"
                      "eval_every: 0\nsave_every: 0\n")
    out = tmp_path / "sweep"
    args = ["sweep", str(config), "lr=1e-3,3e-2", "--out", str(out), "--max-new-tokens", "4",
            "--no-progress"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    summary = json.loads((out / "sweep.json").read_text())
    names = {r["name"] for r in summary["runs"]}
    assert names == {"lr=1e-3", "lr=3e-2"}
    assert summary["recommended"] in names and f"recommended: {summary['why']}" in printed
    assert set(summary["frontier"]) <= names and summary["frontier"]
    for r in summary["runs"]:
        assert (out / r["name"] / "summary.json").is_file()
        assert r["general_change"] is not None and r["ci"][0] <= r["score"] <= r["ci"][1]
    html = (out / "sweep.html").read_text()
    assert "<svg" in html and "frontier" in html and summary["recommended"] in html
    assert (out / "compare" / "report.html").is_file()
    # the same sweep again: finished runs are kept, not retrained
    stamps = {n: (out / n / "summary.json").stat().st_mtime_ns for n in names}
    assert main(args) == 0
    assert stamps == {n: (out / n / "summary.json").stat().st_mtime_ns for n in names}


def test_a_bad_value_fails_before_anything_trains(tiny_model_dir, tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text(f"model: {tiny_model_dir}\ndata: {tmp_path / 'd.jsonl'}\n")
    write_jsonl(tmp_path / "d.jsonl", [{"text": "hello world"}] * 4)
    assert main(["sweep", str(config), "lr=1e-3,-1", "--out", str(tmp_path / "s")]) == 2
    assert "error:" in capsys.readouterr().err
    assert not (tmp_path / "s").exists()
