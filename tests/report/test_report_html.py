"""Report rendering: escaping, self-containment, atomic writes, JSON round trip."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest

from tunelab.evaluate import (
    SystemResult,
    detect_overfitting,
    forgetting_summary,
    make_verdict,
)
from tunelab.report import collect_environment, render_html, to_jsonable, write_report

XSS = '<script>alert("x")</script>'


def sample_report() -> dict:
    """A report exercising every section, with hostile strings in user-controlled places."""
    rng = np.random.default_rng(0)
    n = 120
    few = (rng.random(n) < 0.41).astype(float).tolist()
    zero = (rng.random(n) < 0.2).astype(float).tolist()
    ft = (rng.random(n) < 0.87).astype(float).tolist()
    systems = [
        SystemResult.from_scores("zero-shot", "zero_shot", zero, prompt_tokens=180,
                                 latency_s=0.21),
        SystemResult.from_scores("few-shot k=3", "few_shot", few, prompt_tokens=960,
                                 latency_s=0.48),
        SystemResult.from_scores(f"QLoRA adapter {XSS}", "finetuned", ft, prompt_tokens=160,
                                 latency_s=0.19, train_time_s=1834.0,
                                 peak_memory_bytes=int(7.9 * 2**30)),
    ]
    records = []
    for step in range(0, 1001, 10):
        records.append({"step": step, "train_loss": 2.5 * math.exp(-step / 300) + 0.3
                        + 0.03 * math.sin(step)})
    for step, v in zip(range(100, 1001, 100),
                       [1.9, 1.4, 1.1, 0.95, 0.9, 0.93, 0.99, 1.05, 1.12, 1.2], strict=True):
        records.append({"step": step, "val_loss": v})
    overfit = detect_overfitting(records)
    before = [(float(rng.normal(300, 20)), 100) for _ in range(60)]
    after = [(nll + float(rng.normal(12, 4)), t) for nll, t in before]
    probe_b = (rng.random(80) < 0.6).astype(float).tolist()
    forgetting = forgetting_summary(ppl_before=before, ppl_after=after,
                                    probe_before=probe_b, probe_after=probe_b)
    return {
        "title": f"Run {XSS} & friends",
        "summary": "Sentiment labels on support tickets <b>bold?</b>",
        "created": "2025-01-01T12:00:00Z",
        "verdict": make_verdict(systems),
        "metric": "json_fields",
        "systems": systems,
        "field_scores": {"few-shot k=3": {"label": 0.5, "reason": 0.2},
                         f"QLoRA adapter {XSS}": {"label": 0.95, f"<{XSS}>": 0.7}},
        "curves": {"records": records, "overfit": overfit},
        "forgetting": forgetting,
        "config": {"model": {"name": "tiny-gpt", "lora": {"r": 8, "alpha": 16}},
                   "lr": 2e-4, f"key{XSS}": f"value{XSS}", "url": "https://example.com/x"},
        "environment": {"python": "3.12.0", "torch": "2.13.0", "device": "cpu"},
        "licence": [{"id": "apache-2.0", "category": "permissive", "source": "tiny-gpt"},
                    {"id": "cc-by-nc-4.0", "category": "non-commercial",
                     "source": f"data {XSS}"}],
        "examples": [{"id": i, "input": f"ticket {i} {XSS}", "reference": '{"label": "pos"}',
                      "prediction": f'{{"label": "neg"}} </td></tr></table>{XSS}',
                      "score": 0.5} for i in range(5)],
        "nan_value": float("nan"),
    }


def test_write_report_creates_both_files(tmp_path: Path) -> None:
    html_path, json_path = write_report(tmp_path / "out", sample_report())
    assert html_path == tmp_path / "out" / "report.html"
    assert json_path == tmp_path / "out" / "report.json"
    assert html_path.read_text(encoding="utf-8").startswith("<!DOCTYPE html>")
    data = json.loads(json_path.read_text(encoding="utf-8"))
    assert data["title"].startswith("Run ")
    assert data["verdict"]["decision"] == "finetune"
    assert data["nan_value"] is None  # strict JSON
    assert data["curves"]["overfit"]["detected"] is True
    assert len(data["systems"]) == 3
    # No temp files left behind.
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["report.html", "report.json"]


def test_html_escapes_everything(tmp_path: Path) -> None:
    html_path, _ = write_report(tmp_path, sample_report())
    text = html_path.read_text(encoding="utf-8")
    assert "<script" not in text.lower()
    assert "<b>bold?</b>" not in text
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;" in text
    assert "</td></tr></table>&lt;script" not in text
    assert "&lt;/td&gt;&lt;/tr&gt;&lt;/table&gt;" in text


def test_html_is_self_contained(tmp_path: Path) -> None:
    html_path, _ = write_report(tmp_path, sample_report())
    text = html_path.read_text(encoding="utf-8")
    assert not re.search(r"""(src|href|xlink:href|action)\s*=\s*["']?\s*(https?:)?//""", text,
                         re.IGNORECASE)
    assert not re.search(r"url\(\s*['\"]?\s*(https?:)?//", text, re.IGNORECASE)
    assert "@import" not in text
    assert "<script" not in text.lower()
    assert "Content-Security-Policy" in text
    # The config's URL value is shown as text only.
    assert "https://example.com/x" in text


def test_html_has_all_sections(tmp_path: Path) -> None:
    html_path, _ = write_report(tmp_path, sample_report())
    text = html_path.read_text(encoding="utf-8")
    for section in ("verdict", "scores", "compare", "fields", "curves", "forgetting",
                    "examples", "config", "environment", "licence"):
        assert f'id="{section}"' in text, section
    assert "Fine-tuning pays off" in text
    assert "best step 500" in text and "overfitting from step 600" in text
    assert text.count("<svg") >= 4  # scores, curves, two forgetting measures
    assert 'class="warning"' in text and "non-commercial" in text
    assert "30m 34s" in text and "7.9 GiB" in text and "190 ms" in text
    assert "model.lora.r" in text  # nested config flattened


def test_sections_are_optional() -> None:
    text = render_html({})
    assert "<h1>tunelab report</h1>" in text
    assert 'id="verdict"' not in text and "<svg" not in text
    text = render_html({"title": "t", "systems": [{"name": "a", "kind": "few_shot",
                                                   "score": 3.5}]})
    assert 'id="scores"' in text and 'id="compare"' in text  # out-of-[0,1] scores still plot


def test_unknown_licence_warns() -> None:
    text = render_html({"licence": {"id": "other", "category": "unknown", "name": "m"}})
    assert 'class="warning"' in text and "unknown" in text
    text = render_html({"licence": {"id": "mit", "category": "permissive", "name": "m"}})
    assert 'class="warning"' not in text


def test_examples_are_capped() -> None:
    text = render_html({"examples": [{"i": i} for i in range(250)]})
    assert "50 more examples are in report.json" in text


def test_to_jsonable_converts_types() -> None:
    data = to_jsonable({"a": (1, 2), "b": np.float32(0.5), "c": np.arange(3), "d": float("inf"),
                        "e": Path("x/y"), "f": np.int64(3), "g": True})
    assert data == {"a": [1, 2], "b": 0.5, "c": [0, 1, 2], "d": None, "e": "x/y", "f": 3,
                    "g": True}
    json.dumps(data, allow_nan=False)


def test_atomic_write_replaces_existing(tmp_path: Path) -> None:
    (tmp_path / "report.html").write_text("old")
    write_report(tmp_path, {"title": "new"})
    assert "new" in (tmp_path / "report.html").read_text()


def test_collect_environment() -> None:
    env = collect_environment(device="cpu")
    assert env["device"] == "cpu"
    for key in ("python", "torch", "transformers", "peft", "cpu"):
        assert env[key]
    assert all(isinstance(v, str) for v in env.values())
    with pytest.raises(TypeError):
        write_report("/nonexistent-never", ["not", "a", "dict"])  # type: ignore[arg-type]


def test_render_accepts_dataclasses_directly() -> None:
    row = SystemResult("ft <x>", "finetuned", 0.5, 0.4, 0.6)
    text = render_html({"systems": [row]})
    assert "ft &lt;x&gt;" in text and "0.50 [0.40, 0.60]" in text


def test_curves_edge_cases() -> None:
    one = render_html({"curves": {"records": [{"step": 0, "train_loss": 1.0}]}})
    assert "<polyline" in one
    many = [{"step": s, "train_loss": 1.0 / (1 + s)} for s in range(20000)]
    text = render_html({"curves": {"records": many, "overfit": {"detected": False,
                                                                "best_step": None}}})
    points = text.split('class="series-train" points="', 1)[1].split('"', 1)[0]
    assert len(points.split()) <= 1501  # thinned
    assert render_html({"curves": {"records": []}}).count("<svg") == 0
