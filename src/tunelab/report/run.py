"""The report of one training run: ``report.html`` + ``report.json`` in the run directory.

Built only from what the run wrote (``metrics.jsonl``, ``summary.json``,
``run_config.json``), so it can be (re)built at any time, also for an old run:

    python -c "from tunelab.report.run import write_run_report; write_run_report('runs/a')"

It shows the training and validation loss curves with the overfitting check
(:func:`tunelab.evaluate.curves.detect_overfitting`: the step where validation loss started
rising and the best checkpoint), the run's final figures, its data statistics, the
configuration, the environment and the base model's licence.

Training calls :func:`write_run_report` at the end of every run. A report that cannot be
built (a corrupt file, say) is logged as a warning and never fails the training run.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any

from tunelab.evaluate.curves import detect_overfitting
from tunelab.evaluate.verdict import format_bytes, format_duration
from tunelab.report.html import collect_environment, write_report

log = logging.getLogger(__name__)

# tunelab.licence categories -> the report's (see tunelab.report.html's schema).
_LICENCE_CATEGORY = {"permissive": "permissive", "conditions": "restricted",
                     "non-commercial": "non-commercial", "unknown": "unknown"}


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The per-step records of a metrics.jsonl; a torn last line (a killed run) is skipped."""
    records: list[dict[str, Any]] = []
    if not path.is_file():
        return records
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict):
            records.append(rec)
    return records


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    value = json.loads(path.read_text(encoding="utf-8"))
    return value if isinstance(value, dict) else {}


# per-step metrics of the preference objectives (tunelab.objectives.dpo.reward_metrics)
PREFERENCE_KEYS = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracy")


def curves_section(records: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The report's ``curves`` entry: loss records plus the overfitting flag."""
    keep = [{k: r.get(k) for k in r if k in ("step", "train_loss", "val_loss", *PREFERENCE_KEYS)
             or k.startswith("val_loss/")} for r in records if "step" in r]
    if not keep:
        return None
    return {"records": keep, "overfit": detect_overfitting(keep)}


def model_licence(spec: str | None) -> dict[str, Any] | None:
    """The base model's licence for the report, without loading the model: the alias
    table, a local folder's model card / config / LICENSE, or a GGUF header."""
    if not spec:
        return None
    from tunelab import licence as lic
    from tunelab import models

    try:
        source = models.resolve_model(spec)
        if source.licence_hint:
            info = lic.classify_licence(source.licence_hint, source="tunelab alias table")
        elif source.kind in ("folder", "gguf"):
            info = lic.read_model_licence(source.path)
        else:
            return {"id": "unknown", "category": "unknown", "source": spec,
                    "note": "hub model: read its model card"}
    except Exception as exc:  # noqa: BLE001 -- a licence lookup must not break the report
        log.debug("no licence for %s: %s", spec, exc)
        return None
    return {"id": info.id, "category": _LICENCE_CATEGORY.get(info.category, "unknown"),
            "source": f"base model {spec}", "note": info.summary}


def _licences(summary: dict[str, Any], cfg: dict[str, Any]) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = []
    for value in (summary.get("licence"), cfg.get("licence")):
        if isinstance(value, dict):
            found.append(value)
        elif isinstance(value, list):
            found.extend(v for v in value if isinstance(v, dict))
        elif isinstance(value, str):
            found.append({"id": value, "category": "unknown", "source": "run"})
    if not found:
        base = model_licence(cfg.get("model"))
        if base:
            found.append(base)
    return found


def _fmt(x: Any, digits: int = 4) -> str:
    return f"{x:.{digits}g}" if isinstance(x, (int, float)) and math.isfinite(x) else "n/a"


_METHODS = {"lora": "LoRA", "qlora": "QLoRA", "full": "Full"}


def _summary_text(out: Path, summary: dict[str, Any], cfg: dict[str, Any]) -> str:
    method = _METHODS.get(str(cfg.get("method")), str(cfg.get("method", "?")))
    sources = cfg.get("data", "?")
    if isinstance(sources, list):  # a mixture: each source's name and weight
        data = "a mixture of " + " + ".join(
            f"{s.get('name', '?')} (weight {s.get('weight', '?')})" for s in sources
            if isinstance(s, dict))
    else:
        data = Path(str(sources)).name
    head = f"{method} fine-tune of {cfg.get('model', '?')} on {data}"
    if not summary:
        return f"{head}: no summary.json yet (the run has not finished). Run directory: {out}."
    secs = summary.get("train_seconds")
    took = format_duration(secs) if isinstance(secs, (int, float)) else "?"
    text = (f"{head}: {summary.get('steps', '?')} steps in {took} "
            f"({_fmt(summary.get('tokens_per_second'), 3)} tokens/s)")
    if isinstance(summary.get("peak_memory_bytes"), (int, float)):
        text += f", peak memory {format_bytes(summary['peak_memory_bytes'])}"
    text += f"; final train loss {_fmt(summary.get('final_train_loss'))}"
    if summary.get("final_val_loss") is not None:
        text += f", validation loss {_fmt(summary.get('final_val_loss'))}"
    if summary.get("best_step") is not None:
        text += f" (best {_fmt(summary.get('best_val_loss'))} at step {summary['best_step']})"
    if summary.get("interrupted"):
        text += "; interrupted: continue with --resume"
    return f"{text}. Run directory: {out}."


def build_run_report(out_dir: str | Path) -> dict[str, Any]:
    """The report dict (schema in :mod:`tunelab.report.html`) of the run in ``out_dir``."""
    out = Path(out_dir)
    summary = _read_json(out / "summary.json")
    cfg = _read_json(out / "run_config.json")
    records = read_metrics(out / "metrics.jsonl")
    report: dict[str, Any] = {
        "title": f"Training run {out.resolve().name}",
        "summary": _summary_text(out, summary, cfg),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    curves = curves_section(records)
    if curves is not None:
        report["curves"] = curves
    results = {k: summary[k] for k in (
        "steps", "final_train_loss", "final_val_loss", "best_val_loss", "best_step",
        "train_seconds", "tokens_per_second", "peak_memory_bytes", "trainable_parameters",
        "total_parameters", "memory_parts", "interrupted", "weights_dir") if k in summary}
    config: dict[str, Any] = dict(cfg)
    if results:
        config["results"] = results
    if isinstance(summary.get("data_stats"), dict):
        config["data_stats"] = summary["data_stats"]
    if isinstance(summary.get("sources"), list):
        report["sources"] = summary["sources"]
    if config:
        report["config"] = config
    device = cfg.get("device")
    if device == "auto":
        try:
            from tunelab.models import pick_device

            device = str(pick_device("auto"))
        except Exception:  # noqa: BLE001
            device = None
    report["environment"] = collect_environment(device=device)
    licences = _licences(summary, cfg)
    if licences:
        report["licence"] = licences
    return report


def write_run_report(out_dir: str | Path) -> Path | None:
    """Write ``report.html`` and ``report.json`` for the run in ``out_dir``; return the
    HTML path, or ``None`` (with a logged warning) if the report could not be built."""
    out = Path(out_dir)
    try:
        html_path, _ = write_report(out, build_run_report(out))
    except Exception as exc:  # noqa: BLE001 -- a report must never fail a training run
        log.warning("could not write the run report in %s: %s: %s", out, type(exc).__name__,
                    exc)
        return None
    log.info("run report: %s", html_path)
    return html_path
