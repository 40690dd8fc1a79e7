"""Uncertainty for evaluation numbers: percentile-bootstrap intervals.

An evaluation set is a sample of the examples a model will see, so every score is reported
with a 95% interval. We use the percentile bootstrap throughout: draw ``B`` resamples of the
``n`` examples with replacement, compute the statistic on each, and take the ``(1-level)/2``
and ``(1+level)/2`` quantiles of the ``B`` values. It makes no normality assumption, works
for bounded scores (0/1 accuracy) and for ratio statistics such as corpus perplexity.

Comparisons between two systems evaluated on the *same* examples use the paired bootstrap:
one set of resampled indices is applied to both systems, so the per-example correlation
(easy examples are easy for both) is kept and the interval of the difference is much
narrower than comparing two separate intervals.

All functions are deterministic for a given ``seed`` (NumPy ``default_rng``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass

import numpy as np

DEFAULT_RESAMPLES = 2000
DEFAULT_LEVEL = 0.95
# Resampled index matrices are drawn in chunks of about this many entries, so memory stays
# bounded (~16 MB of int64) for large evaluation sets.
_CHUNK_ELEMENTS = 2_000_000


@dataclass(frozen=True)
class Interval:
    """A point estimate with a bootstrap interval ``[low, high]`` at confidence ``level``.

    ``estimate`` is the statistic on the full sample (not the bootstrap mean); ``n`` is the
    number of examples (or documents) it was computed from.
    """

    estimate: float
    low: float
    high: float
    level: float = DEFAULT_LEVEL
    n: int = 0

    def excludes(self, value: float = 0.0) -> bool:
        """True if ``value`` lies outside ``[low, high]``."""
        return value < self.low or value > self.high

    def to_dict(self) -> dict[str, float | int]:
        return asdict(self)

    def __str__(self) -> str:
        return f"{self.estimate:.3g} [{self.low:.3g}, {self.high:.3g}]"


def _as_array(values: Sequence[float] | np.ndarray, what: str) -> np.ndarray:
    arr = np.asarray(values, dtype=np.float64)
    if arr.ndim != 1:
        raise ValueError(f"{what} must be one-dimensional, got shape {arr.shape}")
    if arr.size == 0:
        raise ValueError(f"{what} is empty: cannot compute an interval from no examples")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{what} contains NaN or infinite values")
    return arr


def _check(n_resamples: int, level: float) -> None:
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be >= 1, got {n_resamples}")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")


def _index_chunks(rng: np.random.Generator, n: int, n_resamples: int) -> Iterator[np.ndarray]:
    # Chunk size depends only on n, so the random stream (and the result) is the same
    # for a given seed however large the data.
    rows = max(1, _CHUNK_ELEMENTS // n)
    done = 0
    while done < n_resamples:
        b = min(rows, n_resamples - done)
        yield rng.integers(0, n, size=(b, n))
        done += b


def _percentiles(values: np.ndarray, level: float) -> tuple[float, float]:
    alpha = 1.0 - level
    low, high = np.quantile(values, [alpha / 2, 1 - alpha / 2])
    return float(low), float(high)


def _bootstrap(n: int, statistic: Callable[[np.ndarray], np.ndarray], *, n_resamples: int,
               level: float, seed: int) -> tuple[float, float]:
    """Percentile interval of ``statistic(idx)``, where ``idx`` is a ``(B, n)`` matrix of
    resampled indices and ``statistic`` returns one value per row."""
    _check(n_resamples, level)
    rng = np.random.default_rng(seed)
    stats = np.concatenate([statistic(idx) for idx in _index_chunks(rng, n, n_resamples)])
    return _percentiles(stats, level)


def bootstrap_mean_ci(scores: Sequence[float] | np.ndarray, *,
                      n_resamples: int = DEFAULT_RESAMPLES, level: float = DEFAULT_LEVEL,
                      seed: int = 0) -> Interval:
    """Mean of per-example scores with a percentile-bootstrap interval.

    ``estimate = mean(s)``; the interval is the ``(1±level)/2`` quantiles of
    ``mean(s[idx_b])`` over ``b = 1..n_resamples`` resamples ``idx_b`` of size ``n`` drawn
    with replacement. A constant sample gives a zero-width interval (all ones -> [1, 1]).
    """
    s = _as_array(scores, "scores")
    low, high = _bootstrap(len(s), lambda idx: s[idx].mean(axis=1), n_resamples=n_resamples,
                           level=level, seed=seed)
    return Interval(float(s.mean()), low, high, level, len(s))


def paired_bootstrap_diff(a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray, *,
                          n_resamples: int = DEFAULT_RESAMPLES, level: float = DEFAULT_LEVEL,
                          seed: int = 0) -> Interval:
    """``mean(a) - mean(b)`` for two systems scored on the same examples, paired bootstrap.

    ``a[i]`` and ``b[i]`` must be scores of the same example ``i``. Each resample applies one
    index vector to both systems, which is the bootstrap of the per-example differences
    ``d_i = a_i - b_i``: ``mean(a[idx]) - mean(b[idx]) = mean(d[idx])``.
    """
    x = _as_array(a, "a")
    y = _as_array(b, "b")
    if len(x) != len(y):
        raise ValueError(f"paired bootstrap needs aligned scores, got {len(x)} and {len(y)}")
    return bootstrap_mean_ci(x - y, n_resamples=n_resamples, level=level, seed=seed)


def unpaired_bootstrap_diff(a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray,
                            *, n_resamples: int = DEFAULT_RESAMPLES,
                            level: float = DEFAULT_LEVEL, seed: int = 0) -> Interval:
    """``mean(a) - mean(b)`` for two *independent* samples (different examples): each is
    resampled separately. Wider than the paired interval; use only when examples differ."""
    x = _as_array(a, "a")
    y = _as_array(b, "b")
    _check(n_resamples, level)
    rng = np.random.default_rng(seed)
    mx = np.concatenate([x[i].mean(axis=1) for i in _index_chunks(rng, len(x), n_resamples)])
    my = np.concatenate([y[i].mean(axis=1) for i in _index_chunks(rng, len(y), n_resamples)])
    low, high = _percentiles(mx - my, level)
    return Interval(float(x.mean() - y.mean()), low, high, level, min(len(x), len(y)))


# --------------------------------------------------------------------------------------------
# Perplexity
# --------------------------------------------------------------------------------------------


def perplexity(nll_sum: float, n_tokens: float) -> float:
    """Corpus perplexity ``exp(sum NLL / n_tokens)`` (NLL in nats, summed over tokens)."""
    if n_tokens <= 0:
        raise ValueError(f"perplexity needs at least one token, got n_tokens={n_tokens}")
    return float(np.exp(nll_sum / n_tokens))


def _nll_arrays(per_example: Sequence[tuple[float, int]], what: str
                ) -> tuple[np.ndarray, np.ndarray]:
    arr = np.asarray(per_example, dtype=np.float64)
    if arr.ndim != 2 or arr.shape[1] != 2 or arr.shape[0] == 0:
        raise ValueError(f"{what} must be a non-empty list of (nll_sum, n_tokens) pairs")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{what} contains NaN or infinite values")
    nll, tok = arr[:, 0], arr[:, 1]
    if np.any(tok < 0) or tok.sum() <= 0:
        raise ValueError(f"{what}: token counts must be >= 0 with a positive total")
    return nll, tok


def _ratio_ppl(nll: np.ndarray, tok: np.ndarray, idx: np.ndarray) -> np.ndarray:
    t = tok[idx].sum(axis=1)
    # A resample made only of zero-token documents has no defined perplexity; it can only
    # happen when most documents are empty, and counting it as the full-sample value keeps
    # the quantiles finite.
    safe = np.where(t > 0, t, 1.0)
    ratio = np.where(t > 0, nll[idx].sum(axis=1) / safe, nll.sum() / tok.sum())
    return np.exp(ratio)


def corpus_perplexity(per_example: Sequence[tuple[float, int]]) -> float:
    """Token-weighted perplexity ``exp(sum_i nll_i / sum_i n_i)`` of ``(nll_sum, n_tokens)``
    pairs, one per document."""
    nll, tok = _nll_arrays(per_example, "per_example")
    return perplexity(float(nll.sum()), float(tok.sum()))


def perplexity_ci(per_example: Sequence[tuple[float, int]], *,
                  n_resamples: int = DEFAULT_RESAMPLES, level: float = DEFAULT_LEVEL,
                  seed: int = 0) -> Interval:
    """Corpus perplexity over documents with a bootstrap interval over documents.

    ``per_example`` holds ``(nll_sum_i, n_tokens_i)`` per document. The estimate is the
    token-weighted ``exp(sum_i nll_i / sum_i n_i)``; each resample redraws whole documents,
    because tokens within a document are correlated and resampling tokens would make the
    interval too narrow.
    """
    nll, tok = _nll_arrays(per_example, "per_example")
    low, high = _bootstrap(len(nll), lambda idx: _ratio_ppl(nll, tok, idx),
                           n_resamples=n_resamples, level=level, seed=seed)
    return Interval(perplexity(float(nll.sum()), float(tok.sum())), low, high, level, len(nll))


def paired_perplexity_diff(before: Sequence[tuple[float, int]],
                           after: Sequence[tuple[float, int]], *,
                           n_resamples: int = DEFAULT_RESAMPLES, level: float = DEFAULT_LEVEL,
                           seed: int = 0) -> Interval:
    """``ppl(after) - ppl(before)`` on the same documents, paired bootstrap over documents.

    Used for forgetting: a positive difference means the fine-tuned model got worse at
    general text. ``before[i]`` and ``after[i]`` must describe the same document.
    """
    nb, tb = _nll_arrays(before, "before")
    na, ta = _nll_arrays(after, "after")
    if len(nb) != len(na):
        raise ValueError(f"paired perplexity needs the same documents, got {len(nb)} and "
                         f"{len(na)}")
    low, high = _bootstrap(len(nb), lambda idx: _ratio_ppl(na, ta, idx) - _ratio_ppl(nb, tb, idx),
                           n_resamples=n_resamples, level=level, seed=seed)
    estimate = perplexity(float(na.sum()), float(ta.sum())) - perplexity(float(nb.sum()),
                                                                         float(tb.sum()))
    return Interval(estimate, low, high, level, len(nb))
