"""The general-ability probe: the shipped items, the harness task, tunelab's own scorer and
lm-evaluation-harness giving the same per-item answers, a user's local harness task."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
import yaml
from tests.conftest import write_jsonl

from tunelab import models
from tunelab.errors import ConfigError
from tunelab.evaluate import probe
from tunelab.evaluate.forgetting import (
    GeneralAbility,
    forgetting_items,
    measure_general_ability,
)

ROOT = Path(__file__).resolve().parents[2]
COUNTRIES = ROOT / "src" / "tunelab" / "assets" / "countries.jsonl"


def _quickstart_names() -> set[str]:
    """Every country and capital name of the quickstart's data."""
    names: set[str] = set()
    for line in COUNTRIES.read_text(encoding="utf-8").splitlines():
        rec = json.loads(json.loads(line)["completion"])
        for value in (rec["country"], rec["capital"]):
            names.update(value if isinstance(value, list) else [value])
    return names


def test_shipped_probe_is_large_varied_and_off_the_quickstart_task() -> None:
    items = probe.load_probe()
    assert len(items) >= 200
    skills = Counter(it.skill for it in items)
    assert set(skills) == set(probe.SKILLS) and min(skills.values()) >= 40
    assert len({it.id for it in items}) == len(items)
    assert len({it.question for it in items}) == len(items)  # no duplicate questions
    for it in items:
        assert len(it.choices) == 4 and len(set(it.choices)) == 4, it.id
        assert 0 <= it.answer < 4
    # the gold answer is not always in the same place
    assert min(Counter(it.answer for it in items).values()) >= len(items) // 8
    banned = re.compile(r"\b(capitals?|currenc(y|ies)|countr(y|ies)|nations?|populations?)\b",
                        re.IGNORECASE)
    names = re.compile(r"\b(" + "|".join(re.escape(n) for n in sorted(_quickstart_names()))
                       + r")\b", re.IGNORECASE)
    for it in items:
        text = " ".join([it.question, *it.choices])
        assert not banned.search(text), (it.id, text)
        assert not names.search(text), (it.id, names.search(text).group(0))


def test_probe_file_is_what_its_build_script_writes() -> None:
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "build_probe.py"), "--check"],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_harness_task_yaml_reads_the_shipped_file_with_the_scorers_prompt() -> None:
    task = yaml.safe_load(probe.PROBE_TASK.read_text(encoding="utf-8"))
    assert task["task"] == probe.PROBE_NAME and task["output_type"] == "multiple_choice"
    assert task["dataset_path"] == "json"
    assert (probe.PROBE_DIR / task["dataset_kwargs"]["data_files"]["test"]) == probe.PROBE_FILE
    assert task["doc_to_text"].replace("{{question}}", "{question}") == probe.PROMPT
    assert task["target_delimiter"] == probe.TARGET_DELIMITER
    config = probe.harness_task_config(probe.PROBE_TASK)  # relative data_files resolved
    assert Path(config["dataset_kwargs"]["data_files"]["test"]) == probe.PROBE_FILE


def test_bootstrap_interval_contains_the_accuracy() -> None:
    scores = [1.0, 0.0, 0.0, 1.0, 1.0, 0.0, 1.0, 1.0]
    result = probe.ProbeResult("t", scores, "tunelab", [str(i) for i in range(8)],
                               ["a", "a", "b", "b", "b", "b", "c", "c"])
    iv = result.interval(seed=3)
    assert iv.estimate == result.accuracy == 5 / 8
    assert iv.low < iv.estimate < iv.high and iv.n == 8
    assert result.by_skill() == {"a": 0.5, "b": 0.5, "c": 1.0}
    assert result.to_dict(seed=3)["ci_low"] == iv.low


def _user_task(folder: Path) -> tuple[Path, list[probe.ProbeItem]]:
    """A user's own harness task: other field names, its data file in a folder beside the
    YAML (a relative data_files path)."""
    rows = [{"q": f"Which word names a colour, item {i}?", "options": opts, "label": gold}
            for i, (opts, gold) in enumerate([(["red", "table", "run"], 0),
                                              (["sing", "blue", "chair"], 1),
                                              (["door", "walk", "green"], 2),
                                              (["pink", "jump", "lamp"], 0),
                                              (["cup", "grey", "swim"], 1),
                                              (["hat", "read", "brown"], 2)])]
    (folder / "data").mkdir()
    write_jsonl(folder / "data" / "colours.jsonl", rows)
    (folder / "colours.yaml").write_text(
        "task: my_colours\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        "    test: data/colours.jsonl\ntest_split: test\noutput_type: multiple_choice\n"
        'doc_to_text: "Question: {{q}}\\nAnswer:"\ndoc_to_choice: "{{options}}"\n'
        "doc_to_target: label\nmetric_list:\n  - metric: acc\n", encoding="utf-8")
    items = [probe.ProbeItem(str(i), "colour", r["q"], tuple(r["options"]), r["label"])
             for i, r in enumerate(rows)]
    return folder / "colours.yaml", items


def test_harness_and_tunelab_scorer_agree_item_by_item(tiny_model_dir, tmp_path, monkeypatch,
                                                       caplog) -> None:
    # Required, not skipped: lm_eval is in the test extra, so CI runs the harness path.
    assert probe.harness_available(), "lm-evaluation-harness missing: pip install -e '.[test]'"
    model, tok = models.load_model(str(tiny_model_dir), device="cpu")
    task, _ = _user_task(tmp_path)
    ability = measure_general_ability(model, tok, batch_size=64, progress=False, n_docs=2,
                                      probe_tasks=[str(task)])
    harness, mine = ability.probes
    monkeypatch.setattr(probe, "harness_available", lambda: False)
    with caplog.at_level("WARNING", logger="tunelab.evaluate.probe"):
        (own,) = probe.run_probes(model, tok, batch_size=64)
    assert harness.backend == "lm-eval" and own.backend == "tunelab"
    assert sum("not installed" in r.getMessage() for r in caplog.records) <= 1
    n = len(probe.load_probe())
    assert len(harness.scores) == len(own.scores) == n
    assert harness.ids == own.ids and harness.skills == own.skills
    assert harness.picks == own.picks and harness.scores == own.scores
    torch.testing.assert_close(torch.tensor(harness.loglikelihoods),
                               torch.tensor(own.loglikelihoods), atol=1e-3, rtol=0)
    # an untrained model is not at 0 or 1: the agreement is not two constant answers
    assert 0 < own.accuracy < 1 and len(set(own.picks)) > 1
    # the user's task is measured beside tunelab's, and reported
    assert mine.task == "my_colours" and mine.backend == "lm-eval" and len(mine.scores) == 6
    assert ability.probe_scores == harness.scores
    report = ability.to_dict()
    assert report["probe_backend"] == "lm-eval" and len(report["probe"]) == n
    first = report["probe"][0]
    assert first["picked"] in first["choices"] and first["gold"] in first["choices"]
    assert first["score"] == float(first["picked"] == first["gold"])
    assert report["probe_tasks"][0]["task"] == "my_colours"
    assert set(report["probe_by_skill"]) == set(probe.SKILLS)
    # without the harness, an extra task is refused in one line saying how to get it
    with pytest.raises(ConfigError, match=r"pip install 'tunelab\[eval\]'"):
        probe.run_probes(model, tok, [str(task)])


def test_user_local_task_on_an_adapter_gives_paired_forgetting(tiny_model_dir, tmp_path,
                                                               monkeypatch) -> None:
    from tunelab.adapters import attach_lora

    monkeypatch.chdir(tmp_path.parent)  # data_files is relative to the YAML, not the cwd
    task, items = _user_task(tmp_path)
    base, tok = models.load_model(str(tiny_model_dir), device="cpu")
    (before,) = probe.run_harness(base, tok, [task])
    model = attach_lora(base, r=4, alpha=8, dropout=0.0, target_modules="all-linear")
    torch.manual_seed(0)
    with torch.no_grad():  # a trained-looking adapter: B is zero at init
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    (after,) = probe.run_harness(model, tok, [task])  # the PeftModel as loaded, no reload
    assert after.loglikelihoods != before.loglikelihoods  # the adapter is what was measured
    own = probe.score_choices(model, tok, items, task="my_colours")
    assert after.picks == own.picks and after.scores == own.scores
    torch.testing.assert_close(torch.tensor(after.loglikelihoods),
                               torch.tensor(own.loglikelihoods), atol=1e-3, rtol=0)
    own_probe = probe.ProbeResult(probe.PROBE_NAME, [1.0, 0.0], "lm-eval")
    b = GeneralAbility(None, [1.0, 0.0], [], probes=[own_probe, before])
    a = GeneralAbility(None, [1.0, 0.0], [], probes=[own_probe, after])
    found = forgetting_items("LoRA", b, a)
    assert [i.name for i in found] == ["LoRA: general-knowledge probe accuracy",
                                       "LoRA: my_colours acc"]
    assert found[1].before == before.accuracy and found[1].after == after.accuracy


def test_bad_probe_task_fails_in_one_line(tmp_path) -> None:
    with pytest.raises(ConfigError, match="no such file"):
        probe.check_probe_tasks([str(tmp_path / "missing.yaml")])
    (tmp_path / "group.yaml").write_text("group: mine\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="no 'task:' name"):
        probe.check_probe_tasks([str(tmp_path / "group.yaml")])
    (tmp_path / "notes.txt").write_text("x", encoding="utf-8")
    with pytest.raises(ConfigError, match="expected an lm-evaluation-harness task YAML"):
        probe.check_probe_tasks([str(tmp_path / "notes.txt")])


def test_compare_probe_task_needs_a_fine_tuned_row(tmp_path) -> None:
    from tunelab.evaluate.compare import run_compare
    from tunelab.evaluate.run import EvalExample, EvalSettings

    ex = [EvalExample("1", [{"role": "user", "content": "hi"}], "yo", {})]
    with pytest.raises(ConfigError, match="--probe-task is measured by the forgetting check"):
        run_compare(ex, settings=EvalSettings(), out=tmp_path, model_spec="x",
                    probe_tasks=["t.yaml"])
