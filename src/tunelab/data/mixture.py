"""Train on several sources at once, each drawn by its weight: ``data: [{path, weight}, ...]``.

A source is read, checked and split into train and validation rows on its own, in its own
format (detected per source, or its ``format``/``columns``/``split`` keys; the top-level keys
are the defaults). The train rows of every source are concatenated (source *i* holds the
global indices ``offset_i .. offset_i + n_i - 1``) and :class:`MixtureSchedule` decides which
of them make up each micro-batch.

The sampling, per epoch of ``N = n_1 + ... + n_S`` rows (the size of the plain
concatenation, so ``epochs`` and the step count mean what they mean for one source):

* **quota**: source *i* gives ``q_i`` rows, ``p_i = w_i / sum_j w_j`` and ``q_i`` is
  ``p_i N`` rounded by largest remainder (``floor(p_i N)``, plus one for the
  ``N - sum_j floor(p_j N)`` sources with the largest fractional parts, ties to the earlier
  source), so ``sum_i q_i = N`` and ``|q_i - p_i N| < 1`` in every epoch;
* **which rows**: source *i* is read as an endless stream of permutations of its rows
  (pass *c* is ``permutation(n_i)`` seeded by ``(seed, i, c)``); epoch *e* takes stream
  positions ``[e q_i, (e + 1) q_i)``. So a source is drawn without replacement across
  epochs: no row a second time before every row of it once, and after ``T`` draws every
  row has been drawn ``floor(T / n_i)`` or ``ceil(T / n_i)`` times. A source smaller than
  its share (``q_i > n_i``) repeats rows within an epoch; one larger than its share is seen
  over several epochs (an epoch that crosses the end of a pass can hold a row of the old
  pass and the same row early in the new one);
* **order**: the ``N`` picked rows are shuffled by ``permutation(N)`` seeded by
  ``(seed, e)`` (then length-grouped as in :class:`tunelab.data.BatchSchedule` when asked);
  micro-batch *k* is the *k*-th slice, as for one source.

Everything is a function of ``(seed, k)`` alone, so a resumed run draws exactly the batches
the uninterrupted run would have (no sampler state in the checkpoint). Validation is per
source; the overall validation loss is the token-weighted mean over all sources (the same
number as one pass over the concatenated validation rows).
"""

from __future__ import annotations

import bisect
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from tunelab import data
from tunelab.data import BatchSchedule, DataStats, Example
from tunelab.errors import DataError

log = logging.getLogger(__name__)


def is_mixture(spec: Any) -> bool:
    """``data`` is a list of sources (tunelab.config has checked each one)."""
    return isinstance(spec, list)


def describe(spec: str | list[dict[str, Any]]) -> str:
    """``data`` in words: the path, or ``a.jsonl (weight 0.8) + b.jsonl (weight 0.2)``."""
    if not is_mixture(spec):
        return str(spec)
    return " + ".join(f"{s['path']} (weight {s['weight']:g})" for s in spec)


def epoch_quota(weights: Sequence[float], n: int) -> list[int]:
    """Rows per epoch of each source: ``p_i n`` rounded by largest remainder (module doc)."""
    total = float(sum(weights))
    exact = [w / total * n for w in weights]
    quota = [int(x) for x in exact]
    by_remainder = sorted(range(len(exact)), key=lambda i: (-(exact[i] - quota[i]), i))
    for i in by_remainder[:n - sum(quota)]:
        quota[i] += 1
    return quota


def _seed(*parts: int) -> np.random.Generator:
    # SeedSequence takes non-negative integers; a negative run seed is folded into range
    return np.random.default_rng([p % 2**63 for p in parts])


class MixtureSchedule(BatchSchedule):
    """:class:`tunelab.data.BatchSchedule` over the concatenated train rows, with each
    epoch's order drawn by the sources' weights (module docstring)."""

    def __init__(self, sizes: Sequence[int], weights: Sequence[float], batch_size: int,
                 seed: int, lengths: Sequence[int] | None = None,
                 epoch_rows: int | None = None) -> None:
        # epoch_rows: the epoch's size N when it is not the concatenation's (replay adds
        # rows to an epoch rather than taking them from the task's: see Mixture.epoch_rows)
        super().__init__(epoch_rows or sum(sizes), batch_size, seed, lengths)
        self.sizes = list(sizes)
        self.offsets = [0, *np.cumsum(self.sizes).tolist()][:-1]
        self.quota = epoch_quota(weights, self.n)

    def _stream(self, source: int, start: int, count: int) -> list[int]:
        """Positions ``[start, start + count)`` of source ``source``'s permutation stream,
        as global indices."""
        n, out = self.sizes[source], []
        pos = start
        while pos < start + count:
            c, r = divmod(pos, n)
            take = min(n - r, start + count - pos)
            perm = _seed(self.seed, source, c).permutation(n)
            out.extend((perm[r:r + take] + self.offsets[source]).tolist())
            pos += take
        return out

    def _order(self, epoch: int) -> list[int]:
        if epoch not in self._orders:
            picked = []
            for i, q in enumerate(self.quota):
                picked.extend(self._stream(i, epoch * q, q))
            shuffle = _seed(self.seed, 1_000_003, epoch).permutation(len(picked))
            order = [picked[j] for j in shuffle.tolist()]
            if self.lengths is not None:
                import torch  # the grouping shuffles its batches with BatchSchedule's generator

                order = self._grouped(order, torch.Generator().manual_seed(self.seed + epoch))
            self._orders = {epoch: order}
        return self._orders[epoch]

    def source_of(self, index: int) -> int:
        """The source a global train index belongs to."""
        return bisect.bisect_right(self.offsets, index) - 1


@dataclass
class SourceData:
    """One source's rows after reading, splitting and tokenizing."""

    spec: dict[str, Any]  # the checked config entry: path, weight, name, [format, ...]
    train: list[Example]
    val: list[Example]
    stats: DataStats

    @property
    def name(self) -> str:
        return str(self.spec["name"])


def _predicted_targets(examples: Sequence[Example]) -> int:
    # the loss predicts token t+1 from position t: the first label is never a target
    return sum(sum(1 for t in ex.labels[1:] if t != data.IGNORE_INDEX) for ex in examples)


@dataclass
class Mixture:
    """The sources of a run, their concatenated train and validation rows and the per-source
    figures of the summary and ``metrics.jsonl``."""

    parts: list[SourceData]
    val_data: list[Example] | None = None  # a separate val_data file: no per-source split
    replay_ratio: float = 0.0  # the replay part's share of each epoch (tunelab.replay)

    @property
    def epoch_rows(self) -> int:
        """Rows per epoch ``N``: the concatenation's size; with replay at ratio ``r``,
        ``round(n_task / (1 - r))`` so the task sources keep their ``n_task`` rows per epoch
        and the replay part gets ``r N`` more (its answers are drawn without replacement
        across epochs like any source's), whatever the number of replay rows."""
        task = sum(len(p.train) for p in self.parts if not p.spec.get("replay"))
        if not self.replay_ratio:
            return sum(len(p.train) for p in self.parts)
        return int(task / (1.0 - self.replay_ratio) + 0.5)

    def add_replay(self, path: str, cfg: Any, tokenizer: Any, fmt: str = "auto") -> SourceData:
        """Append the replay source (``replay: self``'s cached answers, or ``replay: FILE``)
        with the weight that makes it ``replay_ratio`` of each epoch: ``w_r = r W / (1 - r)``
        for task weights summing to ``W``; its train rows are flagged ``replay``."""
        task_weight = sum(float(p.spec["weight"]) for p in self.parts)
        taken = {p.name for p in self.parts}
        name, k = "replay", 2
        while name in taken:
            name, k = f"replay-{k}", k + 1
        spec = {"path": path, "weight": self.replay_ratio * task_weight / (1 - self.replay_ratio),
                "name": name, "format": fmt, "columns": "", "replay": True}
        part = _load_source(spec, cfg, tokenizer, 0.0 if cfg.val_data else cfg.val_fraction)
        if not part.train:
            raise DataError("the replay data has no training rows left after the validation "
                            "split", path=path)
        for ex in part.train:
            ex.replay = True
        self.parts.append(part)
        log.info("replay source %s: %d train / %d validation examples, %.0f%% of each epoch",
                 name, len(part.train), len(part.val), 100 * self.replay_ratio)
        return part

    @property
    def train_set(self) -> list[Example]:
        return [ex for p in self.parts for ex in p.train]

    @property
    def val_set(self) -> list[Example]:
        if self.val_data is not None:
            return self.val_data
        return [ex for p in self.parts for ex in p.val]

    @property
    def stats(self) -> DataStats:
        """Every source's counts added up (the run's ``data_stats``)."""
        total = DataStats(max_length=self.parts[0].stats.max_length)
        for p in self.parts:
            total.n_records += p.stats.n_records
            total.n_truncated += p.stats.n_truncated
            total.n_dropped += p.stats.n_dropped
            total.n_tokens += p.stats.n_tokens
            total.n_target_tokens += p.stats.n_target_tokens
            total.lengths.extend(p.stats.lengths)
        return total

    def datasets(self) -> tuple[list[Example], list[Example], DataStats]:
        """``(train, validation, stats)``, as :func:`tunelab.train.load_datasets` returns."""
        return self.train_set, self.val_set, self.stats

    def schedule(self, batch_size: int, seed: int, group_by_length: bool = False
                 ) -> MixtureSchedule:
        lengths = [len(e.input_ids) for e in self.train_set] if group_by_length else None
        schedule = MixtureSchedule([len(p.train) for p in self.parts],
                                   [float(p.spec["weight"]) for p in self.parts], batch_size,
                                   seed, lengths, epoch_rows=self.epoch_rows)
        for part, q in zip(self.parts, schedule.quota, strict=True):
            if q == 0:
                log.warning("data source %s: weight %g gives it no row in an epoch of %d; "
                            "raise its weight", part.name, part.spec["weight"], schedule.n)
        return schedule

    def validate(self, loss_of: Callable[[list[Example]], float], world: int = 1
                 ) -> tuple[float, dict[str, float]]:
        """The overall validation loss and ``{"loss/<source>": loss}``.

        ``loss_of(examples)`` is the mean loss per predicted target token. The overall loss
        is ``sum_i L_i C_i / sum_i C_i`` with ``C_i`` source *i*'s predicted target tokens:
        the mean over every validation token, as one pass over all of them gives. A source
        with fewer validation rows than processes is not scored alone (some process would
        have nothing to evaluate); then the overall loss is one pass over all rows.
        """
        if self.val_data is not None:
            return loss_of(self.val_data), {}
        losses: dict[str, float] = {}
        weighted, count, complete = 0.0, 0, True
        for part in self.parts:
            if not part.val:
                continue
            if len(part.val) < world:
                complete = False
                continue
            loss = loss_of(part.val)
            losses[f"loss/{part.name}"] = loss
            n = _predicted_targets(part.val)
            weighted, count = weighted + loss * n, count + n
        if not complete or count == 0:
            return loss_of(self.val_set), losses
        return weighted / count, losses

    def summary(self, schedule: MixtureSchedule, micro_batches: int) -> list[dict[str, Any]]:
        """Per source: its config, its rows and what the run drew from it over the first
        ``micro_batches`` micro-batches (``rows``: draws, a repeated row counted each time;
        ``tokens``: their tokens)."""
        train = self.train_set
        rows = [0] * len(self.parts)
        tokens = [0] * len(self.parts)
        for k in range(micro_batches):
            for index in schedule.indices(k):
                i = schedule.source_of(index)
                rows[i] += 1
                tokens[i] += len(train[index].input_ids)
        total = sum(float(p.spec["weight"]) for p in self.parts)
        return [{"name": p.name, "path": p.spec["path"], "weight": p.spec["weight"],
                 "share": round(float(p.spec["weight"]) / total, 6),
                 **({"replay": True} if p.spec.get("replay") else {}),
                 "train_examples": len(p.train), "val_examples": len(p.val),
                 "rows_per_epoch": q, "rows": rows[i], "tokens": tokens[i],
                 **{k: v for k, v in p.stats.as_dict().items() if k != "max_length"}}
                for i, (p, q) in enumerate(zip(self.parts, schedule.quota, strict=True))]


def _load_source(spec: dict[str, Any], cfg: Any, tokenizer: Any, val_fraction: float
                 ) -> SourceData:
    """Read, split and tokenize one source as a one-source run would (train.load_datasets)."""
    split = spec.get("split", cfg.split)
    columns = spec.get("columns", cfg.columns)
    kw = {"fmt": spec.get("format", cfg.format), "max_length": cfg.max_length,
          "overlength": cfg.overlength, "train_on": cfg.train_on}
    path = spec["path"]
    if data.sources.is_source(path):  # `datasets` folders and hub ids stream
        train, val, stats = data.encode_source(path, tokenizer, split=split, columns=columns,
                                               val_fraction=val_fraction, seed=cfg.seed, **kw)
        return SourceData(spec, train, val, stats)
    records = data.read_records(path, split=split, columns=columns)
    from tunelab import preference

    if preference.is_preference(records):
        raise DataError("holds preference pairs (chosen/rejected); a data mixture trains "
                        "with objective: sft", path=path)
    train_records, val_records = data.split_records(records, val_fraction, cfg.seed)
    train, stats = data.encode_records(train_records, tokenizer, **kw)
    val = data.encode_records(val_records, tokenizer, **kw)[0] if val_records else []
    return SourceData(spec, train, val, stats)


def task_sources(cfg: Any) -> list[dict[str, Any]]:
    """``cfg.data`` as a list of sources (one string is one source of weight 1)."""
    if is_mixture(cfg.data):
        return list(cfg.data)
    from tunelab.config import _source_name

    return [{"path": cfg.data, "weight": 1.0, "name": _source_name(cfg.data)}]


def load_mixture(cfg: Any, tokenizer: Any) -> Mixture:
    """Every source of ``cfg.data`` read and split (``val_fraction`` of each, by ``seed``),
    or validated on ``cfg.val_data`` when it is given. With ``replay`` set, the mixture
    holds the ratio; the replay source is added by :meth:`Mixture.add_replay`."""
    fraction = 0.0 if cfg.val_data else cfg.val_fraction
    parts = [_load_source(spec, cfg, tokenizer, fraction) for spec in task_sources(cfg)]
    val_data = None
    if cfg.val_data:
        kw = {"fmt": cfg.format, "max_length": cfg.max_length, "overlength": cfg.overlength,
              "train_on": cfg.train_on}
        val_data = data.encode_records(
            data.read_records(cfg.val_data, split=cfg.split, columns=cfg.columns),
            tokenizer, **kw)[0]
    for part in parts:
        log.info("data source %s: %d train / %d validation examples, weight %g", part.name,
                 len(part.train), len(part.val), part.spec["weight"])
    ratio = float(cfg.replay_ratio or 0.0) if getattr(cfg, "replay", "") else 0.0
    return Mixture(parts, val_data, replay_ratio=ratio)


def split_source_records(sources: Sequence[dict[str, Any]], val_fraction: float, seed: int,
                         split: str = "train", columns: str = ""
                         ) -> tuple[list[data.Record], list[data.Record]]:
    """The train and validation records of a mixture's file sources, split exactly as
    training split them (for evaluating a run on its own validation rows)."""
    train: list[data.Record] = []
    val: list[data.Record] = []
    for spec in sources:
        records = data.read_records(spec["path"], split=spec.get("split", split),
                                    columns=spec.get("columns", columns))
        t, v = data.split_records(records, val_fraction, seed)
        train.extend(t)
        val.extend(v)
    return train, val
