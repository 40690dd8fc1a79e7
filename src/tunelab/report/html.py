"""Write a run's report as a self-contained ``report.html`` plus ``report.json``.

The HTML has no external resources at all: plots are inline SVG drawn by
:mod:`tunelab.report.svg`, styling is one inline ``<style>``, there is no JavaScript, and a
Content-Security-Policy ``<meta>`` forbids loading anything else, so the file can be opened
offline, attached to an e-mail or archived. Every value from the report dict is escaped.

Report dict schema
------------------
All keys are optional; a section is rendered only when its key is present and non-empty.
Dataclasses from :mod:`tunelab.evaluate` (``Verdict``, ``SystemResult``, ``OverfitFlag``,
``ForgettingSummary``, ``Interval``) may be passed as-is: anything with ``to_dict()`` or a
dataclass is converted, tuples become lists, NumPy scalars become numbers and non-finite
floats become ``null``. ``report.json`` holds exactly this converted dict.

.. code-block:: text

    title: str                      page heading (default "tunelab report")
    summary: str                    paragraph under the heading
    created: str                    timestamp shown under the heading, e.g. ISO 8601
    verdict: Verdict | {            from make_verdict(...).to_dict()
        decision: "finetune" | "tradeoff" | "prompting_better" | "prefer_prompting"
                  | "incomplete",
        text: str, best_prompt: str|None, best_finetuned: str|None,
        diff: float|None, diff_ci: [lo, hi]|None, diff_method: str, n_examples: int|None,
        forgot: [str], keeps_both: str|None}   (tunelab.evaluate.weigh)
    metric: str                     name of the metric the scores are in, e.g. "exact"
    systems: [SystemResult | {      one per evaluated system: score bars + compare table
        name: str, kind: "zero_shot" | "few_shot" | "finetuned",
        score: float, ci_low: float|None, ci_high: float|None,
        prompt_tokens: float|None,  mean prompt tokens per request
        latency_s: float|None,      mean seconds per request
        train_time_s: float|None, peak_memory_bytes: int|None}]
        (per_example / example_ids may be present; they go to report.json only)
    field_scores: {system name: {field: mean score}}    from metrics.field_means()
    preference: {system name: {n_pairs, beta, reference: str|None,
        preference_accuracy: {mean, ci_low, ci_high}, reward_margin: {mean, ci_low, ci_high}}}
                                    from evaluate.preference.PreferenceResult.summary()
    metric_table: {system name: {metric name: value}}   every metric (and e.g. the
                                    reference loss) per system, one row per system
    curves: {
        records: [{step: int, train_loss: float|None, val_loss: float|None, ...}],
        overfit: OverfitFlag | {detected, start_step, best_step, best_val_loss, message}}
    sources: [{name, path, weight, share, train_examples, val_examples, rows_per_epoch,
               rows, tokens, ...}]   a data mixture's sources (summary.json "sources")
    forgetting: ForgettingSummary | {
        items: [{name, before, after, delta, ci_low, ci_high, higher_is_better,
                 flagged, message}],
        flagged: bool, text: str}
    config: {key: value}            nested dicts are shown with dotted keys
    environment: {key: str}         e.g. from collect_environment(): python, torch,
                                    transformers, peft, device, cpu, gpu, platform
    licence: {id: str, category: str, name: str?, source: str?, note: str?}
             or a list of such dicts (model, dataset, ...). category is one of
             "permissive", "copyleft", "weak-copyleft", "public-domain",
             "non-commercial", "restricted", "unknown"; anything other than the first
             four is shown with a warning (also at the top of the page).
    examples: [{column: value}]     a sample of per-example outputs, e.g.
              {id, input, reference, prediction, score}; columns are the union of
              keys in first-seen order; at most MAX_EXAMPLES rows are shown.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import math
import os
import platform
import sys
import tempfile
from collections.abc import Mapping, Sequence
from html import escape
from pathlib import Path
from typing import Any

from tunelab.evaluate.verdict import format_bytes, format_duration
from tunelab.report.svg import Bar, Series, Shade, VMarker, bar_chart, line_chart

MAX_EXAMPLES = 200
OK_LICENCE_CATEGORIES = frozenset({"permissive", "copyleft", "weak-copyleft", "public-domain"})
KIND_LABELS = {"zero_shot": "zero-shot", "few_shot": "few-shot", "finetuned": "fine-tuned"}
DECISION_LABELS = {
    "finetune": "Fine-tuning pays off",
    "tradeoff": "A trade-off: the task gains, general ability is lost",
    "prompting_better": "Prompting is better",
    "prefer_prompting": "Prefer prompting",
    "incomplete": "No verdict yet",
}
_DASH = "\u2014"

_CSS = """
:root { color-scheme: light; --fg: #1d232b; --muted: #5b6672; --line: #d7dde3;
  --train: #2f6db5; --val: #d9731a; --zs: #8a94a0; --fs: #4f8fcf; --ft: #2e9a5b;
  --bad: #c0392b; --ok: #2e9a5b; --warn-bg: #fff4e0; --warn: #a35a00; }
* { box-sizing: border-box; }
body { margin: 0; font: 15px/1.5 system-ui, -apple-system, "Segoe UI", sans-serif;
  color: var(--fg); background: #f6f7f9; }
main { max-width: 980px; margin: 0 auto; padding: 24px 20px 48px; }
h1 { font-size: 1.6em; margin: 0 0 4px; }
h2 { font-size: 1.2em; margin: 32px 0 10px; border-bottom: 1px solid var(--line);
  padding-bottom: 4px; }
section { background: #fff; border: 1px solid var(--line); border-radius: 6px;
  padding: 4px 18px 16px; margin-top: 18px; overflow-x: auto; }
.muted { color: var(--muted); }
.verdict { border-left: 6px solid var(--muted); }
.verdict.finetune { border-left-color: var(--ft); }
.verdict.prompting_better, .verdict.prefer_prompting { border-left-color: var(--fs); }
.verdict.tradeoff { border-left-color: var(--bad); }
.verdict .decision { font-weight: 600; font-size: 1.1em; margin: 14px 0 4px; }
.warning { background: var(--warn-bg); color: var(--warn); border: 1px solid #f0c890;
  border-radius: 6px; padding: 8px 12px; margin: 12px 0; }
.flag { color: var(--bad); font-weight: 600; }
.good { color: var(--ok); }
table { border-collapse: collapse; width: 100%; font-size: 0.93em; }
th, td { text-align: left; padding: 5px 8px; border-bottom: 1px solid var(--line);
  vertical-align: top; }
th { background: #f0f2f5; font-weight: 600; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
td.num { white-space: nowrap; }
tr.best td { font-weight: 600; }
.cell { white-space: pre-wrap; word-break: break-word; max-height: 12em; overflow: auto;
  font: 0.9em/1.4 ui-monospace, "SFMono-Regular", Menlo, Consolas, monospace; }
code { font: 0.92em ui-monospace, Menlo, Consolas, monospace; }
svg.chart { max-width: 100%; height: auto; display: block; margin: 8px 0; }
svg .grid { stroke: #eceff2; } svg .frame { fill: none; stroke: var(--line); }
svg .tickmark { stroke: var(--muted); }
svg text { font: 11px system-ui, sans-serif; fill: var(--muted); }
svg text.legend, svg text.bar-label, svg text.bar-value { fill: var(--fg); font-size: 12px; }
svg text.axis-label { font-size: 12px; }
svg polyline { fill: none; stroke-width: 1.6; }
svg .series-train { stroke: var(--train); fill: var(--train); }
svg polyline.series-train { fill: none; stroke-width: 1.2; opacity: 0.85; }
svg .series-val { stroke: var(--val); fill: var(--val); }
svg polyline.series-val { fill: none; stroke-width: 2; }
svg line.series-train, svg line.series-val { stroke-width: 3; }
svg .series-margin { stroke: var(--ok); fill: var(--ok); }
svg .series-src0 { stroke: #7b4fb5; fill: #7b4fb5; }
svg .series-src1 { stroke: #2e9a9a; fill: #2e9a9a; }
svg .series-src2 { stroke: #b54f7b; fill: #b54f7b; }
svg .series-src3 { stroke: #8a7a2e; fill: #8a7a2e; }
svg polyline[class^="series-src"] { fill: none; stroke-width: 1.4; stroke-dasharray: 5 2; }
svg polyline.series-margin { fill: none; stroke-width: 1.6; stroke-dasharray: 4 2; }
svg .marker-best { stroke: var(--ok); stroke-dasharray: 5 3; stroke-width: 1.5; }
svg .shade-overfit { fill: var(--bad); opacity: 0.09; }
svg text.shade-label { fill: var(--bad); }
svg text.marker-label { fill: var(--ok); }
svg .bar-zero_shot { fill: var(--zs); } svg .bar-few_shot { fill: var(--fs); }
svg .bar-finetuned { fill: var(--ft); } svg .bar { fill: var(--fs); }
svg .bar-flagged { fill: var(--bad); } svg .bar-neutral { fill: var(--zs); }
svg .bar-improved { fill: var(--ok); }
svg .whisker { stroke: var(--fg); stroke-width: 1.4; }
svg .zero { stroke: var(--fg); stroke-width: 1; }
details > summary { cursor: pointer; margin: 10px 0; color: var(--muted); }
footer { margin-top: 28px; font-size: 0.85em; color: var(--muted); }
"""

# default-src 'none' blocks every fetch (scripts, fonts, images, frames...); only the inline
# stylesheet and data: images (the favicon stub) are allowed.
_CSP = "default-src 'none'; style-src 'unsafe-inline'; img-src data:"


def _e(value: object) -> str:
    return escape(str(value), quote=True)


# --------------------------------------------------------------------------------------------
# Normalisation to JSON-able data
# --------------------------------------------------------------------------------------------


def to_jsonable(value: Any) -> Any:
    """Convert report data to plain JSON types (see the schema in the module docstring)."""
    if hasattr(value, "to_dict") and callable(value.to_dict) and not isinstance(value, type):
        return to_jsonable(value.to_dict())
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return to_jsonable(dataclasses.asdict(value))
    if isinstance(value, Mapping):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if hasattr(value, "item") and callable(value.item):  # NumPy / torch scalars
        try:
            return to_jsonable(value.item())
        except (TypeError, ValueError):
            pass
    if hasattr(value, "tolist") and callable(value.tolist):  # arrays
        return to_jsonable(value.tolist())
    return str(value)


# --------------------------------------------------------------------------------------------
# Formatting
# --------------------------------------------------------------------------------------------


def _num(value: Any, fmt: str = ".2f") -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return _DASH
    return format(value, fmt)


def _score_ci(row: Mapping[str, Any]) -> str:
    score = _num(row.get("score"))
    lo, hi = row.get("ci_low"), row.get("ci_high")
    if isinstance(lo, (int, float)) and isinstance(hi, (int, float)):
        return f"{score} [{_num(lo)}, {_num(hi)}]"
    return score


def _latency(value: Any) -> str:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return _DASH
    return f"{value * 1000:.0f} ms" if value < 1 else f"{value:.2f} s"


def _duration(value: Any) -> str:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return _DASH
    return format_duration(float(value))


def _memory(value: Any) -> str:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return _DASH
    return format_bytes(float(value))


def _cell_text(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, float):
        return f"{value:.4g}"
    return json.dumps(value, ensure_ascii=False)


def _flatten(config: Mapping[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    rows: list[tuple[str, Any]] = []
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            rows.extend(_flatten(value, f"{name}."))
        else:
            rows.append((name, value))
    return rows


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]], *,
           numeric: Sequence[int] = (), row_classes: Sequence[str] | None = None) -> str:
    """A table from already-escaped cell HTML."""
    head = "".join(f'<th class="num">{h}</th>' if i in numeric else f"<th>{h}</th>"
                   for i, h in enumerate(headers))
    body = []
    for r, row in enumerate(rows):
        cls = f' class="{row_classes[r]}"' if row_classes and row_classes[r] else ""
        cells = "".join(f'<td class="num">{c}</td>' if i in numeric else f"<td>{c}</td>"
                        for i, c in enumerate(row))
        body.append(f"<tr{cls}>{cells}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


# --------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------


def _licences(report: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    lic = report.get("licence")
    if isinstance(lic, Mapping):
        return [lic]
    if isinstance(lic, list):
        return [x for x in lic if isinstance(x, Mapping)]
    return []


def _licence_warning(lic: Mapping[str, Any]) -> str | None:
    category = str(lic.get("category") or "unknown").lower()
    if category in OK_LICENCE_CATEGORIES:
        return None
    what = lic.get("source") or lic.get("name") or "this model or data set"
    ident = lic.get("id") or "unknown"
    if category == "non-commercial":
        return f"Licence {ident} of {what} is non-commercial: do not use the result commercially."
    if category == "unknown":
        return (f"Licence of {what} is unknown ({ident}): check it before using or sharing the "
                "result.")
    return f"Licence {ident} of {what} is {category}: read its terms before use."


def _section_verdict(verdict: Mapping[str, Any]) -> str:
    decision = str(verdict.get("decision", ""))
    label = DECISION_LABELS.get(decision, decision or "Verdict")
    return (f'<section class="verdict {_e(decision)}" id="verdict"><h2>Verdict</h2>'
            f'<p class="decision">{_e(label)}</p><p>{_e(verdict.get("text", ""))}</p></section>')


def _best_names(report: Mapping[str, Any]) -> set[str]:
    verdict = report.get("verdict")
    if not isinstance(verdict, Mapping):
        return set()
    return {str(verdict[k]) for k in ("best_prompt", "best_finetuned") if verdict.get(k)}


def _section_scores(report: Mapping[str, Any], systems: list[Mapping[str, Any]]) -> str:
    metric = report.get("metric")
    bars = []
    for row in systems:
        score = row.get("score")
        if not isinstance(score, (int, float)):
            continue
        lo, hi = row.get("ci_low"), row.get("ci_high")
        ok = isinstance(lo, (int, float)) and isinstance(hi, (int, float))
        kind = str(row.get("kind", ""))
        label = f"{row.get('name', '?')} ({KIND_LABELS.get(kind, kind)})"
        bars.append(Bar(label, float(score), float(lo) if ok else None,
                        float(hi) if ok else None, css=f"bar-{kind}" if kind else "bar"))
    if not bars:
        return ""
    in_unit = all(0 <= v <= 1 for b in bars for v in (b.value, b.low, b.high) if v is not None)
    title = f"Score ({metric})" if metric else "Score"
    chart = bar_chart(bars, title=f"{title} with 95% intervals",
                      domain=(0.0, 1.0) if in_unit else None)
    metric_html = f" in <code>{_e(metric)}</code>" if metric else ""
    return (f'<section id="scores"><h2>Scores</h2><p class="muted">Mean score{metric_html} per '
            f"system; whiskers are 95% bootstrap intervals.</p>{chart}</section>")


def _section_compare(report: Mapping[str, Any], systems: list[Mapping[str, Any]]) -> str:
    best = _best_names(report)
    rows, classes = [], []
    for row in systems:
        kind = str(row.get("kind", ""))
        rows.append([_e(row.get("name", "?")), _e(KIND_LABELS.get(kind, kind)),
                     _e(_score_ci(row)), _e(_num(row.get("prompt_tokens"), ".0f")),
                     _e(_latency(row.get("latency_s"))), _e(_duration(row.get("train_time_s"))),
                     _e(_memory(row.get("peak_memory_bytes")))])
        classes.append("best" if str(row.get("name")) in best else "")
    headers = ["System", "Kind", "Score [95% CI]", "Prompt tokens / request",
               "Latency / request", "Training time", "Peak memory"]
    return (f'<section id="compare"><h2>Comparison</h2>'
            f"{_table(headers, rows, numeric=(2, 3, 4, 5, 6), row_classes=classes)}</section>")


def _section_fields(field_scores: Mapping[str, Any]) -> str:
    systems = [s for s, v in field_scores.items() if isinstance(v, Mapping)]
    fields: list[str] = []
    for s in systems:
        fields.extend(f for f in field_scores[s] if f not in fields)
    if not fields:
        return ""
    rows = [[f"<code>{_e(f)}</code>", *(_e(_num(field_scores[s].get(f))) for s in systems)]
            for f in fields]
    table = _table(["Field", *(_e(s) for s in systems)], rows,
                   numeric=tuple(range(1, len(systems) + 1)))
    return (f'<section id="fields"><h2>JSON fields</h2><p class="muted">Fraction of examples '
            f"where each field of the reference is reproduced exactly.</p>{table}</section>")


def _mean_ci(value: Any) -> str:
    if not isinstance(value, Mapping):
        return _DASH
    return f"{_num(value.get('mean'))} [{_num(value.get('ci_low'))}, {_num(value.get('ci_high'))}]"


def _section_preference(prefs: Mapping[str, Any]) -> str:
    systems = [s for s, v in prefs.items() if isinstance(v, Mapping)]
    if not systems:
        return ""
    rows = [[_e(s), _e(prefs[s].get("n_pairs", _DASH)),
             _e(_mean_ci(prefs[s].get("preference_accuracy"))),
             _e(_mean_ci(prefs[s].get("reward_margin"))),
             _e(prefs[s].get("reference") or "none: beta * log-prob difference")]
            for s in systems]
    beta = prefs[systems[0]].get("beta")
    body = _table(["System", "Pairs", "Preference accuracy [95% CI]",
                   "Reward margin [95% CI]", "Reference"], rows, numeric=(1, 2, 3))
    return (f'<section id="preference"><h2>Preference pairs</h2><p class="muted">Share of '
            f"pairs where the model gives the chosen answer a higher log-probability than the "
            f"rejected one, and the implicit DPO reward margin (beta {_e(beta)}), each with a "
            f"bootstrap interval.</p>{body}</section>")


def _section_metric_table(table: Mapping[str, Any]) -> str:
    systems = [s for s, v in table.items() if isinstance(v, Mapping)]
    columns: list[str] = []
    for s in systems:
        columns.extend(c for c in table[s] if c not in columns)
    if not columns:
        return ""
    rows = [[_e(s), *(_e(_num(table[s].get(c), ".3g")) for c in columns)] for s in systems]
    body = _table(["System", *(f"<code>{_e(c)}</code>" for c in columns)], rows,
                  numeric=tuple(range(1, len(columns) + 1)))
    return (f'<section id="metrics"><h2>All metrics</h2><p class="muted">Mean per-example '
            f"score of every metric (the comparison above uses the first).</p>{body}</section>")


def _section_curves(curves: Mapping[str, Any]) -> str:
    records = [r for r in curves.get("records", []) if isinstance(r, Mapping)]

    def points(key: str) -> list[tuple[float, float]]:
        pts = []
        for r in records:
            step, value = r.get("step"), r.get(key)
            if isinstance(step, (int, float)) and isinstance(value, (int, float)) \
                    and not isinstance(value, bool) and math.isfinite(value):
                pts.append((float(step), float(value)))
        return sorted(pts)

    train, val = points("train_loss"), points("val_loss")
    if not train and not val:
        return ""
    series = []
    if train:
        series.append(Series("train loss", train, "series-train"))
    if val:
        series.append(Series("validation loss", val, "series-val", dots=True))
    # a data mixture: each source's validation loss (metrics.jsonl val_loss/<source>)
    per_source = sorted({k for r in records for k in r if str(k).startswith("val_loss/")})
    for i, key in enumerate(per_source):
        if points(key):
            series.append(Series(f"validation loss: {key.split('/', 1)[1]}", points(key),
                                 f"series-src{i % 4}", dots=True))
    overfit = curves.get("overfit") if isinstance(curves.get("overfit"), Mapping) else {}
    markers, shades = [], []
    best_step = overfit.get("best_step")
    if isinstance(best_step, (int, float)):
        markers.append(VMarker(float(best_step), f"best step {best_step}", "marker-best"))
    start = overfit.get("start_step")
    if overfit.get("detected") and isinstance(start, (int, float)):
        end = max(p[0] for p in train + val)
        shades.append(Shade(float(start), end, f"overfitting from step {start}", "shade-overfit"))
    chart = line_chart(series, title="Training and validation loss", x_label="step",
                       y_label="loss", markers=markers, shades=shades)
    message = ""
    if overfit.get("message"):
        cls = "flag" if overfit.get("detected") else "muted"
        message = f'<p class="{cls}">{_e(overfit["message"])}</p>'
    return (f'<section id="curves"><h2>Loss curves</h2>{chart}{message}'
            f'{_preference_charts(points)}</section>')


def _preference_charts(points: Any) -> str:
    """DPO / ORPO runs: rewards of chosen and rejected answers, their margin, and the
    share of pairs whose chosen reward is higher (preference accuracy), per step."""
    chosen, rejected = points("rewards/chosen"), points("rewards/rejected")
    margins, accuracy = points("rewards/margins"), points("rewards/accuracy")
    if not (chosen or margins or accuracy):
        return ""
    rewards = [Series(label, pts, css) for label, pts, css in (
        ("chosen reward", chosen, "series-val"), ("rejected reward", rejected, "series-train"),
        ("margin", margins, "series-margin")) if pts]
    charts = line_chart(rewards, title="Preference rewards (beta x log-ratio)", x_label="step",
                        y_label="reward") if rewards else ""
    if accuracy:
        charts += line_chart([Series("preference accuracy", accuracy, "series-val")],
                             title="Preference accuracy (chosen reward > rejected)",
                             x_label="step", y_label="share of pairs")
    return charts


def _section_sources(sources: list[Any]) -> str:
    """A data mixture: each source's weight and what the run drew from it."""
    rows = [[_e(s.get("name", "?")), f"<code>{_e(s.get('path', ''))}</code>",
             _e(_num(s.get("weight"), "g")), _e(_num(s.get("share"), ".1%")),
             _e(s.get("train_examples", _DASH)), _e(s.get("val_examples", _DASH)),
             _e(s.get("rows_per_epoch", _DASH)), _e(s.get("rows", _DASH)),
             _e(s.get("tokens", _DASH))] for s in sources if isinstance(s, Mapping)]
    if not rows:
        return ""
    table = _table(["Source", "Path", "Weight", "Share", "Train rows", "Validation rows",
                    "Rows per epoch", "Rows drawn", "Tokens drawn"], rows,
                   numeric=(2, 3, 4, 5, 6, 7, 8))
    return (f'<section id="sources"><h2>Data sources</h2><p class="muted">A weighted mixture: '
            f"each epoch draws share &times; (all train rows) from each source; rows drawn "
            f"count a repeated row each time.</p>{table}</section>")


def _section_forgetting(forgetting: Mapping[str, Any]) -> str:
    items = [i for i in forgetting.get("items", []) if isinstance(i, Mapping)]
    parts = ['<section id="forgetting"><h2>Forgetting</h2>']
    if forgetting.get("text"):
        cls = "flag" if forgetting.get("flagged") else "muted"
        parts.append(f'<p class="{cls}">{_e(forgetting["text"])}</p>')
    rows = []
    for item in items:
        delta = item.get("delta")
        if not isinstance(delta, (int, float)):
            continue
        lo, hi = item.get("ci_low"), item.get("ci_high")
        ok = isinstance(lo, (int, float)) and isinstance(hi, (int, float))
        higher_better = bool(item.get("higher_is_better", True))
        improved = ok and ((lo > 0) if higher_better else (hi < 0))
        css = "bar-flagged" if item.get("flagged") else ("bar-improved" if improved
                                                         else "bar-neutral")
        direction = "higher is better" if higher_better else "lower is better"
        # One chart per measure: perplexity and accuracy deltas have different units.
        parts.append(bar_chart([Bar(f"{item.get('name', '?')}", float(delta),
                                    float(lo) if ok else None, float(hi) if ok else None, css)],
                               title=f"{item.get('name', '?')}: change after fine-tuning "
                                     f"({direction})", value_digits=3, row_height=36,
                               label_width=260))
        status = '<span class="flag">forgetting</span>' if item.get("flagged") else \
            ('<span class="good">improved</span>' if improved else "no measurable change")
        ci = f" [{_num(lo, '+.3g')}, {_num(hi, '+.3g')}]" if ok else ""
        rows.append([_e(item.get("name", "?")), _e(_num(item.get("before"), ".4g")),
                     _e(_num(item.get("after"), ".4g")), _e(_num(delta, "+.3g") + ci),
                     _e(direction), status])
    if rows:
        parts.append(_table(["Measure", "Before", "After", "Change [95% CI]", "Direction",
                             "Status"], rows, numeric=(1, 2, 3)))
    parts.append("</section>")
    return "".join(parts) if (rows or forgetting.get("text")) else ""


def _section_kv(section_id: str, title: str, data: Mapping[str, Any], *,
                collapsed: bool) -> str:
    rows = [[f"<code>{_e(k)}</code>", f'<div class="cell">{_e(_cell_text(v))}</div>']
            for k, v in _flatten(data)]
    if not rows:
        return ""
    table = _table(["Key", "Value"], rows)
    if collapsed:
        table = f"<details><summary>{len(rows)} entries</summary>{table}</details>"
    return f'<section id="{section_id}"><h2>{_e(title)}</h2>{table}</section>'


def _section_licence(licences: list[Mapping[str, Any]]) -> str:
    rows = []
    for lic in licences:
        warning = _licence_warning(lic)
        status = f'<span class="flag">{_e(warning)}</span>' if warning else \
            '<span class="good">ok</span>'
        rows.append([_e(lic.get("source") or lic.get("name") or ""), _e(lic.get("id") or "?"),
                     _e(lic.get("category") or "unknown"), _e(lic.get("note") or ""), status])
    if not rows:
        return ""
    return (f'<section id="licence"><h2>Licence</h2>'
            f"{_table(['For', 'Licence', 'Category', 'Note', 'Status'], rows)}</section>")


def _section_examples(examples: list[Any]) -> str:
    rows_in = [e for e in examples if isinstance(e, Mapping)][:MAX_EXAMPLES]
    if not rows_in:
        return ""
    columns: list[str] = []
    for ex in rows_in:
        columns.extend(k for k in ex if k not in columns)
    rows = [[f'<div class="cell">{_e(_cell_text(ex[c]))}</div>' if c in ex else ""
             for c in columns] for ex in rows_in]
    more = len([e for e in examples if isinstance(e, Mapping)]) - len(rows_in)
    note = f'<p class="muted">{more} more examples are in report.json.</p>' if more > 0 else ""
    return (f'<section id="examples"><h2>Example outputs</h2>'
            f"{_table([_e(c) for c in columns], rows)}{note}</section>")


# --------------------------------------------------------------------------------------------
# Page
# --------------------------------------------------------------------------------------------


def render_html(report: Mapping[str, Any]) -> str:
    """Render a report dict (schema in the module docstring) to a complete HTML page."""
    report = to_jsonable(report)
    title = str(report.get("title") or "tunelab report")
    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
             f'<meta http-equiv="Content-Security-Policy" content="{_CSP}">',
             '<meta name="viewport" content="width=device-width, initial-scale=1">',
             # A data: favicon stops the browser asking the (absent) server for one.
             '<link rel="icon" href="data:,">',
             f"<title>{_e(title)}</title><style>{_CSS}</style></head><body><main>",
             f"<h1>{_e(title)}</h1>"]
    if report.get("created"):
        parts.append(f'<p class="muted">{_e(report["created"])}</p>')
    if report.get("summary"):
        parts.append(f"<p>{_e(report['summary'])}</p>")
    licences = _licences(report)
    for lic in licences:
        warning = _licence_warning(lic)
        if warning:
            parts.append(f'<div class="warning">{_e(warning)}</div>')

    verdict = report.get("verdict")
    if isinstance(verdict, Mapping) and verdict:
        parts.append(_section_verdict(verdict))
    systems = [s for s in report.get("systems") or [] if isinstance(s, Mapping)]
    if systems:
        parts.append(_section_scores(report, systems))
        parts.append(_section_compare(report, systems))
    if isinstance(report.get("metric_table"), Mapping):
        parts.append(_section_metric_table(report["metric_table"]))
    if isinstance(report.get("field_scores"), Mapping):
        parts.append(_section_fields(report["field_scores"]))
    if isinstance(report.get("preference"), Mapping):
        parts.append(_section_preference(report["preference"]))
    if isinstance(report.get("sources"), list):
        parts.append(_section_sources(report["sources"]))
    if isinstance(report.get("curves"), Mapping):
        parts.append(_section_curves(report["curves"]))
    if isinstance(report.get("forgetting"), Mapping):
        parts.append(_section_forgetting(report["forgetting"]))
    if isinstance(report.get("examples"), list):
        parts.append(_section_examples(report["examples"]))
    if isinstance(report.get("config"), Mapping):
        parts.append(_section_kv("config", "Configuration", report["config"], collapsed=False))
    if isinstance(report.get("environment"), Mapping):
        parts.append(_section_kv("environment", "Environment", report["environment"],
                                 collapsed=False))
    if licences:
        parts.append(_section_licence(licences))
    parts.append('<footer>Written by tunelab. This file is self-contained: it loads nothing '
                 "from the network.</footer></main></body></html>")
    return "\n".join(p for p in parts if p)


def _atomic_write_text(path: Path, text: str) -> None:
    # Write next to the target and rename, so a crash never leaves a half-written report and
    # a reader (a browser refreshing the page) sees either the old or the new file.
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_report(out_dir: str | os.PathLike[str], report: Mapping[str, Any]
                 ) -> tuple[Path, Path]:
    """Write ``report.html`` and ``report.json`` into ``out_dir`` (created if missing).

    ``report`` follows the schema in the module docstring. Both files are written atomically;
    returns ``(html_path, json_path)``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    data = to_jsonable(report)
    if not isinstance(data, dict):
        raise TypeError(f"report must be a mapping, got {type(report).__name__}")
    json_path, html_path = out / "report.json", out / "report.html"
    _atomic_write_text(json_path, json.dumps(data, indent=2, ensure_ascii=False,
                                             allow_nan=False) + "\n")
    _atomic_write_text(html_path, render_html(data))
    return html_path, json_path


# --------------------------------------------------------------------------------------------
# Environment
# --------------------------------------------------------------------------------------------


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def collect_environment(device: str | None = None) -> dict[str, str]:
    """Versions and hardware for the report's environment section.

    Package versions come from installed metadata, so nothing heavy is imported; the GPU
    name is read only if ``torch`` is already imported (it is, in a run that used it).
    """
    env: dict[str, str] = {"python": platform.python_version(), "platform": platform.platform()}
    for dist in ("tunelab", "torch", "transformers", "peft"):
        env[dist] = _version(dist) or "not installed"
    for dist in ("accelerate", "bitsandbytes", "datasets", "numpy"):
        v = _version(dist)
        if v:
            env[dist] = v
    if device is not None:
        env["device"] = device
    env["cpu"] = f"{_cpu_name()} ({os.cpu_count()} logical cores)"
    torch = sys.modules.get("torch")
    if torch is not None:
        try:
            if torch.cuda.is_available():
                env["gpu"] = ", ".join(torch.cuda.get_device_name(i)
                                       for i in range(torch.cuda.device_count()))
                if getattr(torch.version, "cuda", None):
                    env["cuda"] = str(torch.version.cuda)
            elif getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
                env["gpu"] = "Apple MPS"
        except Exception as exc:  # noqa: BLE001 -- a broken driver must not break the report
            env["gpu"] = f"unavailable ({type(exc).__name__})"
    return env
