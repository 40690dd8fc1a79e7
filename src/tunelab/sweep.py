"""``tunelab sweep``: a small grid of ordinary runs, each scored on the task and on forgetting.

    tunelab sweep examples/sweep.yaml lr=1e-4,3e-4,1e-3 replay_ratio=0,0.2

Every axis is a config key with comma-separated values; the grid is their product, in the
order given. Each point is an ordinary run directory, ``OUT/<key>=<value>_...``, trained by
``tunelab train CONFIG key=value ... --out DIR --resume`` in its own process (``--nproc N``
passes through to torchrun): a point whose ``summary.json`` exists is not trained again, an
interrupted one resumes from its last checkpoint, so re-running the sweep finishes it.

Scoring is ``tunelab compare`` over all points at once (the same held-out examples for every
run: ``--data FILE``, else the first run's validation split), with prompting rows and the
before/after general-ability check, so each run gets its task score with an interval and its
forgetting with paired intervals, and the weighed verdict (:mod:`tunelab.evaluate.weigh`).

The **frontier**: each run is a point (general-ability change, task score), where the
general-ability change is the probe accuracy after minus before (or, without a probe, minus
the relative rise of general-text perplexity). A run is on the frontier when no other run is
at least as good on both and better on one. The **recommended run** is the best-scoring run
that forgot nothing beyond its interval; when every run forgot, the frontier run with the
best task score, named as a trade-off.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunelab.errors import ConfigError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GridPoint:
    """One run of the grid: its config overrides and the name of its run directory."""

    overrides: tuple[tuple[str, str], ...]

    @property
    def name(self) -> str:
        return "_".join(f"{k}={v}" for k, v in self.overrides) or "default"


def parse_axes(specs: list[str]) -> list[tuple[str, list[str]]]:
    """``["lr=1e-4,3e-4", "replay_ratio=0,0.2"]`` -> ``[("lr", [...]), ...]``."""
    from tunelab.config import TrainConfig

    known = set(TrainConfig.__dataclass_fields__)
    axes: list[tuple[str, list[str]]] = []
    for spec in specs:
        key, sep, values = spec.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key or not values.strip():
            raise ConfigError(f"sweep axis '{spec}': write KEY=V1,V2 (e.g. lr=1e-4,3e-4)")
        if key not in known:
            raise ConfigError(f"sweep axis '{spec}': '{key}' is not a config key (see the "
                              "README's config reference)")
        if key in ("out", "resume"):
            raise ConfigError(f"sweep axis '{key}': the sweep sets it for every run")
        if any(k == key for k, _ in axes):
            raise ConfigError(f"sweep axis '{key}' is given twice")
        vals = [v.strip() for v in values.split(",")]
        if any(not v for v in vals) or len(set(vals)) != len(vals):
            raise ConfigError(f"sweep axis '{spec}': empty or repeated value")
        axes.append((key, vals))
    if not axes:
        raise ConfigError("tunelab sweep needs at least one axis, e.g. lr=1e-4,3e-4")
    return axes


def grid(axes: list[tuple[str, list[str]]]) -> list[GridPoint]:
    keys = [k for k, _ in axes]
    return [GridPoint(tuple(zip(keys, combo, strict=True)))
            for combo in itertools.product(*(vals for _, vals in axes))]


def check_config(config: Path, points: list[GridPoint]) -> None:
    """Every point's config validates before anything trains (one bad value fails fast)."""
    from tunelab.cli import _config_file
    from tunelab.config import build_config, parse_overrides

    base = _config_file(str(config))  # as `tunelab train CONFIG` reads it
    for point in points:
        overrides = parse_overrides([f"{k}={v}" for k, v in point.overrides])
        build_config({**base, **overrides}, source=f"{config} with {point.name}")


def train_point(config: Path, point: GridPoint, run_dir: Path, nproc: int = 1,
                progress: bool = True) -> Path:
    """Train (or finish) one point in its own process; returns its run directory."""
    if (run_dir / "summary.json").is_file():
        log.info("sweep: %s is finished, not trained again", run_dir)
        return run_dir
    cmd = [sys.executable, "-m", "tunelab", "train", str(config),
           *(f"{k}={v}" for k, v in point.overrides), "--out", str(run_dir), "--resume"]
    if nproc > 1:
        cmd += ["--nproc", str(nproc)]
    if not progress:
        cmd.append("--no-progress")
    log.info("sweep: training %s", point.name)
    proc = subprocess.run(cmd)
    if proc.returncode != 0:
        raise ConfigError(f"sweep: the run {point.name} failed (exit {proc.returncode}); fix "
                          f"it and run the same sweep again: finished runs are kept and "
                          f"{run_dir} resumes")
    return run_dir


def general_change(ability: dict[str, Any], base: dict[str, Any]) -> float | None:
    """Probe accuracy after - before; without a probe, -(relative perplexity rise)."""
    if ability.get("probe_accuracy") is not None and base.get("probe_accuracy") is not None:
        return float(ability["probe_accuracy"] - base["probe_accuracy"])
    if ability.get("perplexity") and base.get("perplexity"):
        return -float(ability["perplexity"] / base["perplexity"] - 1)
    return None


def frontier(points: dict[str, tuple[float, float]]) -> list[str]:
    """Names of the Pareto-optimal points of ``{name: (general change, task score)}``."""
    def dominated(a: tuple[float, float]) -> bool:
        return any(b[0] >= a[0] and b[1] >= a[1] and b != a for b in points.values())

    return sorted((n for n, p in points.items() if not dominated(p)),
                  key=lambda n: points[n][0])


def recommend(scores: dict[str, float], forgot: set[str], on_frontier: list[str]
              ) -> tuple[str | None, str]:
    """The recommended run and why (module docstring)."""
    kept = {n: s for n, s in scores.items() if n not in forgot}
    if kept:
        best = max(kept, key=kept.get)
        return best, (f"{best}: the best task score ({kept[best]:.3f}) of the runs that "
                      "forgot nothing beyond its interval")
    if on_frontier:
        best = max(on_frontier, key=lambda n: scores[n])
        return best, (f"{best}: every run forgot beyond its interval; this frontier run has "
                      f"the best task score ({scores[best]:.3f}): a trade-off, not a plain win")
    return None, "no run could be scored"


def summarise(result: Any, names: dict[str, Path]) -> dict[str, Any]:
    """Per run: task score with interval, general ability, forgetting flag; the frontier
    and the recommended run, from a :class:`~tunelab.evaluate.compare.CompareResult`."""
    systems = {s.name: s for s in result.systems}
    general = {k: v.to_dict() for k, v in result.general.items()}
    base = general.get("base", {})
    forgot = set(result.verdict.forgot)
    runs, points, scores = [], {}, {}
    for name, run_dir in names.items():
        s = systems.get(name)
        if s is None:
            continue
        change = general_change(general[name], base) if name in general else None
        scores[name] = s.score
        if change is not None:
            points[name] = (change, s.score)
        runs.append({"name": name, "run_dir": str(run_dir), "score": s.score,
                     "ci": [s.ci_low, s.ci_high], "general_change": change,
                     "probe_accuracy": general.get(name, {}).get("probe_accuracy"),
                     "perplexity": general.get(name, {}).get("perplexity"),
                     "forgot": name in forgot})
    on_frontier = frontier(points)
    best, why = recommend(scores, forgot, on_frontier)
    prompts = [s for s in result.systems if s.name not in names]
    return {"runs": runs, "frontier": on_frontier, "recommended": best, "why": why,
            "base": {"probe_accuracy": base.get("probe_accuracy"),
                     "perplexity": base.get("perplexity")},
            "best_prompt": max(prompts, key=lambda s: s.score).name if prompts else None,
            "verdict": result.verdict.text}


def frontier_svg(summary: dict[str, Any]) -> str:
    """Task score against general-ability change, one labelled point per run, the frontier
    joined by a line."""
    from tunelab.report.svg import scatter_chart

    pts = {r["name"]: (r["general_change"], r["score"]) for r in summary["runs"]
           if r["general_change"] is not None}
    line = [pts[n] for n in summary["frontier"] if n in pts]
    return scatter_chart(pts, line=line, highlight=summary["recommended"],
                         title="Task score against general ability (sweep frontier)",
                         x_label="general ability change (probe accuracy after - before)",
                         y_label="task score")


def write_report(out: Path, summary: dict[str, Any]) -> Path:
    """``sweep.json`` and ``sweep.html`` (table, frontier plot, recommendation), atomically."""
    from html import escape

    out.mkdir(parents=True, exist_ok=True)
    _write_atomic(out / "sweep.json", json.dumps(summary, indent=2) + "\n")
    best = summary["recommended"]
    rows = "".join(
        f"<tr><td>{escape(r['name'])}{' (recommended)' if r['name'] == best else ''}</td>"
        f"<td>{r['score']:.3f}</td><td>{_ci(r['ci'])}</td>"
        f"<td>{_num(r['probe_accuracy'])}</td><td>{_num(r['perplexity'], 2)}</td>"
        f"<td>{'yes' if r['forgot'] else 'no'}</td>"
        f"<td>{'yes' if r['name'] in summary['frontier'] else ''}</td></tr>"
        for r in summary["runs"])
    html = (f"<!doctype html><meta charset='utf-8'><title>tunelab sweep</title>"
            f"<h1>Sweep</h1><p><b>Recommended:</b> {escape(summary['why'])}</p>"
            f"<p>{escape(summary['verdict'])}</p>{frontier_svg(summary)}"
            "<table><tr><th>run</th><th>task score</th><th>95% CI</th><th>probe accuracy</th>"
            "<th>general-text perplexity</th><th>forgot</th><th>frontier</th></tr>"
            f"{rows}</table><p>Base model: probe accuracy "
            f"{_num(summary['base']['probe_accuracy'])}, perplexity "
            f"{_num(summary['base']['perplexity'], 2)}. The full comparison: "
            "<a href='compare/report.html'>compare/report.html</a>.</p>")
    return _write_atomic(out / "sweep.html", html)


def _write_atomic(path: Path, text: str) -> Path:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)
    return path


def _num(v: float | None, digits: int = 3) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def _ci(ci: list[float | None]) -> str:
    return "-" if None in ci else f"[{ci[0]:.3f}, {ci[1]:.3f}]"


def run_sweep(args: argparse.Namespace) -> dict[str, Any]:
    from tunelab.evaluate import cli as evaluate_cli
    from tunelab.evaluate.compare import finetuned_system, run_compare
    from tunelab.evaluate.run import resolve_finetuned

    config, out = Path(args.config), Path(args.out)
    points = grid(parse_axes(args.axes))
    check_config(config, points)
    if args.nproc < 1:
        raise ConfigError(f"--nproc must be at least 1, got {args.nproc}")
    names = {}
    for i, point in enumerate(points, 1):
        log.info("sweep: run %d of %d: %s", i, len(points), point.name)
        names[point.name] = train_point(config, point, out / point.name, args.nproc,
                                        progress=not args.no_progress)
    finetuned = [finetuned_system(resolve_finetuned(d), name) for name, d in names.items()]
    examples, label, (pool, pool_label) = evaluate_cli._examples(args, list(names.values()))
    result = run_compare(
        examples, settings=evaluate_cli._settings(args), out=out / "compare",
        model_spec=args.model, shots_pool=pool, zero_shot=True, few_shot=args.few_shot,
        instruction=args.instruction, system=args.system, finetuned=finetuned,
        forgetting=True, options=evaluate_cli._options(args), progress=not args.no_progress,
        shot_seed=args.seed, seed=args.seed, data_label=label, shots_label=pool_label,
        title="Sweep")
    summary = summarise(result, names)
    summary["grid"] = [dict(p.overrides) for p in points]
    write_report(out, summary)
    return summary


def add_parser(subparsers: Any) -> None:
    from tunelab.evaluate import cli as evaluate_cli

    p = subparsers.add_parser(
        "sweep", help="train a small grid of runs and score each on task and forgetting",
        description=__doc__.split("\n\n")[0],
        epilog="example:\n  tunelab sweep examples/sweep.yaml lr=1e-4,3e-4,1e-3 "
               "replay_ratio=0,0.2 --out runs/sweep",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", help="the run's config file (YAML/JSON)")
    p.add_argument("axes", nargs="+", metavar="KEY=V1,V2", help="a config key and its values")
    p.add_argument("--nproc", type=int, default=1, help="processes per run (torchrun)")
    p.add_argument("--few-shot", action="append", type=int, default=[], metavar="K",
                   help="also compare K-shot prompting (repeatable)")
    evaluate_cli._add_common(p, out="runs/sweep")
    p.set_defaults(func=cmd_sweep)


def cmd_sweep(args: argparse.Namespace) -> int:
    summary = run_sweep(args)
    for r in summary["runs"]:
        flag = "  forgot" if r["forgot"] else ""
        mark = "  <- recommended" if r["name"] == summary["recommended"] else ""
        front = "  frontier" if r["name"] in summary["frontier"] else ""
        change = "-" if r["general_change"] is None else f"{r['general_change']:+.3f}"
        print(f"{r['name']:40} task {r['score']:.3f} {_ci(r['ci']):18} general {change}"
              f"{flag}{front}{mark}")
    print(f"recommended: {summary['why']}")
    print(f"report: {Path(args.out) / 'sweep.html'}")
    return 0
