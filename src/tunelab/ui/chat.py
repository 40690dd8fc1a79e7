"""The chat page's model: one base and the workspace's LoRA adapters in a serve Engine.

The same :class:`tunelab.serve.engine.Engine` as ``tunelab serve``: one copy of the base
weights, each adapter attached by its run name, and a batching worker, so the base and
several adapters answering the same prompt side by side run as one mixed batch. Prompts
are rendered with the chat template exactly as training renders them.

The engine is loaded on the first chat request (seconds to minutes, so never at server
start) and kept; choosing another base replaces it. An adapter is reloaded when its files
changed on disk (a resumed run writes a new one under the same name).
"""

from __future__ import annotations

import gc
import logging
import threading
import time
from pathlib import Path
from typing import Any

from tunelab.errors import ModelError, TunelabError
from tunelab.ui.forms import FieldError

log = logging.getLogger(__name__)

BASE_ID = "base"
MAX_COLUMNS = 8
MAX_TOKENS = 1024


def _adapter_stamp(folder: Path) -> float:
    weights = folder / "adapter_model.safetensors"
    return weights.stat().st_mtime if weights.is_file() else 0.0


class ChatService:
    """Lazily loaded engine for one base model; thread-safe."""

    def __init__(self, root: Path, *, device: str = "auto") -> None:
        self.root = root
        self.device = device
        self._engine: Any = None
        self._base: str | None = None
        self._stamps: dict[str, float] = {}
        self._lock = threading.Lock()  # loading the base / adapters vs other chat requests

    @property
    def base(self) -> str | None:
        return self._base

    def adapters(self) -> list[dict[str, Any]]:
        """LoRA adapters of the workspace's runs (full fine-tunes are not served here)."""
        from tunelab.adapters import adapter_meta
        from tunelab.ui.forms import RUN_NAME_RE

        out = []
        for folder in sorted(self.root.iterdir()):
            adapter = folder / "adapter"
            if not RUN_NAME_RE.match(folder.name) or not (adapter / "adapter_config.json"
                                                          ).is_file():
                continue
            try:
                meta = adapter_meta(adapter)
            except (OSError, ValueError, TunelabError):
                meta = {}
            out.append({"name": folder.name, "base_model": meta.get("base_model"),
                        "method": meta.get("method", "lora")})
        return out

    def close(self) -> None:
        with self._lock:
            self._unload()

    def _unload(self) -> None:
        if self._engine is not None:
            self._engine.close()
            self._engine = None
            self._base = None
            self._stamps = {}
            gc.collect()

    def _ensure(self, base: str, adapters: list[str]) -> Any:
        """The engine for ``base`` with ``adapters`` loaded (caller holds the lock)."""
        from tunelab.serve.engine import Engine

        if self._engine is None or self._base != base:
            self._unload()
            try:
                self._engine = Engine.load(base, name=BASE_ID, device=self.device).start()
            except ModelError as exc:
                raise FieldError.one("model", str(exc)) from None
            except (OSError, ValueError) as exc:
                raise FieldError.one("model", f"cannot load '{base}': {exc}") from None
            self._base = base
        engine = self._engine
        for name in adapters:
            folder = self.root / name / "adapter"
            if not (folder / "adapter_config.json").is_file():
                raise FieldError.one("columns", f"run '{name}' has no LoRA adapter (still "
                                     "training, or a full fine-tune)")
            stamp = _adapter_stamp(folder)
            if name in engine.adapters and self._stamps.get(name) != stamp:
                engine.unload_adapter(name)  # retrained or resumed since it was loaded
            if name not in engine.adapters:
                try:
                    engine.load_adapter(name, folder)
                except TunelabError as exc:
                    raise FieldError.one("columns", f"cannot load run '{name}' on base "
                                         f"'{base}': {exc}") from None
                except (RuntimeError, ValueError) as exc:  # shape mismatch: another base
                    raise FieldError.one("columns", f"run '{name}' was not trained on "
                                         f"'{base}': {str(exc).splitlines()[0]}") from None
                self._stamps[name] = stamp
        return engine

    def reply(self, base: str, columns: list[dict[str, Any]], *, max_new_tokens: int = 128,
              temperature: float = 0.0, seed: int | None = None) -> list[dict[str, Any]]:
        """One reply per column; each column is ``{"model": "base" | RUN, "messages": [...]}``.
        All columns go to the engine at once, so they share one batch."""
        from tunelab.serve.engine import EngineError, GenRequest

        if not columns:
            raise FieldError.one("columns", "pick the base and/or at least one adapter")
        if len(columns) > MAX_COLUMNS:
            raise FieldError.one("columns", f"at most {MAX_COLUMNS} models side by side")
        names = [c.get("model") for c in columns]
        adapters = [n for n in names if n != BASE_ID]
        for name in adapters:
            if not isinstance(name, str) or not (self.root / name / "adapter").is_dir():
                raise FieldError.one("columns", f"no adapter named {name!r} in the workspace")
        for c in columns:
            messages = c.get("messages")
            if not isinstance(messages, list) or not messages or not all(
                    isinstance(m, dict) and m.get("role") in ("system", "user", "assistant")
                    and isinstance(m.get("content"), str) for m in messages):
                raise FieldError.one("prompt", "each column needs a list of {role, content} "
                                     "messages")
            if messages[-1]["role"] != "user" or not messages[-1]["content"].strip():
                raise FieldError.one("prompt", "type a message first")
        with self._lock:
            engine = self._ensure(base, adapters)
            handles = []
            try:
                for c in columns:
                    prompt = engine.render_chat(c["messages"])
                    request = GenRequest(model=c["model"], prompt_ids=engine.tokenize(prompt),
                                         max_tokens=max_new_tokens, temperature=temperature,
                                         seed=seed)
                    handles.append(engine.submit(request))
            except EngineError as exc:
                for h in handles:
                    h.cancel()
                field = "max_new_tokens" if exc.param == "max_tokens" else "prompt"
                raise FieldError.one(field, str(exc)) from None
            started = time.perf_counter()
            replies = []
            for c, handle in zip(columns, handles, strict=True):
                done = handle.wait()
                replies.append({"model": c["model"], "text": done.text,
                                "finish_reason": done.finish_reason,
                                "prompt_tokens": done.prompt_tokens,
                                "completion_tokens": done.completion_tokens,
                                "seconds": round(time.perf_counter() - started, 3)})
        return replies
