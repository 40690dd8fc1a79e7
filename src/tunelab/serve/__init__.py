"""``tunelab serve``: many LoRA adapters on one base behind an OpenAI-compatible HTTP API.

:mod:`tunelab.serve.engine` holds the model, the adapters and the batching worker;
:mod:`tunelab.serve.app` is the FastAPI app; :mod:`tunelab.serve.cli` the command.
"""

from tunelab.serve.engine import BASE, Completion, Engine, GenRequest

__all__ = ["BASE", "Completion", "Engine", "GenRequest", "create_app"]


def create_app(*args, **kwargs):
    """See :func:`tunelab.serve.app.create_app` (imported lazily: it needs fastapi)."""
    from tunelab.serve.app import create_app as _create_app

    return _create_app(*args, **kwargs)
