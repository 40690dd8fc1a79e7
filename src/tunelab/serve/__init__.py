"""``tunelab serve``: many LoRA adapters on one base behind an OpenAI-compatible HTTP API.

:mod:`tunelab.serve.engine` holds the model, the adapters and the batching worker;
:mod:`tunelab.serve.app` is the FastAPI app; :mod:`tunelab.serve.cli` the command.
Names are imported lazily, so registering the command does not import torch or fastapi.
"""

from __future__ import annotations

from typing import Any

__all__ = ["BASE", "Completion", "Engine", "GenRequest", "create_app"]


def __getattr__(name: str) -> Any:
    if name == "create_app":
        from tunelab.serve.app import create_app

        return create_app
    if name in __all__:
        from tunelab.serve import engine

        return getattr(engine, name)
    raise AttributeError(f"module 'tunelab.serve' has no attribute {name!r}")
