"""The general-ability probe: multiple-choice items scored by log-likelihood, through
lm-evaluation-harness when it is installed, else by tunelab's own scorer.

**The items.** ``assets/probe/general_probe.jsonl`` holds 252 four-way multiple-choice
questions in five skills (facts, language, arithmetic, reasoning, code reading), written for
tunelab under CC0 (``scripts/build_probe.py`` builds the file, ``assets/probe/LICENSE.md``).
None is about countries, capitals, currencies or populations, which the quickstart trains on.

**The score.** Item ``i`` with context ``c_i`` (``"Question: {question}\\nAnswer:"``) and
choices ``a_ij`` is answered by ``argmax_j log p(" " + a_ij | c_i)``, the sum of the choice's
token log-probabilities (the harness's ``acc``; first maximum on ties); its score is 1 if
that is the gold choice, else 0. Accuracy is the mean, with a percentile-bootstrap interval
(:func:`tunelab.evaluate.stats.bootstrap_mean_ci`); the per-item scores feed the paired
before/after interval of the forgetting check.

**Two paths, the same numbers.** With ``lm_eval`` installed (``pip install 'tunelab[eval]'``)
every probe task, tunelab's own (``assets/probe/tunelab_general_probe.yaml``) and any
harness task YAML a user has locally, runs through the harness on the model already in
memory (``HFLM(pretrained=model, tokenizer=tokenizer)``: no second load, adapter included).
Without it, tunelab's own probe is scored by :func:`score_choices`, which tokenises exactly
as the harness does (context and continuation encoded together and split at the context's
length, the context's trailing spaces moved to the continuation); other tasks then need the
harness and fail with a one-line error.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tunelab.errors import ConfigError, DataError
from tunelab.evaluate.stats import Interval, bootstrap_mean_ci

log = logging.getLogger(__name__)

PROBE_DIR = Path(__file__).resolve().parents[1] / "assets" / "probe"
PROBE_FILE = PROBE_DIR / "general_probe.jsonl"
PROBE_TASK = PROBE_DIR / "tunelab_general_probe.yaml"
PROBE_NAME = "tunelab_general_probe"
# The YAML's doc_to_text and target_delimiter, for the scorer that runs without the harness.
PROMPT = "Question: {question}\nAnswer:"
TARGET_DELIMITER = " "
SKILLS = ("facts", "language", "arithmetic", "reasoning", "code")


@dataclass(frozen=True)
class ProbeItem:
    id: str
    skill: str
    question: str
    choices: tuple[str, ...]
    answer: int

    def context(self) -> str:
        return PROMPT.format(question=self.question)


def load_probe(path: str | Path = PROBE_FILE) -> list[ProbeItem]:
    """The probe items of ``path`` (tunelab's probe format), in file order."""
    items = []
    for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            row = json.loads(line)
            items.append(ProbeItem(row["id"], row["skill"], row["question"],
                                   tuple(row["choices"]), int(row["answer"])))
            if not 0 <= items[-1].answer < len(items[-1].choices):
                raise DataError(f"answer {row['answer']} is not an index into its "
                                f"{len(row['choices'])} choices", path=str(path), line=n,
                                field="answer")
    return items


@dataclass
class ProbeResult:
    """One probe task on one model: per-item 0/1 ``scores`` in document order, the chosen
    index and every choice's log-likelihood (empty for non-multiple-choice tasks), and which
    path scored it (``lm-eval`` or ``tunelab``)."""

    task: str
    scores: list[float]
    backend: str
    ids: list[str] = field(default_factory=list)
    skills: list[str] = field(default_factory=list)
    picks: list[int] = field(default_factory=list)
    loglikelihoods: list[list[float]] = field(default_factory=list)
    metric: str = "acc"

    @property
    def accuracy(self) -> float:
        return sum(self.scores) / len(self.scores)

    def interval(self, *, seed: int = 0) -> Interval:
        """Mean score with its percentile-bootstrap interval over items."""
        return bootstrap_mean_ci(self.scores, seed=seed)

    def by_skill(self) -> dict[str, float]:
        out: dict[str, list[float]] = {}
        for skill, s in zip(self.skills, self.scores, strict=False):
            out.setdefault(skill, []).append(s)
        return {k: sum(v) / len(v) for k, v in out.items()}

    def to_dict(self, *, seed: int = 0) -> dict[str, Any]:
        iv = self.interval(seed=seed)
        return {"task": self.task, "metric": self.metric, "backend": self.backend,
                "n": len(self.scores), "accuracy": iv.estimate, "ci_low": iv.low,
                "ci_high": iv.high, "by_skill": self.by_skill(),
                "items": [{"id": i, "skill": k, "pick": p, "score": s} for i, k, p, s in
                          zip(self.ids, self.skills or [""] * len(self.ids),
                              self.picks or [-1] * len(self.ids), self.scores, strict=False)]}


def harness_available() -> bool:
    return importlib.util.find_spec("lm_eval") is not None


# ------------------------------------------------------------------ tunelab's own scorer


def encode_pair(tokenizer: Any, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Context and continuation token ids, split as lm-evaluation-harness splits them for a
    causal model: trailing spaces of the context move to the continuation, the whole string
    is encoded once and cut at the length of the encoded context."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    whole = tokenizer.encode(context + continuation)
    ctx = tokenizer.encode(context)
    return ctx, whole[len(ctx):]


def score_choices(model: Any, tokenizer: Any, items: Sequence[ProbeItem], *,
                  batch_size: int = 16, progress: bool = False, desc: str = "probe",
                  task: str = PROBE_NAME) -> ProbeResult:
    """tunelab's scorer: ``pick_i = argmax_j sum_t log p(a_ijt | c_i, a_ij<t)`` (module
    docstring), the log-likelihoods from :func:`tunelab.evaluate.run.examples_nll`."""
    from tunelab import data
    from tunelab.evaluate.run import examples_nll

    examples, owner = [], []
    max_len = _max_length(model)
    for i, item in enumerate(items):
        for choice in item.choices:
            ctx, cont = encode_pair(tokenizer, item.context(), TARGET_DELIMITER + choice)
            ids = (ctx + cont)[-(max_len + 1):]  # the harness's left truncation
            labels = [data.IGNORE_INDEX] * (len(ids) - len(cont)) + ids[len(ids) - len(cont):]
            examples.append(data.Example(ids, labels))
            owner.append(i)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    nll = examples_nll(model, examples, pad_id=pad, batch_size=batch_size, progress=progress,
                       desc=desc)
    lls: list[list[float]] = [[] for _ in items]
    for i, (value, _) in zip(owner, nll, strict=True):
        lls[i].append(-value)
    picks = [max(range(len(row)), key=row.__getitem__) for row in lls]
    return ProbeResult(task, [float(p == it.answer) for p, it in zip(picks, items, strict=True)],
                       "tunelab", [it.id for it in items], [it.skill for it in items], picks,
                       lls)


def _max_length(model: Any) -> int:
    config = getattr(model, "config", None)
    for name in ("n_positions", "max_position_embeddings", "n_ctx"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return 2048


# ------------------------------------------------------------------ lm-evaluation-harness


def harness_task_config(spec: str | Path) -> dict[str, Any] | str:
    """A task YAML file as the harness's config dict, with relative ``data_files`` resolved
    against the YAML's folder (so a task and its data travel together); anything that is not
    a file is passed on as a registered harness task name."""
    path = Path(spec)
    if path.suffix not in (".yaml", ".yml"):
        if path.exists():
            raise ConfigError(f"probe task {spec}: expected an lm-evaluation-harness task "
                              "YAML (.yaml), or a registered harness task name")
        return str(spec)
    if not path.is_file():
        raise ConfigError(f"probe task {spec}: no such file; give the path of a harness task "
                          "YAML (or a registered harness task name)")
    from lm_eval.tasks._yaml_loader import load_yaml

    config = load_yaml(path)
    if "task" not in config:
        raise ConfigError(f"probe task {spec}: the YAML has no 'task:' name (group files are "
                          "not supported; list their tasks one by one)")
    kwargs = config.get("dataset_kwargs") or {}
    files = kwargs.get("data_files")
    if files is not None:
        kwargs["data_files"] = _resolve_files(files, path.parent)
        config["dataset_kwargs"] = kwargs
    return config


def _resolve_files(files: Any, base: Path) -> Any:
    if isinstance(files, str):
        return files if "://" in files else str((base / files).resolve())
    if isinstance(files, list):
        return [_resolve_files(f, base) for f in files]
    if isinstance(files, dict):
        return {k: _resolve_files(v, base) for k, v in files.items()}
    return files


def _sample_score(sample: dict[str, Any]) -> tuple[str, float]:
    names = sample.get("metrics") or []
    metric = "acc" if "acc" in sample else next(n for n in names if n in sample)
    return metric, float(sample[metric])


def _harness_result(task: str, samples: Sequence[dict[str, Any]]) -> ProbeResult:
    samples = sorted(samples, key=lambda s: s["doc_id"])
    metric = _sample_score(samples[0])[0] if samples else "acc"
    result = ProbeResult(task, [_sample_score(s)[1] for s in samples], "lm-eval", metric=metric)
    for s in samples:
        doc = s.get("doc") or {}
        result.ids.append(str(doc.get("id", s["doc_id"])))
        if "skill" in doc:
            result.skills.append(str(doc["skill"]))
        resps = s.get("filtered_resps") or []
        if resps and all(isinstance(r, (list, tuple)) and len(r) == 2 for r in resps):
            lls = [float(r[0]) for r in resps]  # multiple choice: (loglikelihood, is_greedy)
            result.loglikelihoods.append(lls)
            result.picks.append(max(range(len(lls)), key=lls.__getitem__))
    return result


def run_harness(model: Any, tokenizer: Any, specs: Sequence[str | Path], *,
                batch_size: int = 16, seed: int = 0) -> list[ProbeResult]:
    """Every task of ``specs`` through lm-evaluation-harness on ``model`` as loaded (no
    second load: ``HFLM(pretrained=model)``), zero-shot, per-item scores kept."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    configs = [harness_task_config(s) for s in specs]
    names = [c["task"] if isinstance(c, dict) else c for c in configs]
    was_training = model.training
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    # Built-in task names need the harness's own index (a scan of its task folders);
    # local YAML files do not.
    manager = TaskManager(include_defaults=any(isinstance(c, str) for c in configs))
    try:
        # Zero-shot log-likelihoods draw no random numbers; the process-wide seeds are left
        # as they are (None) rather than reset behind the caller's back.
        out = simple_evaluate(model=lm, tasks=configs, task_manager=manager, log_samples=True,
                              bootstrap_iters=0, random_seed=None, numpy_random_seed=None,
                              torch_random_seed=None, fewshot_random_seed=seed)
    finally:
        model.train(was_training)
    samples = (out or {}).get("samples", {})
    missing = [n for n in names if n not in samples]
    if missing:
        raise ConfigError(f"probe task {missing[0]}: lm-evaluation-harness returned no "
                          "per-item results (a group, or a task with no test split?)")
    return [_harness_result(n, samples[n]) for n in names]


def check_probe_tasks(tasks: Sequence[str | Path]) -> None:
    """Fail before any model is loaded: extra tasks need the harness, YAML paths must exist
    and name a task."""
    if tasks and not harness_available():
        raise ConfigError(f"probe task {tasks[0]} needs lm-evaluation-harness: pip install "
                          "'tunelab[eval]' (or leave out the extra probe tasks)")
    for spec in tasks:
        harness_task_config(spec)


@functools.cache
def _say_fallback() -> None:
    """Once per process, not once per model measured."""
    log.warning("lm-evaluation-harness is not installed: scoring the general probe with "
                "tunelab's own multiple-choice scorer (same items, same numbers)")


def run_probes(model: Any, tokenizer: Any, tasks: Sequence[str | Path] | None = None, *,
               batch_size: int = 16, progress: bool = False, desc: str = "probe",
               seed: int = 0) -> list[ProbeResult]:
    """tunelab's probe and every task in ``tasks`` (harness YAML paths or registered names)
    on one model; through the harness when it is installed (module docstring)."""
    specs: list[str | Path] = [PROBE_TASK, *(tasks or [])]
    if harness_available():
        return run_harness(model, tokenizer, specs, batch_size=batch_size, seed=seed)
    check_probe_tasks(tasks or [])
    _say_fallback()
    return [score_choices(model, tokenizer, load_probe(), batch_size=batch_size,
                          progress=progress, desc=desc)]
