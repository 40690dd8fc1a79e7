"""Overfitting detection on synthetic loss curves."""

from __future__ import annotations

import math

import numpy as np
import pytest

from tunelab.evaluate import detect_overfitting, ema


def _train(steps: range, noise: float = 0.0, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [{"step": s, "train_loss": 2.0 * math.exp(-s / 300) + 0.2
             + float(rng.normal(0, noise))} for s in steps]


def _val(values: list[float], every: int = 100) -> list[dict]:
    return [{"step": every * (i + 1), "val_loss": v} for i, v in enumerate(values)]


def test_ema() -> None:
    assert ema([]) == []
    assert ema([1.0, 1.0, 1.0]) == [1.0, 1.0, 1.0]
    assert ema([0.0, 10.0], beta=0.5) == [0.0, 5.0]
    with pytest.raises(ValueError):
        ema([1.0], beta=1.0)


def test_clean_decreasing_curve_not_flagged() -> None:
    records = _train(range(0, 1001, 10)) + _val([2.0, 1.6, 1.3, 1.1, 1.0, 0.95, 0.92, 0.9,
                                                 0.89, 0.88])
    flag = detect_overfitting(records)
    assert not flag.detected and flag.start_step is None
    assert flag.best_step == 1000 and flag.best_val_loss == 0.88
    assert "still at its minimum" in flag.message


def test_rising_val_flagged_with_start_and_best() -> None:
    records = _train(range(0, 1001, 10)) + _val([2.0, 1.5, 1.2, 1.0, 0.9, 0.95, 1.0, 1.1,
                                                 1.2, 1.3])
    flag = detect_overfitting(records)
    assert flag.detected
    assert flag.best_step == 500 and flag.best_val_loss == 0.9
    assert flag.start_step == 600
    assert "Overfitting" in flag.message and "step 500" in flag.message
    assert flag.to_dict()["detected"] is True


def test_single_noisy_bump_not_flagged() -> None:
    # One evaluation above the minimum, then back down: noise, not overfitting.
    records = _train(range(0, 1001, 10), noise=0.02) + _val([2.0, 1.5, 1.2, 1.3, 1.1, 1.0, 0.95,
                                                             0.93, 0.97, 0.92])
    assert not detect_overfitting(records).detected


def test_rise_within_margin_not_flagged() -> None:
    records = _train(range(0, 601, 10)) + _val([1.0, 0.9, 0.902, 0.905, 0.904, 0.906])
    flag = detect_overfitting(records)  # within 1% of the minimum
    assert not flag.detected and flag.best_step == 200
    assert detect_overfitting(records, rel_margin=0.0).detected


def test_patience() -> None:
    records = _train(range(0, 601, 10)) + _val([1.0, 0.9, 0.8, 0.7, 0.75, 0.8])
    assert detect_overfitting(records, patience=2).detected
    flag = detect_overfitting(records, patience=3)
    assert not flag.detected and flag.best_step == 400


def test_run_broken_by_noise_restarts() -> None:
    # Above, within the margin, then above twice: the qualifying run starts at step 800.
    records = _train(range(0, 1001, 10)) + _val([1.5, 1.2, 1.0, 0.9, 0.8, 0.9, 0.805, 0.9,
                                                 0.95, 1.0])
    flag = detect_overfitting(records)
    assert flag.detected and flag.start_step == 800 and flag.best_step == 500


def test_noisy_train_loss_still_falling() -> None:
    records = _train(range(0, 1001, 5), noise=0.15, seed=3) + _val(
        [2.0, 1.5, 1.2, 1.0, 0.9, 0.95, 1.0, 1.1, 1.2, 1.3])
    assert detect_overfitting(records).detected


def test_both_rising_is_instability_not_overfitting() -> None:
    train = [{"step": s, "train_loss": 1.0 if s <= 500 else 1.0 + (s - 500) / 200}
             for s in range(0, 1001, 10)]
    records = train + _val([2.0, 1.5, 1.2, 1.0, 0.9, 0.95, 1.0, 1.1, 1.2, 1.3])
    flag = detect_overfitting(records)
    assert not flag.detected and flag.best_step == 500
    assert "unstable" in flag.message and "learning rate" in flag.message


def test_no_validation_loss() -> None:
    flag = detect_overfitting(_train(range(0, 100, 10)))
    assert not flag.detected and flag.best_step is None
    assert "No validation loss" in flag.message
    assert not detect_overfitting([]).detected


def test_combined_records_and_bad_values() -> None:
    # Train and val in the same records, plus None/NaN entries and unsorted steps.
    vals = {100: 1.0, 200: 0.8, 300: 0.9, 400: 1.0, 500: 1.1}
    records = [{"step": s, "train_loss": 1.0 - s / 1000, "val_loss": vals.get(s)}
               for s in range(500, -1, -50)]
    records.append({"step": 250, "val_loss": float("nan")})
    records.append({"val_loss": 0.1})  # no step: ignored
    flag = detect_overfitting(records)
    assert flag.detected and flag.best_step == 200 and flag.start_step == 300


def test_validation_only_when_train_stops_early() -> None:
    records = _train(range(0, 301, 10)) + _val([1.0, 0.9, 0.8, 0.85, 0.9, 1.0])
    flag = detect_overfitting(records)
    assert flag.detected and "validation loss alone" in flag.message
