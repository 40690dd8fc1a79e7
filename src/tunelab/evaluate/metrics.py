"""Per-example metrics: pure functions of (prediction, reference) returning a score in [0, 1].

Every metric has the shape ``fn(prediction: str, reference: str, **opts) -> float``. The
registry :func:`get_metric` turns a config string into a :class:`Metric`, a callable
``metric(prediction, reference, example=None) -> float`` that the evaluator applies to each
example; per-example scores are then aggregated with :mod:`tunelab.evaluate.stats`.

Names understood by :func:`get_metric`:

=============================  ================================================================
``exact``                      1 if ``prediction.strip() == reference.strip()``
``normalized_exact``           exact match after SQuAD normalisation (see :func:`normalize_text`)
``contains``                   normalised reference occurs in the normalised prediction, on
                               word boundaries
``json_valid``                 prediction parses as JSON (strict: the whole string must be JSON)
``json_valid_extract``         the first JSON object/array found anywhere in the prediction parses
``json_exact``                 1 if the prediction parses (strict) to JSON equal to the parsed
                               reference (:func:`json_equal`: key order and spacing do not matter,
                               an extra or missing key does); per-field scores for the report
``json_fields``                fraction of the reference object's top-level keys whose value the
                               prediction reproduces exactly (strict parse)
``json_fields_extract``        same, extracting the first JSON object from surrounding text
``rouge_l``                    ROUGE-L F1 on lower-cased whitespace tokens
``regex:<pattern>``            1 if the stripped prediction *fully* matches ``<pattern>``
``regex_search:<pattern>``     1 if ``<pattern>`` matches anywhere in the prediction
``python:<module:function>``   a user scorer ``function(prediction, reference, example)``;
                               ``module`` may be a dotted module name or a path to a ``.py`` file
=============================  ================================================================

ROUGE-L is implemented here (an O(n*m) LCS, about 20 lines) rather than taken from the
``rouge-score`` package: that package also stems and strips non-alphanumerics, which makes the
score depend on its tokenizer; ours is the plain definition, documented in :func:`rouge_l`.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import math
import numbers
import re
import string
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunelab.errors import ConfigError, DataError

ScoreFn = Callable[[str, str, Mapping[str, Any] | None], float]
FieldFn = Callable[[str, str], dict[str, float]]

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT_TABLE = str.maketrans("", "", string.punctuation)


# --------------------------------------------------------------------------------------------
# String metrics
# --------------------------------------------------------------------------------------------


def normalize_text(text: str) -> str:
    """SQuAD answer normalisation: lower-case, drop ASCII punctuation, drop the articles
    ``a``/``an``/``the``, and collapse runs of whitespace to one space (stripped).

    The steps run in SQuAD's order, so ``"The  U.S.A."`` becomes ``"usa"``.
    """
    text = text.lower().translate(_PUNCT_TABLE)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def exact_match(prediction: str, reference: str) -> float:
    """1.0 if the prediction equals the reference after stripping surrounding whitespace."""
    return float(prediction.strip() == reference.strip())


def normalized_exact_match(prediction: str, reference: str) -> float:
    """1.0 if ``normalize_text(prediction) == normalize_text(reference)`` (SQuAD EM)."""
    return float(normalize_text(prediction) == normalize_text(reference))


def contains(prediction: str, reference: str) -> float:
    """1.0 if the normalised reference occurs in the normalised prediction as whole words.

    Matching is on word boundaries (``"cat"`` is not found in ``"concatenate"``) because
    normalised text is space-separated tokens. A reference that normalises to the empty string
    only matches a prediction that does too, so an empty reference never scores for free.
    """
    ref = normalize_text(reference)
    pred = normalize_text(prediction)
    if not ref:
        return float(not pred)
    return float(f" {ref} " in f" {pred} ")


def _lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    # One-row dynamic programme over the shorter sequence: O(len(a) * len(b)) time,
    # O(min(len(a), len(b))) memory.
    if len(a) < len(b):
        a, b = b, a
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0] * (len(b) + 1)
        for j, y in enumerate(b, start=1):
            cur[j] = prev[j - 1] + 1 if x == y else max(prev[j], cur[j - 1])
        prev = cur
    return prev[-1]


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F1 between lower-cased whitespace tokens.

    With ``L = LCS(pred, ref)``, precision ``P = L / |pred|``, recall ``R = L / |ref|`` and
    ``F1 = 2PR / (P + R)``. Two empty strings score 1; one empty string scores 0.
    """
    pred = prediction.lower().split()
    ref = reference.lower().split()
    if not pred and not ref:
        return 1.0
    if not pred or not ref:
        return 0.0
    lcs = _lcs_length(pred, ref)
    if lcs == 0:
        return 0.0
    precision = lcs / len(pred)
    recall = lcs / len(ref)
    return 2 * precision * recall / (precision + recall)


def regex_match(prediction: str, reference: str = "", *, pattern: str | re.Pattern[str],
                search: bool = False) -> float:
    """1.0 if ``pattern`` fully matches the stripped prediction (``search=True``: matches
    anywhere). The reference is ignored: the pattern *is* the specification."""
    compiled = re.compile(pattern) if isinstance(pattern, str) else pattern
    if search:
        return float(compiled.search(prediction) is not None)
    return float(compiled.fullmatch(prediction.strip()) is not None)


# --------------------------------------------------------------------------------------------
# JSON metrics
# --------------------------------------------------------------------------------------------


def _reject_constant(name: str) -> Any:
    # Python's json accepts NaN/Infinity, which no other JSON parser does; a model that
    # emits them has not produced valid JSON.
    raise ValueError(f"non-standard JSON constant {name}")


def _loads_strict(text: str) -> Any:
    return json.loads(text, parse_constant=_reject_constant)


def extract_json(text: str) -> Any:
    """Return the first JSON object or array embedded in ``text`` (e.g. inside a code fence or
    after "Here is the JSON:"). Raises ``ValueError`` if none parses."""
    decoder = json.JSONDecoder(parse_constant=_reject_constant)
    for i, ch in enumerate(text):
        if ch in "{[":
            try:
                value, _ = decoder.raw_decode(text, i)
            except ValueError:
                continue
            return value
    raise ValueError("no JSON object or array found")


def parse_json_prediction(prediction: str, *, extract: bool = False) -> Any:
    """Parse a prediction as JSON; raises ``ValueError`` if it is not JSON.

    Strict by default: the whole stripped string must be one JSON value, because a model
    asked for JSON should emit only JSON and a downstream ``json.loads`` would fail otherwise.
    With ``extract=True`` the first JSON object/array found in the text is used instead.
    """
    if not extract:
        return _loads_strict(prediction.strip())
    try:
        return _loads_strict(prediction.strip())
    except ValueError:
        return extract_json(prediction)


def json_valid(prediction: str, reference: str = "", *, extract: bool = False) -> float:
    """1.0 if the prediction parses as JSON (strict unless ``extract``; see
    :func:`parse_json_prediction`). Any JSON value counts, including a bare number or string.
    The reference is ignored."""
    try:
        parse_json_prediction(prediction, extract=extract)
    except ValueError:
        return 0.0
    return 1.0


def json_equal(a: Any, b: Any) -> bool:
    """Exact JSON equality. Unlike Python ``==``, ``true`` is not ``1`` and ``1`` is not
    ``"1"``; ``1`` and ``1.0`` are equal because JSON has one number type."""
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a == b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return a == b
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(json_equal(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(json_equal(x, y) for x, y in zip(a, b, strict=True))
    return type(a) is type(b) and a == b


@dataclass(frozen=True)
class JsonFieldScore:
    """Result of :func:`json_field_scores`: ``mean`` over the reference's keys and a 0/1
    score per key (insertion order of the reference)."""

    mean: float
    fields: dict[str, float]


def _reference_object(reference: str | Mapping[str, Any]) -> dict[str, Any]:
    if isinstance(reference, Mapping):
        return dict(reference)
    try:
        value = _loads_strict(reference)
    except ValueError as exc:
        raise DataError(f"json_fields needs a JSON object as the reference, got {reference[:80]!r}"
                        f" ({exc})", field="reference") from exc
    if not isinstance(value, dict):
        raise DataError("json_fields needs a JSON object as the reference, got a "
                        f"{type(value).__name__}", field="reference")
    return value


def json_field_scores(prediction: str, reference: str | Mapping[str, Any], *,
                      extract: bool = False) -> JsonFieldScore:
    """Per-field match of a JSON-object prediction against a JSON-object reference.

    For each top-level key ``k`` of the reference, the field scores 1 if the prediction is a
    JSON object with key ``k`` whose value is :func:`json_equal` to the reference's; nested
    values are compared whole. ``mean`` is the fraction of reference keys matched, so extra
    keys in the prediction are not penalised. A prediction that does not parse (or is not an
    object) scores 0 on every field. An empty reference object scores 1 for any object.

    Raises :class:`~tunelab.errors.DataError` if the reference is not a JSON object.
    """
    ref = _reference_object(reference)
    try:
        pred = parse_json_prediction(prediction, extract=extract)
    except ValueError:
        pred = None
    if not isinstance(pred, dict):
        fields = {k: 0.0 for k in ref}
        return JsonFieldScore(mean=0.0, fields=fields)
    fields = {k: float(k in pred and json_equal(pred[k], v)) for k, v in ref.items()}
    mean = sum(fields.values()) / len(fields) if fields else 1.0
    return JsonFieldScore(mean=mean, fields=fields)


def json_exact(prediction: str, reference: str, *, extract: bool = False) -> float:
    """1.0 if the prediction parses as JSON equal (:func:`json_equal`) to the parsed reference.

    Stricter than ``json_fields == 1``: an extra key in the prediction fails. This is what a
    program that consumes the model's output needs. Raises
    :class:`~tunelab.errors.DataError` if the reference is not valid JSON.
    """
    try:
        ref = _loads_strict(reference.strip())
    except ValueError as exc:
        raise DataError(f"json_exact needs JSON as the reference, got {reference[:80]!r} "
                        f"({exc})", field="reference") from exc
    try:
        pred = parse_json_prediction(prediction, extract=extract)
    except ValueError:
        return 0.0
    return float(json_equal(pred, ref))


def json_fields(prediction: str, reference: str, *, extract: bool = False) -> float:
    """Mean of :func:`json_field_scores` (fraction of reference keys matched exactly)."""
    return json_field_scores(prediction, reference, extract=extract).mean


# --------------------------------------------------------------------------------------------
# User scorers
# --------------------------------------------------------------------------------------------


def _import_module(module_spec: str) -> Any:
    if module_spec.endswith(".py"):
        path = Path(module_spec).expanduser()
        if not path.is_file():
            raise ConfigError(f"python scorer file {module_spec!r} does not exist")
        name = f"tunelab_user_scorer_{abs(hash(str(path.resolve())))}"
        spec = importlib.util.spec_from_file_location(name, path)
        if spec is None or spec.loader is None:
            raise ConfigError(f"python scorer file {module_spec!r} cannot be loaded as a module")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        try:
            spec.loader.exec_module(module)
        except Exception as exc:
            del sys.modules[name]
            raise ConfigError(f"python scorer file {module_spec!r} failed to import: "
                              f"{type(exc).__name__}: {exc}") from exc
        return module
    try:
        return importlib.import_module(module_spec)
    except ModuleNotFoundError as exc:
        raise ConfigError(f"python scorer module {module_spec!r} not found ({exc}); check the "
                          "name, that it is installed or on PYTHONPATH, or give a path to a "
                          ".py file") from exc
    except Exception as exc:
        raise ConfigError(f"python scorer module {module_spec!r} failed to import: "
                          f"{type(exc).__name__}: {exc}") from exc


def load_python_scorer(spec: str) -> ScoreFn:
    """Import a user scorer from ``"module:function"`` (or ``"path/to/file.py:function"``).

    The function is called as ``function(prediction, reference, example)`` where ``example``
    is the dataset record (a dict, or ``None``). It must return a real number in [0, 1]
    (``bool`` is accepted); anything else raises :class:`~tunelab.errors.ConfigError`, as does
    an exception raised by the scorer, with the scorer's error in the message.
    """
    module_spec, sep, func_name = spec.rpartition(":")
    if not sep or not module_spec or not func_name:
        raise ConfigError(f"python scorer {spec!r} must look like 'module:function' or "
                          "'path/to/file.py:function'")
    module = _import_module(module_spec)
    func = getattr(module, func_name, None)
    if func is None:
        raise ConfigError(f"python scorer module {module_spec!r} has no attribute {func_name!r}")
    if not callable(func):
        raise ConfigError(f"python scorer {spec!r} is not callable")

    def score(prediction: str, reference: str, example: Mapping[str, Any] | None = None) -> float:
        try:
            value = func(prediction, reference, example)
        except Exception as exc:
            raise ConfigError(f"python scorer {spec!r} raised {type(exc).__name__}: {exc}") from exc
        if not isinstance(value, numbers.Real):
            raise ConfigError(f"python scorer {spec!r} returned {value!r} "
                              f"({type(value).__name__}); it must return a number in [0, 1]")
        result = float(value)
        if not (0.0 <= result <= 1.0):  # also rejects NaN
            raise ConfigError(f"python scorer {spec!r} returned {result!r}; scores must lie in "
                              "[0, 1]")
        return result

    return score


# --------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Metric:
    """A named metric: ``metric(prediction, reference, example=None) -> float`` in [0, 1].

    ``field_fn``, when set (the ``json_fields`` metrics), gives per-field scores through
    :meth:`fields` so a report can show which field fails.
    """

    name: str
    fn: ScoreFn
    field_fn: FieldFn | None = None

    def __call__(self, prediction: str, reference: str,
                 example: Mapping[str, Any] | None = None) -> float:
        return self.fn(prediction, reference, example)

    def fields(self, prediction: str, reference: str) -> dict[str, float] | None:
        """Per-field scores for this example, or ``None`` for metrics without fields."""
        return None if self.field_fn is None else self.field_fn(prediction, reference)


def _simple(fn: Callable[[str, str], float]) -> ScoreFn:
    return lambda prediction, reference, example=None: fn(prediction, reference)


def _json_fields_metric(name: str, extract: bool) -> Metric:
    return Metric(
        name=name,
        fn=lambda p, r, example=None: json_fields(p, r, extract=extract),
        field_fn=lambda p, r: json_field_scores(p, r, extract=extract).fields,
    )


_NAMED: dict[str, Callable[[], Metric]] = {
    "exact": lambda: Metric("exact", _simple(exact_match)),
    "normalized_exact": lambda: Metric("normalized_exact", _simple(normalized_exact_match)),
    "contains": lambda: Metric("contains", _simple(contains)),
    "json_valid": lambda: Metric("json_valid", _simple(json_valid)),
    "json_valid_extract": lambda: Metric(
        "json_valid_extract", lambda p, r, example=None: json_valid(p, r, extract=True)),
    "json_exact": lambda: Metric(
        "json_exact", lambda p, r, example=None: json_exact(p, r),
        field_fn=lambda p, r: json_field_scores(p, r).fields),
    "json_fields": lambda: _json_fields_metric("json_fields", extract=False),
    "json_fields_extract": lambda: _json_fields_metric("json_fields_extract", extract=True),
    "rouge_l": lambda: Metric("rouge_l", _simple(rouge_l)),
}
_PREFIXED = ("regex:<pattern>", "regex_search:<pattern>", "python:<module:function>")


def known_metrics() -> list[str]:
    """Names and spec forms accepted by :func:`get_metric`."""
    return [*_NAMED, *_PREFIXED]


def _regex_metric(spec: str, pattern: str, search: bool) -> Metric:
    try:
        compiled = re.compile(pattern)
    except re.error as exc:
        raise ConfigError(f"metric {spec!r}: invalid regular expression: {exc}") from exc
    return Metric(spec, lambda p, r, example=None: regex_match(p, r, pattern=compiled,
                                                               search=search))


def get_metric(name_or_spec: str | Metric) -> Metric:
    """Resolve a metric name or spec (see the module docstring) to a :class:`Metric`.

    User scorers are imported here, not at first use, so a bad ``python:`` spec fails before
    any generation is spent. Raises :class:`~tunelab.errors.ConfigError` for unknown names.
    """
    if isinstance(name_or_spec, Metric):
        return name_or_spec
    if not isinstance(name_or_spec, str):
        raise ConfigError(f"metric must be a string, got {type(name_or_spec).__name__}")
    spec = name_or_spec.strip()
    if spec in _NAMED:
        return _NAMED[spec]()
    prefix, sep, rest = spec.partition(":")
    if sep and prefix == "regex":
        return _regex_metric(spec, rest, search=False)
    if sep and prefix == "regex_search":
        return _regex_metric(spec, rest, search=True)
    if sep and prefix == "python":
        return Metric(spec, load_python_scorer(rest))
    raise ConfigError(f"unknown metric {name_or_spec!r}; known metrics: "
                      + ", ".join(known_metrics()))


# --------------------------------------------------------------------------------------------
# Applying a metric to a dataset
# --------------------------------------------------------------------------------------------


def score_examples(metric: Metric | str, predictions: Sequence[str], references: Sequence[str],
                   examples: Sequence[Mapping[str, Any]] | None = None) -> list[float]:
    """Per-example scores ``[metric(p_i, r_i, e_i)]``, aligned with the inputs."""
    metric = get_metric(metric)
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    if examples is not None and len(examples) != len(predictions):
        raise ValueError(f"{len(predictions)} predictions but {len(examples)} examples")
    scores = []
    for i, (p, r) in enumerate(zip(predictions, references, strict=True)):
        s = metric(p, r, None if examples is None else examples[i])
        if not math.isfinite(s):
            raise ValueError(f"metric {metric.name!r} returned {s} for example {i}")
        scores.append(s)
    return scores


def field_means(metric: Metric | str, predictions: Sequence[str],
                references: Sequence[str]) -> dict[str, float] | None:
    """Mean score per JSON field over the examples whose reference has that field, or
    ``None`` for metrics without fields. Feeds the report's ``field_scores`` section."""
    metric = get_metric(metric)
    if metric.field_fn is None:
        return None
    totals: dict[str, float] = {}
    counts: dict[str, int] = {}
    for p, r in zip(predictions, references, strict=True):
        for key, s in metric.field_fn(p, r).items():
            totals[key] = totals.get(key, 0.0) + s
            counts[key] = counts.get(key, 0) + 1
    return {k: totals[k] / counts[k] for k in totals}
