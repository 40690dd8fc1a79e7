"""Smoke test on the real SmolLM2: base and two adapters in one batch, over the openai client
(the tiny-model tests check the answers against ``tunelab generate``)."""

from __future__ import annotations

import asyncio

import pytest

from tests.serve.conftest import live_server, make_random_adapter
from tests.serve.test_serve_batching import ask_all, margins_and_deviation

pytestmark = pytest.mark.slow


def test_smollm2_mixed_batch_equals_requests_alone(tmp_path):
    from tunelab import models
    from tunelab.serve.app import create_app
    from tunelab.serve.engine import Engine

    base_dir = models.local_folder(models.resolve_model("smollm2-135m"))
    lora = {name: make_random_adapter(base_dir, tmp_path / name, seed, "all-linear", 8,
                                      std=0.05) for name, seed in (("x", 1), ("y", 2))}
    engine = Engine.load("smollm2-135m", [(n, str(p)) for n, p in lora.items()],
                         device="cpu", batch_wait_ms=50)
    reqs = [{"model": m, "text": "What is the capital of France?", "max_tokens": 10,
             "temperature": 0.0, "seed": None, "stream": m == "y"}
            for m in ("smollm2-135m", "x", "y")]
    with live_server(create_app(engine)) as url:
        alone = [asyncio.run(ask_all(url, [r]))[0] for r in reqs]
        together = asyncio.run(ask_all(url, reqs))
    assert together == alone
    assert engine.stats.mixed_batches >= 1
    assert len({a[0] for a in alone}) == 3  # base and both adapters answer differently
    margin, deviation = margins_and_deviation(engine, reqs, alone)
    assert margin > 10 * deviation, (margin, deviation)
