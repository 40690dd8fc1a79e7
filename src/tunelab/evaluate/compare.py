"""Prompt engineering or fine-tuning? Evaluate both on the same held-out set and decide.

Rows of the comparison, all scored on the same examples (so differences are paired):

* **zero-shot**: the base model, the example's own messages with an optional instruction;
* **few-shot k=K**: the base model with K solved examples from the training data as prior
  turns (one row per K);
* **fine-tuned**: each adapter (LoRA / QLoRA) or full checkpoint, prompted exactly as in
  training. A LoRA adapter on a 16-bit base is merged into the weights while it is
  evaluated (as ``tunelab merge`` deploys it; same outputs up to rounding, no per-layer
  adapter cost), then unmerged; a QLoRA adapter runs on its 4-bit base unmerged. A run
  directory also provides training time and peak memory (summary.json), and the loss
  curves for the overfitting check (metrics.jsonl).

Costs per row: prompt tokens per request and latency per request (generation time over
requests at the batch size used), and for fine-tuned rows training time and peak memory.
The verdict (:func:`tunelab.evaluate.verdict.make_verdict`) compares the best prompting row
with the best fine-tuned one through a paired bootstrap interval of the score difference.
The forgetting check measures general-text perplexity and a general-knowledge probe on
the base and on every fine-tuned model (:mod:`tunelab.evaluate.forgetting`), and the verdict
weighs each run's forgetting against its task gain (:mod:`tunelab.evaluate.weigh`): a run
that forgot beyond its interval is a trade-off, not a plain win.

On preference pairs (the evaluation file itself, or ``pairs`` beside a task set) every row
also gets preference accuracy and reward margin with intervals
(:mod:`tunelab.evaluate.preference`), each pair asked with the row's own prompt.

Everything goes to ``out/``: ``report.html`` + ``report.json`` and one readable JSONL of
outputs per row under ``outputs/`` (and of pair log-probs, ``outputs/<row>.pairs.jsonl``).
"""

from __future__ import annotations

import gc
import logging
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tunelab.errors import ConfigError, DataError
from tunelab.evaluate.curves import OverfitFlag
from tunelab.evaluate.forgetting import (
    GENERAL_TEXT_SOURCE,
    GeneralAbility,
    forgetting_items,
    measure_general_ability,
    summarize_forgetting,
)
from tunelab.evaluate.probe import check_probe_tasks
from tunelab.evaluate.run import (
    EvalExample,
    EvalResult,
    EvalSettings,
    FinetunedSource,
    ModelOptions,
    PromptStyle,
    choose_shots,
    default_base,
    evaluate_system,
    load_base,
    load_finetuned,
    preference_columns,
    resolve_metrics,
    write_jsonl,
)
from tunelab.evaluate.verdict import SystemResult, Verdict, format_bytes, format_duration

log = logging.getLogger(__name__)

METHOD_LABELS = {"lora": "LoRA", "qlora": "QLoRA", "full": "full fine-tune"}


@dataclass
class FinetunedSystem:
    """A fine-tuned row: its display name and where its weights are."""

    name: str
    source: FinetunedSource


def finetuned_system(source: FinetunedSource, name: str | None = None) -> FinetunedSystem:
    """A row for ``source``, named ``name`` or after its method and folder."""
    if not name:
        folder = source.run_dir if source.run_dir is not None else source.path
        name = f"{METHOD_LABELS.get(source.method, source.method)} ({folder.name})"
    return FinetunedSystem(name, source)


@dataclass
class CompareResult:
    evals: list[EvalResult]
    systems: list[SystemResult]
    verdict: Verdict
    forgetting: Any | None
    general: dict[str, GeneralAbility]
    overfit: dict[str, OverfitFlag]
    report: dict[str, Any]
    html_path: Path
    json_path: Path
    table: str
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)


def slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-").lower() or "system"


def _release(*objects: Any) -> None:
    del objects
    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except Exception:  # noqa: BLE001
        pass


def run_compare(examples: list[EvalExample], *, settings: EvalSettings, out: str | Path,
                model_spec: str | None = None, shots_pool: Sequence[EvalExample] | None = None,
                zero_shot: bool = True, few_shot: Sequence[int] = (),
                instruction: str | None = None, system: str | None = None,
                finetuned: Sequence[FinetunedSystem] = (), forgetting: bool = True,
                options: ModelOptions | None = None, progress: bool = True,
                shot_seed: int = 0, min_gain: float = 0.0, seed: int = 0,
                title: str | None = None, description: str | None = None,
                data_label: str | None = None, shots_label: str | None = None,
                pairs: Sequence[EvalExample] | None = None,
                probe_tasks: Sequence[str] = ()) -> CompareResult:
    """Evaluate every row on ``examples``, decide, and write the report (module docstring).
    ``probe_tasks``: lm-evaluation-harness task YAMLs (or registered names) measured beside
    tunelab's probe on the base and every fine-tuned model."""
    start = time.perf_counter()
    options = options or ModelOptions()
    out = Path(out)
    if not examples:
        raise DataError("no examples to evaluate")
    # Everything that can be wrong with the request fails here, before a model is loaded.
    metrics = resolve_metrics(settings.metrics, examples)
    few_shot = sorted(set(int(k) for k in few_shot))
    styles: list[PromptStyle] = []
    if zero_shot:
        styles.append(PromptStyle("zero-shot", "zero_shot", instruction, system))
    if few_shot:
        if not shots_pool:
            raise ConfigError("--few-shot needs solved examples to show: pass --shots-from "
                              "FILE (the training data, never the evaluation set) or a run "
                              "directory as --adapter")
        for k in few_shot:
            shots = choose_shots(shots_pool, k, seed=shot_seed, exclude=examples)
            styles.append(PromptStyle(f"few-shot k={k}", "few_shot", instruction, system,
                                      shots))
    names = [s.name for s in styles] + [f.name for f in finetuned]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ConfigError(f"two rows are named {dupes[0]!r}; name adapters with "
                          "--adapter NAME=DIR")
    if not names:
        raise ConfigError("nothing to compare: no zero-shot, few-shot or fine-tuned row")
    base_spec = default_base(model_spec, [f.source for f in finetuned])
    measure_forgetting = forgetting and bool(finetuned)
    if probe_tasks:
        if not measure_forgetting:
            raise ConfigError("--probe-task is measured by the forgetting check (base vs "
                              "fine-tuned): add an --adapter row and drop --no-forgetting")
        check_probe_tasks(probe_tasks)

    evals: list[EvalResult] = []
    general: dict[str, GeneralAbility] = {}
    notes: list[str] = []
    lora16 = [f for f in finetuned if f.source.kind == "lora" and _base_bits(f.source) == 16]
    others = [f for f in finetuned if f not in lora16]
    base = tokenizer = None
    device = "cpu"
    if styles or lora16 or measure_forgetting:
        base, tokenizer = load_base(base_spec, options)
        device = str(next(base.parameters()).device)
        for style in styles:
            evals.append(evaluate_system(base, tokenizer, examples, style, settings,
                                         metrics=metrics, progress=progress, pairs=pairs))
        if measure_forgetting:
            general["base"] = measure_general_ability(base, tokenizer,
                                                      batch_size=settings.batch_size,
                                                      progress=progress, desc="base",
                                                      probe_tasks=probe_tasks)
        for ft in lora16:
            from tunelab import adapters

            wrapped = adapters.load_adapter(base, ft.source.path)
            # Folded into the weights, as `tunelab merge` would deploy it: the same outputs
            # (up to rounding) without the per-layer LoRA matmuls at every decoding step.
            wrapped.merge_adapter()
            evals.append(_evaluate_finetuned(wrapped, tokenizer, examples, ft, settings,
                                             metrics, progress, pairs))
            if measure_forgetting:
                general[ft.name] = measure_general_ability(
                    wrapped, tokenizer, batch_size=settings.batch_size, progress=progress,
                    desc=ft.name, probe_tasks=probe_tasks)
            wrapped.unmerge_adapter()
            base = wrapped.unload()  # the plain base again, LoRA layers removed
    if others:
        _release(base)
        base = None
        for ft in others:
            model, tok = load_finetuned(ft.source, base_spec, options)
            device = str(next(model.parameters()).device)
            evals.append(_evaluate_finetuned(model, tok, examples, ft, settings, metrics,
                                             progress, pairs))
            if measure_forgetting:
                general[ft.name] = measure_general_ability(
                    model, tok, batch_size=settings.batch_size, progress=progress,
                    desc=ft.name, probe_tasks=probe_tasks)
            _release(model)
    order = {n: i for i, n in enumerate(names)}
    evals.sort(key=lambda e: order[e.name])

    from tunelab.evaluate.verdict import make_verdict

    systems = [e.system_result(seed=seed) for e in evals]
    forgetting_summary = per_system = None
    if measure_forgetting and "base" in general:
        after = {f.name: general[f.name] for f in finetuned if f.name in general}
        forgetting_summary = summarize_forgetting(general["base"], after, seed=seed)
        # one verdict weighs the task gain against each run's own forgetting
        per_system = {name: forgetting_items(None, general["base"], ability, seed=seed)
                      for name, ability in after.items()}
        if general["base"].ppl_docs is None:
            notes.append("pydoc_data is missing from this Python: general-text perplexity "
                         "was skipped")
    verdict = make_verdict(systems, min_gain=min_gain, seed=seed, forgetting=per_system)
    overfit, curves = _curves(finetuned)

    table = format_table(evals, seed=seed)
    report = build_report(
        evals, systems, verdict, forgetting_summary, general, curves, overfit,
        settings=settings, base_spec=base_spec, device=device, instruction=instruction,
        system=system, styles=styles, finetuned=finetuned, title=title,
        description=description, data_label=data_label, shots_label=shots_label, seed=seed)
    out.mkdir(parents=True, exist_ok=True)
    for e in evals:
        write_jsonl(out / "outputs" / f"{slug(e.name)}.jsonl", e.outputs)
        if e.preference is not None:
            write_jsonl(out / "outputs" / f"{slug(e.name)}.pairs.jsonl", e.preference.rows())
    from tunelab.report.html import write_report

    html_path, json_path = write_report(out, report)
    return CompareResult(evals, systems, verdict, forgetting_summary, general, overfit,
                         report, html_path, json_path, table,
                         time.perf_counter() - start, notes)


def _base_bits(source: FinetunedSource) -> int:
    from tunelab.adapters import adapter_meta

    return int(adapter_meta(source.path).get("base_bits", 16))


def _evaluate_finetuned(model: Any, tokenizer: Any, examples: list[EvalExample],
                        ft: FinetunedSystem, settings: EvalSettings, metrics: list[Any],
                        progress: bool, pairs: Sequence[EvalExample] | None = None
                        ) -> EvalResult:
    style = PromptStyle(ft.name, "finetuned")  # prompted exactly as in training
    result = evaluate_system(model, tokenizer, examples, style, settings, metrics=metrics,
                             progress=progress, pairs=pairs)
    summary = ft.source.summary
    result.train_time_s = summary.get("train_seconds")
    result.peak_memory_bytes = summary.get("peak_memory_bytes")
    result.style["weights"] = str(ft.source.path)
    result.style["method"] = ft.source.method
    return result


def _curves(finetuned: Sequence[FinetunedSystem]
            ) -> tuple[dict[str, OverfitFlag], dict[str, Any] | None]:
    """Overfitting flags of every fine-tuned run with a metrics.jsonl; the curves of the
    first one go to the report's loss-curve section."""
    from tunelab.report.run import curves_section

    flags: dict[str, OverfitFlag] = {}
    first = None
    for ft in finetuned:
        section = curves_section(ft.source.metrics_records())
        if section is None:
            continue
        flags[ft.name] = section["overfit"]
        if first is None:
            first = {**section, "run": ft.name}
    return flags, first


# ------------------------------------------------------------------------------ output


def _fmt_latency(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return f"{seconds * 1000:.0f} ms" if seconds < 1 else f"{seconds:.2f} s"


def format_table(evals: Sequence[EvalResult], *, seed: int = 0) -> str:
    """The comparison as a plain-text table for the terminal."""
    if not evals:
        return "(no systems)"
    headline = evals[0].headline
    extra = [m for m in evals[0].metrics[1:3]]
    has_loss = any(e.loss is not None for e in evals)
    has_pairs = any(e.preference is not None for e in evals)
    headers = ["system", "kind", f"{headline} [95% CI]", *extra]
    if has_loss:
        headers.append("ref ppl")
    if has_pairs:
        headers += ["pref acc [95% CI]", "reward margin [95% CI]"]
    headers += ["prompt tok/req", "latency/req", "train time", "peak memory"]
    kinds = {"zero_shot": "zero-shot", "few_shot": "few-shot", "finetuned": "fine-tuned"}
    rows = []
    for e in evals:
        iv = e.interval(seed=seed)
        row = [e.name, kinds.get(e.kind, e.kind), f"{iv.estimate:.2f} [{iv.low:.2f}, "
               f"{iv.high:.2f}]", *(f"{e.mean(m):.2f}" for m in extra)]
        if has_loss:
            row.append(f"{e.perplexity:.2f}" if e.perplexity is not None else "-")
        if has_pairs:
            row += _preference_cells(e, seed)
        row += [f"{e.prompt_tokens:.0f}", _fmt_latency(e.latency_s),
                format_duration(e.train_time_s) if e.train_time_s is not None else "-",
                format_bytes(e.peak_memory_bytes) if e.peak_memory_bytes is not None else "-"]
        rows.append(row)
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    left = {0, 1}

    def line(cells: Sequence[str]) -> str:
        return "  ".join(c.ljust(w) if i in left else c.rjust(w)
                         for i, (c, w) in enumerate(zip(cells, widths, strict=True))).rstrip()

    sep = "  ".join("-" * w for w in widths)
    return "\n".join([line(headers), sep, *(line(r) for r in rows)])


def _preference_cells(e: EvalResult, seed: int) -> list[str]:
    if e.preference is None:
        return ["-", "-"]
    summary = e.preference.summary(seed=seed)
    acc, margin = summary["preference_accuracy"], summary["reward_margin"]
    star = "" if summary["reference"] else "*"  # no reference: beta * log-prob difference
    return [f"{acc['mean']:.2f} [{acc['ci_low']:.2f}, {acc['ci_high']:.2f}]",
            f"{margin['mean']:.2f} [{margin['ci_low']:.2f}, {margin['ci_high']:.2f}]{star}"]


def _example_rows(evals: Sequence[EvalResult], limit: int = 200) -> list[dict[str, Any]]:
    if not evals:
        return []
    metric = evals[0].headline
    rows = []
    for i, first in enumerate(evals[0].outputs[:limit]):
        row: dict[str, Any] = {"id": first["id"], "input": first["input"],
                               "reference": first["reference"]}
        for e in evals:
            o = e.outputs[i]
            row[e.name] = f"[{o['scores'][metric]:.2f}] {o['prediction']}"
        rows.append(row)
    return rows


def build_report(evals: Sequence[EvalResult], systems: Sequence[SystemResult],
                 verdict: Verdict, forgetting: Any | None,
                 general: dict[str, GeneralAbility], curves: dict[str, Any] | None,
                 overfit: dict[str, OverfitFlag], *, settings: EvalSettings, base_spec: str,
                 device: str, instruction: str | None, system: str | None,
                 styles: Sequence[PromptStyle], finetuned: Sequence[FinetunedSystem],
                 title: str | None = None, description: str | None = None,
                 data_label: str | None = None, shots_label: str | None = None,
                 seed: int = 0) -> dict[str, Any]:
    """The compare report dict (schema in :mod:`tunelab.report.html`)."""
    from tunelab.report.html import collect_environment
    from tunelab.report.run import model_licence

    n = len(evals[0].example_ids) if evals else 0
    headline = evals[0].headline if evals else None
    metric_table: dict[str, dict[str, Any]] = {}
    for e in evals:
        row: dict[str, Any] = {m: e.mean(m) for m in e.metrics}
        if e.loss is not None:
            row["reference loss"] = e.loss
            row["reference perplexity"] = e.perplexity
        row.update(preference_columns(e))
        metric_table[e.name] = row
    text = [f"{n} held-out examples" + (f" from {data_label}" if data_label else "")
            + f", base model {base_spec}; the headline metric is {headline}."]
    if instruction:
        text.append(f"Prompting rows get the instruction {instruction!r}.")
    if any(s.kind == "few_shot" for s in styles):
        text.append("Few-shot rows show solved examples"
                    + (f" from {shots_label}" if shots_label else " from the training data")
                    + " as prior user/assistant turns.")
    text.append(f"Latency is generation time per request at batch size {settings.batch_size} "
                f"on {device}; fine-tuned rows are prompted exactly as in training (LoRA "
                "adapters on a 16-bit base merged into the weights, as tunelab merge "
                "deploys them).")
    prefs = {e.name: e.preference.summary(seed=seed) for e in evals if e.preference is not None}
    if prefs:
        beta = next(iter(prefs.values()))["beta"]
        text.append(f"Preference accuracy is the share of pairs where the row's model gives the "
                    f"chosen answer a higher log-probability than the rejected one; the reward "
                    f"margin is beta ({beta}) times the difference of the two answers' log-prob "
                    "gains over the base with the adapter off (rows without an adapter: over "
                    "no reference, beta times the log-prob difference).")
    if curves is not None:
        text.append(f"Loss curves are those of {curves['run']}.")
    if description:
        text.insert(0, description)
    report: dict[str, Any] = {
        "title": title or "Prompt engineering or fine-tuning?",
        "summary": " ".join(text),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "verdict": verdict,
        "metric": headline,
        "systems": list(systems),
        "metric_table": metric_table,
    }
    fields = {e.name: e.field_scores for e in evals if e.field_scores}
    if fields:
        report["field_scores"] = fields
    if prefs:
        report["preference"] = prefs
    if curves is not None:
        report["curves"] = {"records": curves["records"], "overfit": curves["overfit"]}
    if forgetting is not None:
        report["forgetting"] = forgetting
    report["examples"] = _example_rows(evals)
    report["config"] = {
        "model": base_spec, "n_examples": n, "data": data_label, "shots_from": shots_label,
        "metrics": evals[0].metrics if evals else [], "instruction": instruction,
        "system": system,
        "generation": {"batch_size": settings.batch_size,
                       "max_new_tokens": settings.max_new_tokens,
                       "temperature": settings.temperature, "top_p": settings.top_p,
                       "seed": settings.seed, "stop": list(settings.stop)},
        "few_shot": {s.name: [shot.id for shot in s.shots] for s in styles if s.shots},
        "fine_tuned": {f.name: str(f.source.path) for f in finetuned},
        "forgetting_reference": GENERAL_TEXT_SOURCE if general else None,
        "probe_tasks": [str(t) for t in _probe_tasks(general)],
    }
    report["environment"] = collect_environment(device=device)
    lic = model_licence(base_spec)
    if lic:
        report["licence"] = [lic]
    # report.json only (the HTML shows the sections above):
    report["results"] = [e.summary(seed=seed) for e in evals]
    if general:
        report["general_ability"] = {k: v.to_dict(seed=seed) for k, v in general.items()}
    if overfit:
        report["overfitting"] = {k: v.to_dict() for k, v in overfit.items()}
    return report


def _probe_tasks(general: dict[str, GeneralAbility]) -> list[str]:
    first = next(iter(general.values()), None)
    return [r.task for r in first.probes] if first is not None else []


def print_result(result: CompareResult, *, file: Any = None) -> None:
    """The terminal summary: table, verdict, forgetting, overfitting, where the report is."""
    import sys
    import textwrap

    file = file or sys.stdout

    def para(label: str, text: str) -> None:
        print(textwrap.fill(text, width=100, initial_indent=f"{label}: ",
                            subsequent_indent=" " * (len(label) + 2)), file=file)

    print("", file=file)
    print(result.table, file=file)
    if any(e.preference is not None and not e.preference.reference for e in result.evals):
        print("* no reference model (no adapter): beta * (log p(chosen) - log p(rejected))",
              file=file)
    print("", file=file)
    para("verdict", result.verdict.text)
    if result.forgetting is not None:
        para("forgetting", result.forgetting.text)
    for name, flag in result.overfit.items():
        para(f"curves ({name})", flag.message)
    for note in result.notes:
        para("note", note)
    print(f"\nreport: {result.html_path}", file=file)
    print(f"outputs: {result.html_path.parent / 'outputs'}/*.jsonl", file=file)
