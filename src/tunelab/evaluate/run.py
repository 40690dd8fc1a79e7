"""Evaluate one model on a held-out set: prompts, batched generation, scores, outputs.

An **evaluation example** is a data record split into what the model is shown and what it
should answer. Any tunelab data format works: the reference is the ``completion``
(prompt/completion), the ``output`` (instruction) or the last assistant turn (chat); the
prompt is every message before it, rendered with the same chat template as training
(:func:`tunelab.generate.build_prompt`). Plain ``text`` records have no reference and are
rejected.

A **prompt style** decides what goes around the example's own messages:

* zero-shot: optionally an ``instruction`` (prepended to the first user turn) and a system
  message;
* few-shot: ``k`` solved examples from the *training* data placed before the question as
  prior user/assistant turns (the same ``k`` shots for every example, chosen with a seed),
  the instruction prepended to the first of them;
* fine-tuned: the messages exactly as in training (no instruction, no shots).

Generation is batched with left padding (sorted by prompt length so little is padded),
greedy unless a temperature is set (then seeded), and stops at the end-of-turn token or a
stop string. **Latency per request** is the generation wall time divided by the number of
requests, at the batch size used: the cost of a request when serving this batch size.

**Loss / perplexity** of the reference given the prompt: the summed negative
log-likelihood of the reference tokens and the end-of-turn token, per example, so the
perplexity ``exp(sum nll / sum tokens)`` gets a bootstrap interval over examples.

**Preference data** (``prompt``/``chosen``/``rejected`` records, read and validated as preference
training reads them, :mod:`tunelab.preference`) is an evaluation set too: the chosen answer is
the reference of the task metrics, and every system also gets preference accuracy and reward
margin on the pairs, with the system's own prompt (:mod:`tunelab.evaluate.preference`).

Every example's prompt, reference, prediction and scores are written as one JSON line, so a
person can read what the model said.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from tunelab import data
from tunelab.errors import DataError, ModelError
from tunelab.evaluate.metrics import Metric, get_metric
from tunelab.evaluate.stats import bootstrap_mean_ci, corpus_perplexity, perplexity_ci
from tunelab.evaluate.verdict import SystemResult
from tunelab.generate import GenerationSettings, build_prompt, decode_rows

log = logging.getLogger(__name__)

JSON_METRICS = ("json_exact", "json_fields", "json_fields_extract")


# ------------------------------------------------------------------------------ examples


@dataclass
class EvalExample:
    """One held-out example: the conversation before the answer, and the answer."""

    id: str
    messages: list[dict[str, str]]
    reference: str
    record: dict[str, Any]
    where: str = ""
    rejected: str | None = None  # preference data: the answer the model should not prefer

    @property
    def question(self) -> str:
        """The last user turn: what a person reading the outputs wants to see."""
        users = [m["content"] for m in self.messages if m["role"] == "user"]
        return users[-1] if users else ""

    def key(self) -> str:
        return json.dumps([self.messages, self.reference], sort_keys=True)


def examples_from_records(records: Sequence[data.Record], fmt: str = "auto"
                          ) -> list[EvalExample]:
    """Turn data records into evaluation examples (see the module docstring)."""
    if not records:
        raise DataError("no examples to evaluate")
    from tunelab import preference

    if preference.is_preference(records):
        return _pair_examples(records)
    fmt = data.resolve_format(records, fmt)
    if fmt == "text":
        raise DataError("evaluation needs a reference answer per example, but these are plain "
                        "'text' records; use prompt/completion, instruction/output, or chat "
                        "records that end with an assistant turn", path=records[0].path)
    out = []
    for record in records:
        messages = data.to_messages(record, fmt)
        assert messages is not None
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        reference = messages[last]["content"]
        if not reference.strip():
            raise DataError("the reference answer is empty", path=record.path, line=record.line,
                            field=f"messages[{last}].content" if fmt == "chat" else None)
        prompt = messages[:last]
        if not any(m["role"] == "user" for m in prompt):
            raise DataError("no user turn before the reference answer, so there is nothing "
                            "to ask the model", path=record.path, line=record.line)
        out.append(EvalExample(_example_id(record), prompt, reference, dict(record.data),
                               f"{record.path}, line {record.line}"))
    return out


def _example_id(record: data.Record) -> str:
    ident = record.data.get("id")
    return str(ident) if ident is not None else f"{Path(record.path).name}:{record.line}"


def _pair_examples(records: Sequence[data.Record]) -> list[EvalExample]:
    """Preference records: prompt, chosen as the reference, rejected kept beside it. Pairs
    whose answers are identical are dropped and counted, as training drops them."""
    from tunelab import preference

    out, identical = [], 0
    for record in records:
        prompt, chosen, rejected = preference.to_pair(record)
        if chosen["content"] == rejected["content"]:
            identical += 1
            continue
        out.append(EvalExample(_example_id(record), prompt, chosen["content"],
                               dict(record.data), f"{record.path}, line {record.line}",
                               rejected=rejected["content"]))
    if identical:
        log.warning("%d preference record(s) left out: chosen and rejected are the same "
                    "answer", identical)
    if not out:
        raise DataError("no preference pair is left: every record's chosen and rejected "
                        "answers are the same", path=records[0].path)
    return out


def load_eval_examples(path: str | Path, *, fmt: str = "auto", limit: int | None = None
                       ) -> list[EvalExample]:
    """Read a data file as evaluation examples; ``limit`` keeps the first N."""
    records = data.read_records(path)
    if limit is not None:
        if limit < 1:
            raise DataError(f"--limit must be at least 1, got {limit}")
        records = records[:limit]
    return examples_from_records(records, fmt)


# ------------------------------------------------------------------------------ prompts


@dataclass
class PromptStyle:
    """How a system is prompted (module docstring). ``kind`` is the verdict's row kind."""

    name: str
    kind: str = "zero_shot"
    instruction: str | None = None
    system: str | None = None
    shots: list[EvalExample] = field(default_factory=list)

    def messages(self, example: EvalExample) -> list[dict[str, str]]:
        turns: list[dict[str, str]] = []
        for shot in self.shots:
            turns.extend(m for m in shot.messages if m["role"] != "system")
            turns.append({"role": "assistant", "content": shot.reference})
        own = list(example.messages)
        system_msgs = [m for m in own if m["role"] == "system"]
        own = [m for m in own if m["role"] != "system"]
        turns.extend(own)
        if self.instruction:
            first = next(i for i, m in enumerate(turns) if m["role"] == "user")
            turns[first] = {"role": "user",
                            "content": f"{self.instruction.strip()}\n\n{turns[first]['content']}"}
        if self.system:
            system_msgs = [{"role": "system", "content": self.system}]
        return system_msgs + turns

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "instruction": self.instruction,
                "system": self.system, "shots": [s.id for s in self.shots]}


def choose_shots(pool: Sequence[EvalExample], k: int, *, seed: int = 0,
                 exclude: Sequence[EvalExample] = ()) -> list[EvalExample]:
    """``k`` solved examples from ``pool`` (the training data), chosen with ``seed``; any
    pool example identical to one in ``exclude`` (the evaluation set) is never a shot."""
    if k < 1:
        raise DataError(f"few-shot k must be at least 1, got {k} (zero-shot is its own row)")
    banned = {e.key() for e in exclude}
    candidates = [e for e in pool if e.key() not in banned]
    if len(candidates) < k:
        raise DataError(f"few-shot k={k} needs {k} examples in the shots file, but it has "
                        f"{len(candidates)} that are not in the evaluation set")
    order = list(range(len(candidates)))
    random.Random(seed).shuffle(order)
    return [candidates[i] for i in order[:k]]


# ---------------------------------------------------------------------------- generation


def _bar(total: int, desc: str, progress: bool, unit: str = "ex") -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, disable=not progress, dynamic_ncols=True,
                leave=True)


MIN_SHARED_PREFIX = 32  # tokens; below this, reusing the prefix is not worth a forward pass


def _common_prefix_length(seqs: Sequence[Sequence[int]]) -> int:
    if not seqs:
        return 0
    first, n = seqs[0], min(len(s) for s in seqs)
    for i in range(n):
        t = first[i]
        if any(s[i] != t for s in seqs):
            return i
    return n


def _cache_kwarg(model: Any) -> str:
    """The name of the KV-cache argument (``cache`` in newer transformers)."""
    import inspect

    from tunelab.loss import unwrap

    params = inspect.signature(unwrap(model).forward).parameters
    return "cache" if "cache" in params else "past_key_values"


class _SharedPrefix:
    """The KV cache of the token prefix every prompt shares (system message, instruction,
    few-shot examples), computed once and copied into each batch, as serving stacks with
    prefix caching do. Rows are laid out ``[prefix | padding | own tokens]``; positions come
    from the attention mask, so each row sees exactly the positions it would unpadded."""

    def __init__(self, model: Any, prefix: list[int]) -> None:
        from transformers import DynamicCache

        self.model, self.prefix, self.kwarg = model, prefix, _cache_kwarg(model)
        device = next(model.parameters()).device
        ids = torch.tensor([prefix], device=device)
        self.cache = DynamicCache()
        was_training = model.training
        model.eval()
        with torch.no_grad():
            model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True,
                  **{self.kwarg: self.cache})
        model.train(was_training)

    def batch(self, rows: Sequence[Sequence[int]], pad_id: int
              ) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
        import copy

        p = len(self.prefix)
        width = max(len(r) for r in rows) - p
        ids, mask = [], []
        for r in rows:
            own = list(r[p:])
            gap = width - len(own)
            ids.append(self.prefix + [pad_id] * gap + own)
            mask.append([1] * p + [0] * gap + [1] * len(own))
        cache = copy.deepcopy(self.cache)
        cache.batch_repeat_interleave(len(rows))
        return torch.tensor(ids), torch.tensor(mask), {self.kwarg: cache}


@torch.no_grad()
def _generate_ids(model: Any, tokenizer: Any, rows: Sequence[Sequence[int]],
                  settings: GenerationSettings, shared: _SharedPrefix | None
                  ) -> list[dict[str, Any]]:
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    extra: dict[str, Any] = {}
    if shared is not None:
        ids, mask, extra = shared.batch(rows, pad)
    else:  # left padding: every row's last prompt token sits in the same column
        width = max(len(r) for r in rows)
        ids = torch.tensor([[pad] * (width - len(r)) + list(r) for r in rows])
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    kwargs: dict[str, Any] = {"max_new_tokens": settings.max_new_tokens, "pad_token_id": pad,
                              "eos_token_id": tokenizer.eos_token_id}
    if settings.temperature > 0:
        if settings.seed is not None:
            torch.manual_seed(settings.seed)
        kwargs.update(do_sample=True, temperature=settings.temperature, top_p=settings.top_p)
    else:
        kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    if settings.stop:
        kwargs.update(stop_strings=list(settings.stop), tokenizer=tokenizer)
    was_training = model.training
    model.eval()
    try:
        out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                             **kwargs, **extra)
    finally:
        model.train(was_training)
    return decode_rows(tokenizer, out, ids.shape[1], mask, tuple(settings.stop))


def generate_batched(model: Any, tokenizer: Any, prompts: Sequence[str],
                     settings: GenerationSettings, *, batch_size: int = 16,
                     progress: bool = True, desc: str = "generate",
                     reuse_prefix: bool = True) -> list[dict[str, Any]]:
    """Generate for rendered prompts in batches of similar length; results in input order.

    Same contract as :func:`tunelab.generate.generate` (greedy or seeded sampling, stops
    at the end-of-turn token or a stop string), plus ``seconds`` per result: its batch's
    wall time over the batch size. With ``reuse_prefix`` the token prefix shared by all
    prompts (at least :data:`MIN_SHARED_PREFIX` tokens) is computed once (see
    :class:`_SharedPrefix`); the outputs are the same, only faster.
    """
    if batch_size < 1:
        raise DataError(f"batch size must be at least 1, got {batch_size}")
    if not prompts:
        return []
    rows = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    shared = None
    prefix_seconds = 0.0  # spread over all requests: they all share it
    if reuse_prefix:
        # Leave every row at least one token of its own to feed the first generation step.
        n = min(_common_prefix_length(rows), min(len(r) for r in rows) - 1)
        if n >= MIN_SHARED_PREFIX:
            t0 = time.perf_counter()
            shared = _SharedPrefix(model, list(rows[0][:n]))
            prefix_seconds = time.perf_counter() - t0
    order = sorted(range(len(prompts)), key=lambda i: (len(rows[i]), i))
    results: list[dict[str, Any] | None] = [None] * len(prompts)
    bar = _bar(len(prompts), desc, progress)
    try:
        for b, start in enumerate(range(0, len(order), batch_size)):
            idx = order[start:start + batch_size]
            batch_settings = settings
            if settings.temperature > 0:  # seeded sampling, a different seed per batch
                batch_settings = GenerationSettings(**{**settings.__dict__,
                                                       "seed": (settings.seed or 0) + b})
            t0 = time.perf_counter()
            outs = _generate_ids(model, tokenizer, [rows[i] for i in idx], batch_settings,
                                 shared)
            per = (time.perf_counter() - t0) / len(idx) + prefix_seconds / len(prompts)
            for i, o in zip(idx, outs, strict=True):
                results[i] = {**o, "seconds": per}
            bar.update(len(idx))
    finally:
        bar.close()
    return [r for r in results if r is not None]


# ---------------------------------------------------------------------------------- loss


def _backbone_and_head(model: Any) -> tuple[Any, Any]:
    from tunelab.loss import unwrap

    inner = unwrap(model)
    return getattr(inner, inner.base_model_prefix), inner.get_output_embeddings()


@torch.no_grad()
def examples_nll(model: Any, examples: Sequence[data.Example], *, pad_id: int,
                 batch_size: int = 8, progress: bool = False, desc: str = "loss"
                 ) -> list[tuple[float, int]]:
    """Per example ``(sum of target-token NLL in nats, number of target tokens)``.

    Like :class:`tunelab.loss.TargetLoss`, the output layer is applied only at target
    positions, so long prompts cost no ``tokens x vocab`` memory.
    """
    import torch.nn.functional as F

    backbone, head = _backbone_and_head(model)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].input_ids))
    out: list[tuple[float, int]] = [(0.0, 0)] * len(examples)
    bar = _bar(len(examples), desc, progress)
    try:
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            batch = data.collate([examples[i] for i in idx], pad_id)
            batch = {k: v.to(device) for k, v in batch.items()}
            hidden = backbone(input_ids=batch["input_ids"],
                              attention_mask=batch["attention_mask"],
                              use_cache=False).last_hidden_state
            targets = batch["labels"][:, 1:]
            for row, i in enumerate(idx):
                mask = targets[row] != data.IGNORE_INDEX
                n = int(mask.sum())
                if n == 0:
                    out[i] = (0.0, 0)
                    continue
                logits = head(hidden[row, :-1][mask]).float()
                nll = F.cross_entropy(logits, targets[row][mask], reduction="sum")
                out[i] = (float(nll), n)
            bar.update(len(idx))
    finally:
        bar.close()
        model.train(was_training)
    return out


def reference_example(tokenizer: Any, messages: list[dict[str, str]], reference: str,
                      prompt_text: str | None = None) -> data.Example:
    """Token ids of prompt + reference with labels on the reference and its end of turn.

    Prompt and reply are tokenized separately, as generation sees them: the prompt is
    what the model is given, the reply what it would have to produce token by token.
    """
    prompt_text = prompt_text if prompt_text is not None else build_prompt(tokenizer, messages)
    prompt_ids = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    if getattr(tokenizer, "chat_template", None):
        full = tokenizer.apply_chat_template(
            [*messages, {"role": "assistant", "content": reference}], tokenize=False)
        if full.startswith(prompt_text):
            target_text = full[len(prompt_text):].rstrip()
        else:  # a template that rewrites earlier turns: fall back to the reply itself
            target_text = reference
        target_ids = tokenizer(target_text, add_special_tokens=False)["input_ids"]
    else:
        target_ids = tokenizer(reference, add_special_tokens=False)["input_ids"]
    if tokenizer.eos_token_id is not None and (not target_ids
                                               or target_ids[-1] != tokenizer.eos_token_id):
        target_ids = [*target_ids, tokenizer.eos_token_id]
    ids = list(prompt_ids) + list(target_ids)
    return data.Example(ids, [data.IGNORE_INDEX] * len(prompt_ids) + list(target_ids))


def text_nll(model: Any, tokenizer: Any, texts: Sequence[str], *, max_tokens: int = 128,
             batch_size: int = 8, progress: bool = False, desc: str = "perplexity"
             ) -> list[tuple[float, int]]:
    """Per text ``(nll_sum, n_tokens)`` over its first ``max_tokens`` tokens (every token
    after the first is predicted): the input to a perplexity with a bootstrap interval."""
    examples = []
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"][:max_tokens]
        examples.append(data.Example(list(ids), list(ids)))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return examples_nll(model, examples, pad_id=pad, batch_size=batch_size, progress=progress,
                        desc=desc)


# ------------------------------------------------------------------------------ evaluation


@dataclass
class EvalSettings:
    """What to measure and how to generate."""

    metrics: list[str] = field(default_factory=list)  # empty: chosen from the references
    batch_size: int = 16
    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    stop: tuple[str, ...] = ()
    compute_loss: bool = True
    loss_batch_size: int = 8
    beta: float = 0.1  # preference data: the reward margin's beta

    def generation(self) -> GenerationSettings:
        return GenerationSettings(max_new_tokens=self.max_new_tokens,
                                  temperature=self.temperature, top_p=self.top_p,
                                  seed=self.seed if self.temperature > 0 else None,
                                  stop=tuple(self.stop))


def _is_json_object(text: str) -> bool:
    try:
        return isinstance(json.loads(text), dict)
    except ValueError:
        return False


def default_metrics(examples: Sequence[EvalExample]) -> list[str]:
    """``json_exact`` + ``json_fields`` when every reference is a JSON object, else
    ``exact`` + ``normalized_exact`` + ``rouge_l``."""
    if examples and all(_is_json_object(e.reference) for e in examples):
        return ["json_exact", "json_fields", "json_valid"]
    return ["exact", "normalized_exact", "rouge_l"]


def resolve_metrics(names: Sequence[str], examples: Sequence[EvalExample]) -> list[Metric]:
    """Metric objects for ``names`` (defaults when empty), checked against the references
    before any generation is spent: a JSON metric needs JSON references."""
    unique: list[Metric] = []
    for name in names or default_metrics(examples):
        metric = get_metric(name)
        if metric.name not in [m.name for m in unique]:
            unique.append(metric)
    for metric in unique:
        if metric.name in JSON_METRICS:
            for ex in examples:
                try:
                    metric(ex.reference, ex.reference, ex.record)
                except DataError as exc:
                    raise DataError(f"metric '{metric.name}' needs a JSON reference: {exc}",
                                    path=ex.where or None) from None
    return unique


@dataclass
class EvalResult:
    """Everything one system's evaluation measured."""

    name: str
    kind: str
    metrics: list[str]
    scores: dict[str, list[float]]           # metric -> per-example scores
    example_ids: list[str]
    outputs: list[dict[str, Any]]            # one readable row per example
    prompt_tokens: float
    latency_s: float
    generation_seconds: float
    field_scores: dict[str, float] | None = None
    nll: list[tuple[float, int]] | None = None
    style: dict[str, Any] = field(default_factory=dict)
    train_time_s: float | None = None
    peak_memory_bytes: int | None = None
    preference: Any | None = None  # evaluate.preference.PreferenceResult on preference data

    @property
    def headline(self) -> str:
        return self.metrics[0]

    def mean(self, metric: str | None = None) -> float:
        values = self.scores[metric or self.headline]
        return sum(values) / len(values)

    def interval(self, metric: str | None = None, *, seed: int = 0) -> Any:
        return bootstrap_mean_ci(self.scores[metric or self.headline], seed=seed)

    @property
    def loss(self) -> float | None:
        if not self.nll or sum(n for _, n in self.nll) == 0:
            return None
        return sum(x for x, _ in self.nll) / sum(n for _, n in self.nll)

    @property
    def perplexity(self) -> float | None:
        return corpus_perplexity(self.nll) if self.loss is not None else None

    def system_result(self, metric: str | None = None, *, seed: int = 0) -> SystemResult:
        return SystemResult.from_scores(
            self.name, self.kind, self.scores[metric or self.headline], seed=seed,
            example_ids=list(self.example_ids), prompt_tokens=self.prompt_tokens,
            latency_s=self.latency_s, train_time_s=self.train_time_s,
            peak_memory_bytes=self.peak_memory_bytes)

    def summary(self, *, seed: int = 0) -> dict[str, Any]:
        """Aggregates for results.json / report.json (no per-example rows)."""
        metrics = {}
        for m in self.metrics:
            iv = self.interval(m, seed=seed)
            metrics[m] = {"mean": iv.estimate, "ci_low": iv.low, "ci_high": iv.high}
        out: dict[str, Any] = {
            "name": self.name, "kind": self.kind, "n_examples": len(self.example_ids),
            "headline_metric": self.headline, "metrics": metrics,
            "prompt_tokens_per_request": self.prompt_tokens,
            "latency_s_per_request": self.latency_s,
            "generation_seconds": self.generation_seconds, "prompt": self.style,
            "field_scores": self.field_scores,
            "train_time_s": self.train_time_s, "peak_memory_bytes": self.peak_memory_bytes}
        if self.loss is not None:
            ci = perplexity_ci(self.nll, seed=seed)  # type: ignore[arg-type]
            out["reference_loss"] = self.loss
            out["reference_perplexity"] = {"mean": ci.estimate, "ci_low": ci.low,
                                           "ci_high": ci.high}
        if self.preference is not None:
            out["preference"] = self.preference.summary(seed=seed)
        return out


def preference_pairs(examples: Sequence[EvalExample]) -> list[EvalExample]:
    """The examples that are preference pairs (they have a rejected answer)."""
    return [ex for ex in examples if ex.rejected is not None]


def score_pairs(model: Any, tokenizer: Any, pairs: Sequence[EvalExample], style: PromptStyle,
                settings: EvalSettings) -> Any:
    """Preference accuracy and reward margin of one system, each pair asked with the
    system's own prompt (shots, instruction)."""
    from tunelab.evaluate.preference import PairPrompt, score_preferences

    prompts = [PairPrompt(ex.id, style.messages(ex), ex.reference, ex.rejected or "", ex.where)
               for ex in pairs]
    return score_preferences(model, tokenizer, prompts, beta=settings.beta,
                             batch_size=settings.loss_batch_size)


def evaluate_system(model: Any, tokenizer: Any, examples: Sequence[EvalExample],
                    style: PromptStyle, settings: EvalSettings, *,
                    metrics: Sequence[Metric] | None = None, progress: bool = True,
                    pairs: Sequence[EvalExample] | None = None) -> EvalResult:
    """Prompt, generate, score and (optionally) compute the reference loss for one system;
    on preference pairs (``pairs``, default: the examples that are pairs) their preference
    accuracy and reward margin too."""
    if not examples:
        raise DataError("no examples to evaluate")
    metrics = list(metrics) if metrics is not None else resolve_metrics(settings.metrics,
                                                                        examples)
    conversations = [style.messages(ex) for ex in examples]
    prompts = [build_prompt(tokenizer, conv) for conv in conversations]
    t0 = time.perf_counter()
    outs = generate_batched(model, tokenizer, prompts, settings.generation(),
                            batch_size=settings.batch_size, progress=progress,
                            desc=f"{style.name}: generate")
    gen_seconds = time.perf_counter() - t0
    nll = None
    if settings.compute_loss:
        refs = [reference_example(tokenizer, conv, ex.reference, prompt)
                for conv, ex, prompt in zip(conversations, examples, prompts, strict=True)]
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        nll = examples_nll(model, refs, pad_id=pad, batch_size=settings.loss_batch_size,
                           progress=progress, desc=f"{style.name}: loss")

    scores: dict[str, list[float]] = {m.name: [] for m in metrics}
    field_metric = next((m for m in metrics if m.field_fn is not None), None)
    field_totals: dict[str, list[float]] = {}
    rows = []
    for i, (ex, out) in enumerate(zip(examples, outs, strict=True)):
        pred = out["text"]
        row: dict[str, Any] = {"id": ex.id, "input": ex.question, "reference": ex.reference,
                               "prediction": pred, "scores": {}}
        for m in metrics:
            s = float(m(pred, ex.reference, ex.record))
            if not math.isfinite(s):
                raise DataError(f"metric '{m.name}' returned {s}", path=ex.where or None)
            scores[m.name].append(s)
            row["scores"][m.name] = s
        if field_metric is not None:
            fields = field_metric.fields(pred, ex.reference) or {}
            row["fields"] = fields
            for k, v in fields.items():
                field_totals.setdefault(k, []).append(v)
        row.update(finish_reason=out["finish_reason"], prompt_tokens=out["prompt_tokens"],
                   completion_tokens=out["completion_tokens"],
                   seconds=round(out["seconds"], 4))
        if nll is not None:
            row["reference_nll"], row["reference_tokens"] = round(nll[i][0], 4), nll[i][1]
        row["prompt"] = conversations[i]
        rows.append(row)
    field_scores = ({k: sum(v) / len(v) for k, v in field_totals.items()}
                    if field_metric is not None else None)
    own = pairs is None  # the pairs are the examples: their rows carry the pair's numbers
    pairs = preference_pairs(examples) if pairs is None else list(pairs)
    prefs = score_pairs(model, tokenizer, pairs, style, settings) if pairs else None
    if prefs is not None and own:
        by_id = {r["id"]: r for r in prefs.rows()}
        for row in rows:
            if row["id"] in by_id:
                row["preference"] = {k: v for k, v in by_id[row["id"]].items() if k != "id"}
    return EvalResult(
        name=style.name, kind=style.kind, metrics=[m.name for m in metrics], scores=scores,
        example_ids=[ex.id for ex in examples], outputs=rows,
        prompt_tokens=sum(o["prompt_tokens"] for o in outs) / len(outs),
        latency_s=gen_seconds / len(outs), generation_seconds=gen_seconds,
        field_scores=field_scores, nll=nll, style=style.describe(), preference=prefs)


def write_jsonl(path: Path, rows: Sequence[dict[str, Any]]) -> Path:
    """Write rows as JSON lines, atomically (a crash never leaves half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            for row in rows:
                fh.write(json.dumps(row, ensure_ascii=False) + "\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


# ---------------------------------------------------------------------- models and runs


@dataclass
class FinetunedSource:
    """A fine-tuned model on disk: a LoRA/QLoRA adapter or a full checkpoint, and the run
    directory it came from when there is one (for summary.json and metrics.jsonl)."""

    path: Path
    kind: str  # "lora" | "full"
    run_dir: Path | None = None

    def _json(self, name: str) -> dict[str, Any]:
        if self.run_dir is None or not (self.run_dir / name).is_file():
            return {}
        try:
            value = json.loads((self.run_dir / name).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            log.warning("cannot read %s", self.run_dir / name)
            return {}
        return value if isinstance(value, dict) else {}

    @property
    def summary(self) -> dict[str, Any]:
        return self._json("summary.json")

    @property
    def run_config(self) -> dict[str, Any]:
        return self._json("run_config.json")

    @property
    def method(self) -> str:
        cfg = self.run_config
        if cfg.get("method"):
            return str(cfg["method"])
        if self.kind == "lora":
            from tunelab.adapters import adapter_meta

            return str(adapter_meta(self.path).get("method", "lora"))
        return "full"

    def metrics_records(self) -> list[dict[str, Any]]:
        if self.run_dir is None:
            return []
        from tunelab.report.run import read_metrics

        return read_metrics(self.run_dir / "metrics.jsonl")


def _run_dir_of(folder: Path) -> Path | None:
    if (folder / "run_config.json").is_file():
        return folder
    if (folder.parent / "run_config.json").is_file():
        return folder.parent
    return None


def resolve_finetuned(path: str | Path) -> FinetunedSource:
    """What ``--adapter PATH`` points at: an adapter folder, a full model folder, or a run
    directory holding ``adapter/`` (LoRA, QLoRA) or ``model/`` (full fine-tuning)."""
    from tunelab.adapters import ADAPTER_CONFIG

    p = Path(path).expanduser()
    if not p.exists():
        raise ModelError(f"adapter not found: {p} (pass an adapter folder, a full model "
                         "folder, or a tunelab run directory)")
    if (p / ADAPTER_CONFIG).is_file():
        return FinetunedSource(p, "lora", _run_dir_of(p))
    if (p / "adapter" / ADAPTER_CONFIG).is_file():
        return FinetunedSource(p / "adapter", "lora", p)
    if (p / "model" / "config.json").is_file():
        return FinetunedSource(p / "model", "full", p)
    if (p / "config.json").is_file() and p.is_dir():
        return FinetunedSource(p, "full", _run_dir_of(p))
    raise ModelError(f"{p} holds no {ADAPTER_CONFIG}, adapter/ or model/: it is not a LoRA "
                     "adapter, a model folder, or a tunelab run directory (did training "
                     "finish?)")


def run_splits(run_dir: Path) -> tuple[list[data.Record], list[data.Record], str]:
    """The training and validation records a run used, re-derived from its run_config.json
    exactly as training splits them (same file, ``val_fraction`` and ``seed``)."""
    cfg_path = run_dir / "run_config.json"
    if not cfg_path.is_file():
        raise DataError(f"{run_dir} has no run_config.json, so its data split is unknown; "
                        "pass --data (and --shots-from)")
    cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    if isinstance(cfg["data"], list):  # a mixture: each source split as training split it
        from tunelab.data.mixture import split_source_records

        fraction = 0.0 if cfg.get("val_data") else float(cfg.get("val_fraction", 0.1))
        train, val = split_source_records(cfg["data"], fraction, int(cfg.get("seed", 0)),
                                          cfg.get("split", "train"), cfg.get("columns", ""))
        if cfg.get("val_data"):
            val = data.read_records(cfg["val_data"])
    elif cfg.get("val_data"):
        train, val = data.read_records(cfg["data"]), data.read_records(cfg["val_data"])
    else:
        records = data.read_records(cfg["data"])
        train, val = data.split_records(records, float(cfg.get("val_fraction", 0.1)),
                                        int(cfg.get("seed", 0)))
    if not val:
        raise DataError(f"run {run_dir} trained without a validation split (val_fraction 0), "
                        "so there is no held-out data to evaluate on; pass --data")
    return train, val, str(cfg.get("format", "auto"))


@dataclass
class ModelOptions:
    device: str = "auto"
    dtype: str = "auto"
    allow_pickle: bool = False
    trust_remote_code: bool = False


def load_base(spec: str, options: ModelOptions, *, bits: int = 16,
              meta: dict[str, Any] | None = None) -> tuple[Any, Any]:
    from tunelab import models

    meta = meta or {}
    kwargs: dict[str, Any] = {"device": options.device, "dtype": options.dtype,
                              "allow_pickle": options.allow_pickle,
                              "trust_remote_code": options.trust_remote_code}
    if bits != 16:
        kwargs.update(bits=bits, quant_type=meta.get("quant_type", "nf4"),
                      double_quant=meta.get("double_quant", True))
    return models.load_model(spec, **kwargs)


def load_finetuned(source: FinetunedSource, base_spec: str, options: ModelOptions
                   ) -> tuple[Any, Any]:
    """The fine-tuned model ready to generate: base (quantized as it was trained) + adapter,
    or the full checkpoint."""
    from tunelab import adapters

    if source.kind == "full":
        return load_base(str(source.path), options)
    meta = adapters.adapter_meta(source.path)
    model, tokenizer = load_base(base_spec, options, bits=int(meta.get("base_bits", 16)),
                                 meta=meta)
    return adapters.load_adapter(model, source.path), tokenizer


def default_base(spec: str | None, sources: Sequence[FinetunedSource]) -> str:
    """``--model`` if given, else the base a fine-tuned run was trained from, else the
    default model."""
    if spec:
        return spec
    for source in sources:
        if source.kind == "lora":
            from tunelab.adapters import adapter_meta

            base = source.run_config.get("model") or adapter_meta(source.path).get("base_model")
            if base:
                return str(base)
    from tunelab.models import DEFAULT_MODEL

    return DEFAULT_MODEL


# ------------------------------------------------------------------------------- `eval`


def eval_report(result: EvalResult, *, title: str, config: dict[str, Any],
                device: str | None = None, seed: int = 0) -> dict[str, Any]:
    from tunelab.report.html import collect_environment

    summary = result.summary(seed=seed)
    metric_table = {result.name: {m: v["mean"] for m, v in summary["metrics"].items()}}
    if result.loss is not None:
        metric_table[result.name]["reference loss"] = result.loss
        metric_table[result.name]["reference perplexity"] = result.perplexity
    metric_table[result.name].update(preference_columns(result))
    report: dict[str, Any] = {
        "title": title,
        "summary": (f"{len(result.example_ids)} examples; headline metric "
                    f"{result.headline}. Latency is generation time per request at batch "
                    f"size {config.get('batch_size')}."),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "metric": result.headline,
        "systems": [result.system_result(seed=seed)],
        "metric_table": metric_table,
        "results": summary,
        "config": config,
        "environment": collect_environment(device=device),
        "examples": [_example_row(row, result.headline) for row in result.outputs],
    }
    if result.field_scores:
        report["field_scores"] = {result.name: result.field_scores}
    if result.preference is not None:
        report["preference"] = {result.name: summary["preference"]}
    return report


def preference_columns(result: EvalResult) -> dict[str, float]:
    """The preference means for a report's all-metrics table (none without pairs)."""
    if result.preference is None:
        return {}
    summary = result.preference.summary()
    return {"preference accuracy": summary["preference_accuracy"]["mean"],
            "reward margin": summary["reward_margin"]["mean"]}


def _example_row(row: dict[str, Any], metric: str) -> dict[str, Any]:
    return {"id": row["id"], "input": row["input"], "reference": row["reference"],
            "prediction": row["prediction"], metric: row["scores"][metric]}


def run_eval(*, model_spec: str | None, adapter: str | None, examples: list[EvalExample],
             settings: EvalSettings, out: Path, style: PromptStyle,
             options: ModelOptions | None = None, progress: bool = True,
             pairs: Sequence[EvalExample] | None = None) -> EvalResult:
    """``tunelab eval``: evaluate one system, write outputs.jsonl, results.json, report."""
    from tunelab.report.html import to_jsonable, write_report

    options = options or ModelOptions()
    metrics = resolve_metrics(settings.metrics, examples)  # fail before loading anything
    source = resolve_finetuned(adapter) if adapter else None
    base = default_base(model_spec, [source] if source else [])
    if source is not None:
        model, tokenizer = load_finetuned(source, base, options)
    else:
        model, tokenizer = load_base(base, options)
    result = evaluate_system(model, tokenizer, examples, style, settings, metrics=metrics,
                             progress=progress, pairs=pairs)
    if source is not None:
        result.train_time_s = source.summary.get("train_seconds")
        result.peak_memory_bytes = source.summary.get("peak_memory_bytes")
    out.mkdir(parents=True, exist_ok=True)
    write_jsonl(out / "outputs.jsonl", result.outputs)
    if result.preference is not None:
        write_jsonl(out / "pairs.jsonl", result.preference.rows())
    config = {"model": base, "adapter": str(source.path) if source else None,
              "data": examples[0].where.rsplit(", line", 1)[0] if examples else None,
              "n_examples": len(examples), **{k: v for k, v in settings.__dict__.items()},
              "prompt": style.describe()}
    device = str(next(model.parameters()).device)
    summary = result.summary()
    (out / "results.json").write_text(json.dumps(to_jsonable(summary), indent=2) + "\n",
                                      encoding="utf-8")
    write_report(out, eval_report(result, title=f"tunelab eval: {result.name}", config=config,
                                  device=device))
    return result
