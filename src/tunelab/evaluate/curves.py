"""Read training curves: detect overfitting from per-step loss records.

Records are dicts with ``step`` and any of ``train_loss`` / ``val_loss`` (the trainer may log
them in the same record or in separate ones). Values that are missing, ``None`` or not finite
are ignored.

**Rule.** Let ``v_1..v_m`` be the validation losses in step order and ``v* = min v`` at
``best_step`` (earliest on ties). With ``margin = max(abs_margin, rel_margin * |v*|)``,
overfitting is *detected* when

1. after ``best_step`` there are at least ``patience`` (default 2) *consecutive* evaluations
   with ``v_j > v* + margin`` -- a single noisy evaluation, or a drift within the margin,
   is not enough; ``start_step`` is the first evaluation of the first such run; and
2. the training loss still falls: its exponential moving average
   ``s_t = beta * s_{t-1} + (1 - beta) * x_t`` (``s_0 = x_0``, ``beta = ema_beta``) at the
   last training record is below its value at ``best_step``. The EMA is used because
   per-step training loss is noisy. If training loss rises too, the curve shows instability
   (learning rate too high), not overfitting, and nothing is flagged (the message says so).
   If no training loss is logged after ``best_step``, the decision rests on validation alone.

Because ``v*`` is the global minimum, a temporary bump that later recovers to a new minimum is
not flagged. The best checkpoint to keep is ``best_step``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class OverfitFlag:
    """Outcome of :func:`detect_overfitting`. ``best_step``/``best_val_loss`` are set
    whenever any validation loss was recorded; ``start_step`` only when ``detected``."""

    detected: bool
    start_step: int | None
    best_step: int | None
    best_val_loss: float | None
    message: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def ema(values: Sequence[float], beta: float = 0.8) -> list[float]:
    """Exponential moving average ``s_t = beta * s_{t-1} + (1 - beta) * x_t``, ``s_0 = x_0``.

    Starting from the first value (rather than 0) avoids the start-up bias that would
    otherwise need a correction term.
    """
    if not 0.0 <= beta < 1.0:
        raise ValueError(f"beta must be in [0, 1), got {beta}")
    out: list[float] = []
    s = 0.0
    for i, x in enumerate(values):
        s = x if i == 0 else beta * s + (1 - beta) * x
        out.append(s)
    return out


def _series(records: Iterable[Mapping[str, Any]], key: str) -> list[tuple[int, float]]:
    # Keep the last value logged for a step, then order by step.
    by_step: dict[int, float] = {}
    for rec in records:
        value = rec.get(key)
        if value is None or rec.get("step") is None:
            continue
        value = float(value)
        if math.isfinite(value):
            by_step[int(rec["step"])] = value
    return sorted(by_step.items())


def detect_overfitting(records: Iterable[Mapping[str, Any]], *, patience: int = 2,
                       rel_margin: float = 0.01, abs_margin: float = 0.0,
                       ema_beta: float = 0.8) -> OverfitFlag:
    """Flag validation loss rising while training loss falls (rule in the module docstring)."""
    if patience < 1:
        raise ValueError(f"patience must be >= 1, got {patience}")
    records = list(records)
    val = _series(records, "val_loss")
    train = _series(records, "train_loss")
    if not val:
        return OverfitFlag(False, None, None, None, "No validation loss was recorded, so "
                           "overfitting cannot be checked; add a validation split.")

    best_idx = min(range(len(val)), key=lambda i: (val[i][1], i))
    best_step, best_val = val[best_idx]
    threshold = best_val + max(abs_margin, rel_margin * abs(best_val))

    start: int | None = None
    run_len = 0
    for i in range(best_idx + 1, len(val)):
        if val[i][1] > threshold:
            if run_len == 0:
                start = i
            run_len += 1
            if run_len >= patience:
                # Extend to the end of this run so the message reports its full length.
                j = i + 1
                while j < len(val) and val[j][1] > threshold:
                    run_len, j = run_len + 1, j + 1
                break
        else:
            start, run_len = None, 0
    else:
        start = None

    if start is None:
        if best_idx == len(val) - 1:
            message = (f"No overfitting: validation loss was still at its minimum {best_val:.4g} "
                       f"at the last evaluation (step {best_step}).")
        else:
            message = (f"No overfitting: validation loss is lowest at step {best_step} "
                       f"({best_val:.4g}) and has not stayed above it by more than the margin "
                       f"for {patience} consecutive evaluations.")
        return OverfitFlag(False, None, best_step, best_val, message)

    start_step = val[start][0]
    rise = (f"validation loss rose above its minimum {best_val:.4g} (step {best_step}) for "
            f"{run_len} consecutive evaluations from step {start_step}")
    advice = (f"Keep the checkpoint from step {best_step}, or train for fewer steps, add data, "
              "or regularise more (dropout, weight decay, a smaller LoRA rank).")

    smooth = ema([v for _, v in train], ema_beta)
    before = [i for i, (s, _) in enumerate(train) if s <= best_step]
    if not train or train[-1][0] <= best_step:
        return OverfitFlag(True, start_step, best_step, best_val,
                           f"Overfitting: {rise}; no training loss was logged after step "
                           f"{best_step}, so this rests on validation loss alone. {advice}")
    s_best = smooth[before[-1]] if before else smooth[0]
    s_end = smooth[-1]
    if s_end < s_best:
        return OverfitFlag(True, start_step, best_step, best_val,
                           f"Overfitting: {rise} while training loss kept falling (smoothed "
                           f"{s_best:.4g} -> {s_end:.4g}). {advice}")
    return OverfitFlag(False, None, best_step, best_val,
                       f"Not overfitting but unstable: {rise}, and training loss did not fall "
                       f"either (smoothed {s_best:.4g} -> {s_end:.4g}); try a lower learning "
                       f"rate. The best checkpoint is step {best_step}.")
