"""Metrics: each with positive and negative cases, plus the registry and user scorers."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from tunelab.errors import ConfigError, DataError
from tunelab.evaluate import (
    contains,
    exact_match,
    field_means,
    get_metric,
    json_field_scores,
    json_fields,
    json_valid,
    known_metrics,
    normalize_text,
    normalized_exact_match,
    regex_match,
    rouge_l,
    score_examples,
)


def test_exact_match() -> None:
    assert exact_match("Paris", "Paris") == 1.0
    assert exact_match("  Paris\n", "Paris") == 1.0
    assert exact_match("paris", "Paris") == 0.0
    assert exact_match("Paris.", "Paris") == 0.0


def test_normalize_text_follows_squad() -> None:
    assert normalize_text("The  U.S.A.!") == "usa"
    assert normalize_text("An apple, a day") == "apple day"
    assert normalize_text("theory") == "theory"  # articles only as whole words


def test_normalized_exact_match() -> None:
    assert normalized_exact_match("The Eiffel Tower.", "eiffel tower") == 1.0
    assert normalized_exact_match("  PARIS!! ", "paris") == 1.0
    assert normalized_exact_match("Paris, France", "Paris") == 0.0


def test_contains() -> None:
    assert contains("I think the answer is Paris, France.", "paris") == 1.0
    assert contains("The capital is New York City", "new york") == 1.0
    assert contains("concatenate", "cat") == 0.0  # whole words only
    assert contains("London", "Paris") == 0.0
    assert contains("anything", "") == 0.0
    assert contains("", "the") == 1.0  # both normalise to empty


def test_json_valid_strict_and_extract() -> None:
    assert json_valid('{"a": 1}') == 1.0
    assert json_valid(' [1, 2, 3]\n') == 1.0
    assert json_valid("42") == 1.0  # any JSON value in strict mode
    assert json_valid('Here it is: {"a": 1}') == 0.0
    assert json_valid('{"a": 1,}') == 0.0
    assert json_valid('{"a": NaN}') == 0.0  # not standard JSON
    assert json_valid('Here it is: ```json\n{"a": 1}\n```', extract=True) == 1.0
    assert json_valid("no json {here", extract=True) == 0.0


def test_json_field_scores() -> None:
    ref = '{"name": "Ada", "age": 36, "tags": ["x"], "ok": true}'
    s = json_field_scores('{"name": "Ada", "age": 36.0, "tags": ["x"], "ok": 1, "extra": 0}',
                          ref)
    assert s.fields == {"name": 1.0, "age": 1.0, "tags": 1.0, "ok": 0.0}  # true != 1
    assert s.mean == pytest.approx(0.75)
    assert json_fields('{"name": "ada"}', ref) == 0.0
    assert json_fields("not json", ref) == 0.0
    assert json_field_scores("not json", ref).fields == {"name": 0.0, "age": 0.0, "tags": 0.0,
                                                         "ok": 0.0}
    assert json_fields('[1, 2]', '{"a": 1}') == 0.0
    assert json_fields('Sure! {"a": 1}', '{"a": 1}') == 0.0
    assert json_fields('Sure! {"a": 1}', '{"a": 1}', extract=True) == 1.0
    assert json_fields('{"a": {"b": 1}}', '{"a": {"b": 1}}') == 1.0
    assert json_fields('{"a": "1"}', '{"a": 1}') == 0.0
    assert json_fields("{}", "{}") == 1.0


def test_json_fields_bad_reference() -> None:
    with pytest.raises(DataError, match="JSON object"):
        json_fields("{}", "[1, 2]")
    with pytest.raises(DataError, match="JSON object"):
        json_fields("{}", "not json")


def test_rouge_l() -> None:
    assert rouge_l("the cat sat on the mat", "the cat sat on the mat") == 1.0
    assert rouge_l("The Cat", "the cat") == 1.0
    assert rouge_l("dog", "the cat") == 0.0
    # LCS("the cat was on the mat", "the cat sat on the mat") = 5 of 6 tokens each way.
    assert rouge_l("the cat was on the mat", "the cat sat on the mat") == pytest.approx(5 / 6)
    # P = 2/2, R = 2/4 -> F1 = 2/3.
    assert rouge_l("a b", "a x b y") == pytest.approx(2 / 3)
    assert rouge_l("", "") == 1.0
    assert rouge_l("", "a") == 0.0


def test_regex_match() -> None:
    assert regex_match(" 2024-01-31 ", "", pattern=r"\d{4}-\d{2}-\d{2}") == 1.0
    assert regex_match("date: 2024-01-31", "", pattern=r"\d{4}-\d{2}-\d{2}") == 0.0
    assert regex_match("date: 2024-01-31", "", pattern=r"\d{4}-\d{2}-\d{2}", search=True) == 1.0
    assert regex_match("no date", "", pattern=r"\d+", search=True) == 0.0


def test_registry_named_metrics() -> None:
    for name in ("exact", "normalized_exact", "contains", "json_valid", "json_valid_extract",
                 "json_fields", "json_fields_extract", "rouge_l"):
        metric = get_metric(name)
        assert metric.name == name
        assert metric('{"a": 1}', '{"a": 1}') == 1.0
        expected = {"json_valid": 1.0, "json_valid_extract": 1.0, "rouge_l": 0.5}.get(name, 0.0)
        assert metric('{"a": 2}', '{"a": 1}') == expected
    assert get_metric("exact")("x", "x") == 1.0
    assert get_metric("normalized_exact")("The X!", "x") == 1.0
    assert get_metric("json_fields").fields('{"a": 1, "b": 2}', '{"a": 1, "b": 3}') == {
        "a": 1.0, "b": 0.0}
    assert get_metric("exact").fields("a", "a") is None
    m = get_metric("exact")
    assert get_metric(m) is m


def test_registry_regex_specs() -> None:
    m = get_metric(r"regex:(yes|no)")
    assert m("yes", "ignored") == 1.0 and m("yes!", "") == 0.0
    assert get_metric(r"regex_search:(yes|no)")("I say yes!", "") == 1.0
    with pytest.raises(ConfigError, match="invalid regular expression"):
        get_metric("regex:(unclosed")


def test_registry_unknown_lists_known() -> None:
    with pytest.raises(ConfigError) as info:
        get_metric("bleu")
    for name in known_metrics():
        assert name in str(info.value)
    with pytest.raises(ConfigError):
        get_metric(3)  # type: ignore[arg-type]


@pytest.fixture
def scorer_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    (tmp_path / "my_scorers.py").write_text(
        "def length_ok(prediction, reference, example):\n"
        "    return len(prediction) <= (example or {}).get('max_len', 5)\n"
        "def half(prediction, reference, example):\n"
        "    return 0.5\n"
        "def bad_type(prediction, reference, example):\n"
        "    return 'high'\n"
        "def too_big(prediction, reference, example):\n"
        "    return 3\n"
        "def boom(prediction, reference, example):\n"
        "    raise KeyError('label')\n"
        "NOT_CALLABLE = 1\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    yield str(tmp_path / "my_scorers.py")
    sys.modules.pop("my_scorers", None)


def test_python_scorer(scorer_module: str) -> None:
    m = get_metric("python:my_scorers:length_ok")
    assert m("abc", "ref", {"max_len": 5}) == 1.0
    assert m("abcdef", "ref", {"max_len": 5}) == 0.0
    assert get_metric("python:my_scorers:half")("a", "b") == 0.5
    # A path to a .py file works too.
    assert get_metric(f"python:{scorer_module}:half")("a", "b") == 0.5


@pytest.mark.parametrize(("spec", "message"), [
    ("python:no_such_module_xyz:f", "not found"),
    ("python:my_scorers:missing", "has no attribute"),
    ("python:my_scorers:NOT_CALLABLE", "not callable"),
    ("python:my_scorers", "module:function"),
    ("python:/nonexistent/file.py:f", "does not exist"),
])
def test_python_scorer_import_errors(scorer_module: str, spec: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        get_metric(spec)


@pytest.mark.parametrize(("func", "message"), [
    ("bad_type", "must return a number"),
    ("too_big", r"\[0, 1\]"),
    ("boom", "raised KeyError"),
])
def test_python_scorer_bad_results(scorer_module: str, func: str, message: str) -> None:
    m = get_metric(f"python:my_scorers:{func}")
    with pytest.raises(ConfigError, match=message):
        m("a", "b", {})


def test_python_scorer_module_that_fails_to_import(tmp_path: Path) -> None:
    bad = tmp_path / "broken.py"
    bad.write_text("raise RuntimeError('oops')\n")
    with pytest.raises(ConfigError, match="failed to import: RuntimeError: oops"):
        get_metric(f"python:{bad}:f")


def test_score_examples_and_field_means() -> None:
    assert score_examples("exact", ["a", "b", "c"], ["a", "x", "c"]) == [1.0, 0.0, 1.0]
    with pytest.raises(ValueError):
        score_examples("exact", ["a"], ["a", "b"])
    means = field_means("json_fields", ['{"a": 1, "b": 2}', '{"a": 1}', "oops"],
                        ['{"a": 1, "b": 2}', '{"a": 1, "b": 3}', '{"a": 1}'])
    assert means == pytest.approx({"a": 2 / 3, "b": 1 / 2})
    assert field_means("exact", ["a"], ["a"]) is None
