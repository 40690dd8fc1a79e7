"""What the side-by-side benchmarks share: the LoRA shape, the peak-RSS reading and the
training-loop clock for HF trainers (TRL, the plain Trainer).

Imported by ``train_throughput.py``, ``dpo_throughput.py`` and ``train_levers.py``, which
put this folder on ``sys.path``.
"""

from __future__ import annotations

import time
from typing import Any

# LoRA r=16, alpha 32, no dropout, all linear layers: the same for every system measured
LORA = {"r": 16, "alpha": 32.0, "dropout": 0.0}


def peak_rss_bytes() -> int:
    """This process's peak RSS, read as tunelab's own runs report it."""
    import torch

    from tunelab.memory import peak_memory_bytes

    return peak_memory_bytes(torch.device("cpu"))


def timed_train(trainer: Any) -> float:
    """Run ``trainer.train()`` and return the loop's wall time only (from the train-begin to
    the train-end callback: model loading, data preparation and saving left out)."""
    from transformers import TrainerCallback

    marks: dict[str, float] = {}

    class Clock(TrainerCallback):
        def on_train_begin(self, *a: Any, **k: Any) -> None:
            marks["begin"] = time.perf_counter()

        def on_train_end(self, *a: Any, **k: Any) -> None:
            marks["end"] = time.perf_counter()

    trainer.add_callback(Clock())
    trainer.train()
    return marks["end"] - marks["begin"]
