"""Bootstrap intervals: sanity, determinism, known cases, perplexity."""

from __future__ import annotations

import math

import numpy as np
import pytest

from tunelab.evaluate import (
    Interval,
    bootstrap_mean_ci,
    corpus_perplexity,
    paired_bootstrap_diff,
    paired_perplexity_diff,
    perplexity,
    perplexity_ci,
    unpaired_bootstrap_diff,
)


def _binary(n: int, p: float, seed: int) -> np.ndarray:
    return (np.random.default_rng(seed).random(n) < p).astype(float)


def test_ci_contains_mean() -> None:
    for seed in range(5):
        scores = _binary(100, 0.6, seed)
        ci = bootstrap_mean_ci(scores, seed=seed)
        assert ci.low <= ci.estimate <= ci.high
        assert ci.estimate == pytest.approx(scores.mean())
        assert ci.n == 100 and ci.level == 0.95


def test_ci_narrows_with_n() -> None:
    small = bootstrap_mean_ci(_binary(50, 0.5, 1))
    large = bootstrap_mean_ci(_binary(5000, 0.5, 1))
    assert (large.high - large.low) < (small.high - small.low) / 5
    # Width of a 95% interval for a proportion is about 2 * 1.96 * sqrt(p(1-p)/n).
    assert large.high - large.low == pytest.approx(2 * 1.96 * math.sqrt(0.25 / 5000), rel=0.15)


def test_ci_deterministic_under_seed() -> None:
    scores = _binary(200, 0.3, 2)
    assert bootstrap_mean_ci(scores, seed=7) == bootstrap_mean_ci(scores, seed=7)
    assert bootstrap_mean_ci(scores, seed=7) != bootstrap_mean_ci(scores, seed=8)


def test_known_constant_cases() -> None:
    assert bootstrap_mean_ci([1.0] * 40) == Interval(1.0, 1.0, 1.0, 0.95, 40)
    assert bootstrap_mean_ci([0.0] * 10) == Interval(0.0, 0.0, 0.0, 0.95, 10)
    one = bootstrap_mean_ci([0.25])
    assert (one.low, one.estimate, one.high) == (0.25, 0.25, 0.25)


def test_level_widens_interval() -> None:
    scores = _binary(300, 0.5, 3)
    ci90 = bootstrap_mean_ci(scores, level=0.90)
    ci99 = bootstrap_mean_ci(scores, level=0.99)
    assert ci99.high - ci99.low > ci90.high - ci90.low


def test_chunked_resampling_large_n() -> None:
    # 3000 resamples x 2000 examples exceeds one chunk; the answer must still be sane.
    scores = _binary(2000, 0.5, 4)
    ci = bootstrap_mean_ci(scores, n_resamples=3000)
    assert ci.low < ci.estimate < ci.high


def test_invalid_inputs() -> None:
    with pytest.raises(ValueError, match="empty"):
        bootstrap_mean_ci([])
    with pytest.raises(ValueError, match="NaN"):
        bootstrap_mean_ci([1.0, float("nan")])
    with pytest.raises(ValueError):
        bootstrap_mean_ci([1.0], level=1.5)
    with pytest.raises(ValueError):
        bootstrap_mean_ci([1.0], n_resamples=0)
    with pytest.raises(ValueError, match="aligned"):
        paired_bootstrap_diff([1.0, 0.0], [1.0])


def test_paired_diff() -> None:
    a = _binary(300, 0.5, 5)
    b = a.copy()
    b[:60] = 0.0  # b is a strictly worse copy of a on some examples
    diff = paired_bootstrap_diff(a, b)
    assert diff.estimate == pytest.approx(a.mean() - b.mean())
    assert diff.low > 0
    same = paired_bootstrap_diff(a, a)
    assert (same.low, same.estimate, same.high) == (0.0, 0.0, 0.0)


def test_paired_narrower_than_unpaired() -> None:
    rng = np.random.default_rng(6)
    difficulty = rng.random(400)
    a = (difficulty < 0.7).astype(float)
    b = (difficulty < 0.65).astype(float)  # correlated with a
    paired = paired_bootstrap_diff(a, b)
    unpaired = unpaired_bootstrap_diff(a, b)
    assert paired.estimate == pytest.approx(unpaired.estimate)
    assert paired.high - paired.low < (unpaired.high - unpaired.low) / 2
    assert paired.low > 0 and unpaired.low < 0


def test_perplexity() -> None:
    assert perplexity(0.0, 10) == 1.0
    assert perplexity(10 * math.log(4), 10) == pytest.approx(4.0)
    with pytest.raises(ValueError):
        perplexity(1.0, 0)
    # Token-weighted, not a mean of per-document perplexities.
    docs = [(2 * math.log(2), 2), (8 * math.log(8), 8)]
    expected = math.exp((2 * math.log(2) + 8 * math.log(8)) / 10)
    assert corpus_perplexity(docs) == pytest.approx(expected)


def test_perplexity_ci() -> None:
    rng = np.random.default_rng(7)
    docs = [(float(rng.normal(3.0, 0.3)) * 50, 50) for _ in range(80)]
    ci = perplexity_ci(docs)
    assert ci.low < ci.estimate < ci.high
    assert ci.estimate == pytest.approx(corpus_perplexity(docs))
    assert ci.n == 80
    assert perplexity_ci(docs, seed=1) == perplexity_ci(docs, seed=1)
    const = perplexity_ci([(math.log(5) * 10, 10)] * 20)
    assert const.low == pytest.approx(5.0) and const.high == pytest.approx(5.0)
    with pytest.raises(ValueError):
        perplexity_ci([])
    with pytest.raises(ValueError):
        perplexity_ci([(1.0, 0)])


def test_perplexity_ci_tolerates_empty_documents() -> None:
    docs = [(0.0, 0)] * 30 + [(20.0, 10)]
    ci = perplexity_ci(docs)
    assert math.isfinite(ci.low) and math.isfinite(ci.high)
    assert ci.estimate == pytest.approx(math.exp(2.0))


def test_paired_perplexity_diff() -> None:
    rng = np.random.default_rng(8)
    before = [(float(rng.normal(3.0, 0.3)) * 40, 40) for _ in range(60)]
    after = [(nll + 4.0, t) for nll, t in before]  # +0.1 nats/token everywhere
    diff = paired_perplexity_diff(before, after)
    assert diff.low > 0
    assert diff.estimate == pytest.approx(corpus_perplexity(after) - corpus_perplexity(before))
    none = paired_perplexity_diff(before, before)
    assert none.low == pytest.approx(0.0) and none.high == pytest.approx(0.0)
    with pytest.raises(ValueError, match="same documents"):
        paired_perplexity_diff(before, after[:-1])


def test_interval_helpers() -> None:
    iv = Interval(0.5, 0.4, 0.6, 0.95, 10)
    assert iv.excludes(0.0) and not iv.excludes(0.5)
    assert iv.to_dict() == {"estimate": 0.5, "low": 0.4, "high": 0.6, "level": 0.95, "n": 10}
    assert str(iv) == "0.5 [0.4, 0.6]"
