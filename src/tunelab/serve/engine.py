"""One base model, many LoRA adapters, and a batching worker that serves them together.

Requests arrive from any thread (the HTTP server's event loop, a benchmark, a test) through
:meth:`Engine.submit`. A background worker thread takes the first pending request, waits a
few milliseconds for more (``batch_wait_ms``), and runs everything it collected -- up to
``max_batch_size`` rows, whatever adapter each row asks for -- as **one** left-padded batch
through ``model.generate``: peft's mixed-adapter batches (``adapter_names=[...]``, with
``"__base__"`` for rows that want the plain base) apply each row's LoRA to its own rows only,
so one copy of the base weights serves every adapter. (A batch whose rows all use the same
adapter, or all the base, takes peft's plain path instead -- the same arithmetic, bit for bit,
without the per-adapter gathers.)

Per-row settings ride along inside that single ``generate`` call:

* sampling: a logits processor samples each row with its own temperature, top-p and its own
  ``torch.Generator`` (seeded from the request's ``seed``), so a seeded request gets the same
  answer whatever else shares its batch; greedy rows are left to ``generate``'s argmax;
* stopping: a stopping criterion ends each row at eos, at its own ``max_tokens``, at its own
  stop strings, or when its client went away; ``generate`` stops when every row is done;
* streaming: the same criterion sees every new token and hands each row's new text to its
  request as it is produced (holding back text that could be the start of a stop string).

Prompts are rendered exactly as :mod:`tunelab.generate` and training render them
(:func:`tunelab.generate.build_prompt`), and decoding uses the same eos, pad and
``skip_special_tokens`` rules, so a served greedy answer equals ``tunelab generate``'s.

About "the same answer batched or alone": with greedy decoding a row's tokens are the same
whatever shares its batch, up to floating point. Bit-for-bit logits are not guaranteed: CPU
BLAS picks different kernels by matrix shape (one row is a matrix-vector product, two or
three rows and four or more rows take other paths) and left padding shifts a row's positions
against the SIMD lanes of the attention reductions, so logits move in the last bits (about
1e-6 relative in fp32). Greedy tokens only change where the two best logits are closer than
that, which the tests check does not happen for their prompts.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import re
import secrets
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from tunelab.errors import ModelError, TunelabError

log = logging.getLogger(__name__)

BASE = "__base__"  # peft's name for "no adapter" in a mixed batch
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


class EngineError(TunelabError):
    """A request the engine cannot serve; ``status`` is the HTTP status the API answers."""

    status = 400
    code: str | None = None

    def __init__(self, message: str, *, status: int | None = None, code: str | None = None,
                 param: str | None = None) -> None:
        super().__init__(message)
        if status is not None:
            self.status = status
        if code is not None:
            self.code = code
        self.param = param


class UnknownModel(EngineError):
    status = 404
    code = "model_not_found"


class EngineBusy(EngineError):
    status = 503
    code = "overloaded"


def check_name(name: str) -> str:
    """An adapter name is 1-64 characters of letters, digits, ``.``, ``_``, ``-``."""
    if not isinstance(name, str) or not NAME_RE.match(name) or name == BASE:
        raise EngineError(f"invalid adapter name {name!r}: use 1-64 letters, digits, '.', '_' "
                          "or '-', starting with a letter or digit", param="name")
    return name


@dataclass
class GenRequest:
    """One generation: an already tokenized prompt and its settings."""

    model: str  # the base model id or an adapter name
    prompt_ids: list[int]
    max_tokens: int = 128
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False  # generate max_tokens whatever (benchmarks)


@dataclass
class Completion:
    text: str
    finish_reason: str  # "stop" (eos or a stop string) | "length" | "cancelled"
    prompt_tokens: int
    completion_tokens: int
    token_ids: list[int] = field(default_factory=list)  # generated, without eos


# An event sink: called from the worker thread with ("delta", str), ("done", Completion)
# or ("error", Exception). It must not block (the asyncio side hands it to its loop).
Sink = Callable[[str, Any], None]


class Handle:
    """A submitted request: cancel it, or wait for its completion (for callers without a sink)."""

    def __init__(self, request: GenRequest, adapter: str, sink: Sink | None) -> None:
        self.request = request
        self.adapter = adapter
        self._sink = sink
        self._cancelled = threading.Event()
        self._done = threading.Event()
        self.result: Completion | None = None
        self.error: BaseException | None = None
        self.submitted = time.perf_counter()

    def cancel(self) -> None:
        """Stop generating for this request (its row finishes at the next token)."""
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def wait(self, timeout: float | None = None) -> Completion:
        if not self._done.wait(timeout):
            raise TimeoutError("generation did not finish in time")
        if self.error is not None:
            raise self.error
        assert self.result is not None
        return self.result

    def _send(self, kind: str, payload: Any) -> None:
        if self._sink is None:
            return
        try:
            self._sink(kind, payload)
        except Exception:  # noqa: BLE001 - e.g. the client's event loop is gone
            log.debug("dropping a %s event for a request whose client went away", kind)
            self._cancelled.set()

    def _emit_delta(self, text: str) -> None:
        if text:
            self._send("delta", text)

    def _finish(self, result: Completion) -> None:
        self.result = result
        self._done.set()
        self._send("done", result)

    def _fail(self, exc: BaseException) -> None:
        self.error = exc
        self._done.set()
        self._send("error", exc)


def _held_back(text: str, stops: tuple[str, ...]) -> int:
    """How many trailing characters could still turn out to be part of a stop string
    (or of a multi-byte character still being decoded), so must not be streamed yet."""
    hold = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), 0, -1):
            if text.endswith(stop[:k]):
                hold = max(hold, k)
                break
    tail = len(text) - len(text.rstrip("\ufffd"))
    return max(hold, tail)


def cut_at_stop(text: str, stops: tuple[str, ...]) -> tuple[str, bool]:
    cut = min((text.find(s) for s in stops if s and s in text), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


class _Row:
    def __init__(self, handle: Handle, device: torch.device) -> None:
        self.handle = handle
        req = handle.request
        self.tokens: list[int] = []
        self.sent = ""  # text already streamed
        self.done = False
        self.greedy = req.temperature <= 0
        self.generator: torch.Generator | None = None
        if not self.greedy:
            seed = req.seed if req.seed is not None else secrets.randbits(63)
            self.generator = torch.Generator(device=device).manual_seed(int(seed) & (2**63 - 1))


class _BatchState:
    """Per-row sampling and stopping for one ``generate`` call over a mixed batch."""

    def __init__(self, rows: list[_Row], tokenizer: Any, eos_id: int, decode_lock: Any) -> None:
        self.rows = rows
        self.tokenizer = tokenizer
        self.eos_id = eos_id
        self.decode_lock = decode_lock

    # -- LogitsProcessor: runs before generate's argmax -------------------------------
    def sample(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        for i, row in enumerate(self.rows):
            if row.done or row.greedy:
                continue
            req = row.handle.request
            logits = scores[i].float() / req.temperature
            if req.top_p < 1.0:
                sorted_logits, order = logits.sort(descending=True)
                probs = sorted_logits.softmax(-1)
                # drop tokens once the mass before them already reaches top_p (keeps >= 1)
                drop = (probs.cumsum(-1) - probs) >= req.top_p
                sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
                logits = torch.full_like(logits, float("-inf")).scatter(0, order, sorted_logits)
            token = torch.multinomial(logits.softmax(-1), 1, generator=row.generator)
            scores[i] = float("-inf")
            scores[i, token] = 0.0  # argmax now picks the sampled token
        return scores

    # -- StoppingCriteria: sees each new token ------------------------------------------
    def step(self, input_ids: torch.LongTensor, scores: Any = None, **_: Any) -> torch.BoolTensor:
        new = input_ids[:, -1].tolist()
        for i, row in enumerate(self.rows):
            if row.done:
                continue
            if row.handle.cancelled:
                self._finish(row, "cancelled")
                continue
            token = new[i]
            req = row.handle.request
            if token == self.eos_id and not req.ignore_eos:
                self._finish(row, "stop")
                continue
            row.tokens.append(token)
            text = self._decode(row.tokens)
            cut, stopped = cut_at_stop(text, req.stop)
            if stopped:
                self._finish(row, "stop", cut)
            elif len(row.tokens) >= req.max_tokens:
                self._finish(row, "length", text)
            else:
                self._stream(row, text)
        return torch.tensor([row.done for row in self.rows], dtype=torch.bool,
                            device=input_ids.device)

    def _decode(self, tokens: list[int]) -> str:
        with self.decode_lock:
            return self.tokenizer.decode(tokens, skip_special_tokens=True)

    def _stream(self, row: _Row, text: str) -> None:
        safe = text[: len(text) - _held_back(text, row.handle.request.stop)]
        if len(safe) > len(row.sent) and safe.startswith(row.sent):
            row.handle._emit_delta(safe[len(row.sent):])
            row.sent = safe

    def _finish(self, row: _Row, reason: str, text: str | None = None) -> None:
        row.done = True
        if text is None:
            text = self._decode(row.tokens) if row.tokens else ""
            text, _ = cut_at_stop(text, row.handle.request.stop)
        if text.startswith(row.sent):
            row.handle._emit_delta(text[len(row.sent):])
        row.sent = text
        row.handle._finish(Completion(text=text, finish_reason=reason,
                                      prompt_tokens=len(row.handle.request.prompt_ids),
                                      completion_tokens=len(row.tokens),
                                      token_ids=list(row.tokens)))

    def finish_all(self, reason: str = "length") -> None:
        for row in self.rows:
            if not row.done:
                self._finish(row, reason)


def _as_processor(state: _BatchState) -> Any:
    from transformers import LogitsProcessor

    class _Sampler(LogitsProcessor):
        def __call__(self, input_ids, scores):  # noqa: D401 - transformers' signature
            return state.sample(input_ids, scores)

    return _Sampler()


def _as_criterion(state: _BatchState) -> Any:
    from transformers import StoppingCriteria

    class _Tracker(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            return state.step(input_ids, scores, **kwargs)

    return _Tracker()


@dataclass
class EngineStats:
    batches: int = 0
    rows: int = 0
    max_batch_rows: int = 0
    mixed_batches: int = 0  # batches whose rows used more than one adapter (or base + adapter)
    generated_tokens: int = 0
    busy_seconds: float = 0.0
    adapters_per_batch: list[int] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"batches": self.batches, "rows": self.rows,
                "max_batch_rows": self.max_batch_rows, "mixed_batches": self.mixed_batches,
                "generated_tokens": self.generated_tokens,
                "busy_seconds": round(self.busy_seconds, 3)}


def default_model_id(spec: str) -> str:
    """The id clients use for the base: the alias, or the folder / file name."""
    from tunelab.models import ALIASES

    if spec.lower() in ALIASES:
        return spec.lower()
    path = Path(spec)
    name = path.stem if path.suffix.lower() == ".gguf" else path.name or spec
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-.") or "base"
    return name[:64]


class Engine:
    """A base model with named LoRA adapters and a batching worker thread.

    ``max_batch_size`` bounds the rows of one ``generate`` call; ``batch_wait_ms`` is how long
    the worker waits after the first request for others to join it; ``max_queue`` bounds the
    requests waiting (beyond it :meth:`submit` raises :class:`EngineBusy`).
    """

    def __init__(self, model: torch.nn.Module, tokenizer: Any, *, base_name: str = "base",
                 max_batch_size: int = 32, batch_wait_ms: float = 5.0, max_queue: int = 1024,
                 context_length: int | None = None, base_bits: int = 16) -> None:
        if max_batch_size < 1:
            raise ValueError("max_batch_size must be >= 1")
        self.base_bits = base_bits  # what adapters are checked against
        self.model = model
        self.model.eval()
        self.tokenizer = tokenizer
        self.base_name = check_name(base_name)
        self.max_batch_size = max_batch_size
        self.batch_wait = batch_wait_ms / 1000.0
        self.max_queue = max_queue
        config = getattr(model, "config", None)
        self.context_length = context_length or getattr(config, "max_position_embeddings",
                                                        None) or 2048
        self.device = next(model.parameters()).device
        self.adapters: dict[str, str] = {}  # name -> folder
        self.stats = EngineStats()
        self._queue: queue.Queue[Handle | None] = queue.Queue()
        self._model_lock = threading.Lock()  # generation vs loading / unloading adapters
        self._tok_lock = threading.Lock()  # the Rust tokenizer is not shared across threads
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        # peft names are adapter names; a model already wrapped by peft brings its own
        for name, cfg in (getattr(model, "peft_config", None) or {}).items():
            self.adapters[check_name(name)] = str(getattr(cfg, "path", "") or "")

    # ------------------------------------------------------------------ construction

    @classmethod
    def load(cls, model_spec: str, adapters: Iterable[tuple[str, str]] = (), *,
             name: str | None = None, device: str = "auto", dtype: str = "auto",
             allow_pickle: bool = False, trust_remote_code: bool = False, bits: int = 16,
             **engine_kwargs: Any) -> Engine:
        """Load the base (``tunelab.models.load_model``) and each ``(name, folder)`` adapter."""
        from tunelab import models

        model, tokenizer = models.load_model(model_spec, device=device, dtype=dtype,
                                             allow_pickle=allow_pickle,
                                             trust_remote_code=trust_remote_code, bits=bits,
                                             generation_only=True)
        engine = cls(model, tokenizer, base_name=name or default_model_id(model_spec),
                     base_bits=bits, **engine_kwargs)
        for adapter_name, path in adapters:
            engine.load_adapter(adapter_name, path)
        return engine

    # --------------------------------------------------------------------- lifecycle

    def start(self) -> Engine:
        if self._thread is None or not self._thread.is_alive():
            self._stopping.clear()
            self._thread = threading.Thread(target=self._worker, name="tunelab-batcher",
                                            daemon=True)
            self._thread.start()
        return self

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def close(self, timeout: float = 30.0) -> None:
        """Stop the worker; requests still waiting fail with :class:`EngineBusy`."""
        self._stopping.set()
        self._queue.put(None)
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        while True:
            try:
                handle = self._queue.get_nowait()
            except queue.Empty:
                break
            if handle is not None:
                handle._fail(EngineBusy("the server is shutting down"))

    def __enter__(self) -> Engine:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ---------------------------------------------------------------------- models

    @property
    def model_ids(self) -> list[str]:
        return [self.base_name, *self.adapters]

    def adapter_for(self, model_id: str) -> str:
        """peft's adapter name for a model id (``__base__`` for the base)."""
        if model_id == self.base_name:
            return BASE
        if model_id in self.adapters:
            return model_id
        raise UnknownModel(f"The model '{model_id}' does not exist; available: "
                           f"{', '.join(self.model_ids)}", param="model")

    def load_adapter(self, name: str, path: str | Path) -> str:
        """Attach a LoRA adapter folder under ``name`` (waits for the running batch)."""
        from tunelab import adapters as tl_adapters

        check_name(name)
        if name == self.base_name or name in self.adapters:
            raise EngineError(f"a model named '{name}' is already loaded", status=409,
                              code="model_exists", param="name")
        folder = tl_adapters.resolve_adapter_dir(path)
        _check_servable(folder)
        meta = tl_adapters.adapter_meta(folder)
        served_bits = self.base_bits
        if int(meta.get("base_bits", 16)) != served_bits:
            log.warning("adapter %s was trained on a %s-bit base; serving it on this %s-bit "
                        "base changes its outputs slightly", name, meta["base_bits"],
                        served_bits)
        with self._model_lock:
            self.model = tl_adapters.load_adapter(self.model, folder, name=name)
            self.model.eval()
            self.adapters[name] = str(folder)
        log.info("adapter '%s' loaded from %s", name, folder)
        return str(folder)

    def unload_adapter(self, name: str) -> None:
        if name not in self.adapters:
            raise UnknownModel(f"no adapter named '{name}' is loaded", param="name")
        with self._model_lock:
            if len(self.adapters) == 1:
                # peft cannot run with zero adapters: take the LoRA layers out altogether
                self.model = self.model.unload()
            else:
                self.model.delete_adapter(name)
            self.model.eval()
            del self.adapters[name]
        log.info("adapter '%s' unloaded", name)

    # ------------------------------------------------------------------- requests

    def tokenize(self, text: str) -> list[int]:
        with self._tok_lock:
            return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def render_chat(self, messages: list[dict[str, str]]) -> str:
        from tunelab.generate import build_prompt

        with self._tok_lock:
            try:
                return build_prompt(self.tokenizer, messages)
            except Exception as exc:  # jinja's TemplateError and friends: the messages' fault
                raise EngineError(f"the chat template cannot render these messages: {exc}",
                                  param="messages") from None

    def submit(self, request: GenRequest, sink: Sink | None = None) -> Handle:
        """Queue a request; thread-safe. ``sink`` receives its events from the worker."""
        adapter = self.adapter_for(request.model)
        if not request.prompt_ids:
            raise EngineError("the prompt is empty", param="prompt")
        if request.max_tokens < 1:
            raise EngineError("max_tokens must be at least 1", param="max_tokens")
        total = len(request.prompt_ids) + request.max_tokens
        if total > self.context_length:
            raise EngineError(
                f"This model's maximum context length is {self.context_length} tokens; the "
                f"request needs {total} ({len(request.prompt_ids)} in the prompt, "
                f"{request.max_tokens} to generate)", code="context_length_exceeded",
                param="max_tokens")
        if self._queue.qsize() >= self.max_queue:
            raise EngineBusy(f"too many requests waiting ({self.max_queue}); retry later")
        if not self.running:
            raise EngineBusy("the engine is not running")
        handle = Handle(request, adapter, sink)
        self._queue.put(handle)
        return handle

    def generate(self, requests: list[GenRequest], timeout: float | None = None
                 ) -> list[Completion]:
        """Submit several requests at once (they share batches) and wait for all of them."""
        handles = [self.submit(r) for r in requests]
        return [h.wait(timeout) for h in handles]

    # --------------------------------------------------------------------- worker

    def _collect(self) -> list[Handle] | None:
        first = self._queue.get()
        if first is None:
            return None
        batch = [first]
        deadline = time.perf_counter() + self.batch_wait
        while len(batch) < self.max_batch_size:
            remaining = deadline - time.perf_counter()
            try:
                item = self._queue.get(timeout=remaining) if remaining > 0 \
                    else self._queue.get_nowait()
            except queue.Empty:
                break
            if item is None:
                self._queue.put(None)  # let the loop see the stop marker after this batch
                break
            batch.append(item)
        return batch

    def _worker(self) -> None:
        while not self._stopping.is_set():
            batch = self._collect()
            if batch is None:
                break
            live = []
            for handle in batch:
                if handle.cancelled:
                    handle._finish(Completion("", "cancelled", len(handle.request.prompt_ids), 0))
                else:
                    live.append(handle)
            if not live:
                continue
            try:
                with self._model_lock:
                    self._run_batch(live)
            except BaseException as exc:  # noqa: BLE001 - every waiting client gets told
                log.exception("generation failed for a batch of %d", len(live))
                for handle in live:
                    if not handle._done.is_set():
                        handle._fail(exc)

    @torch.no_grad()
    def _run_batch(self, handles: list[Handle]) -> None:
        from transformers import LogitsProcessorList, StoppingCriteriaList

        ready = []
        for handle in handles:  # an adapter may have been unloaded while the request waited
            if handle.adapter != BASE and handle.adapter not in self.adapters:
                handle._fail(UnknownModel(f"the model '{handle.request.model}' was unloaded"))
            else:
                ready.append(handle)
        if not ready:
            return
        started = time.perf_counter()
        tok = self.tokenizer
        pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        width = max(len(h.request.prompt_ids) for h in ready)
        input_ids = torch.full((len(ready), width), pad_id, dtype=torch.long)
        attention = torch.zeros((len(ready), width), dtype=torch.long)
        for i, handle in enumerate(ready):  # left padding, as tunelab.generate
            ids = handle.request.prompt_ids
            input_ids[i, width - len(ids):] = torch.tensor(ids, dtype=torch.long)
            attention[i, width - len(ids):] = 1
        rows = [_Row(h, self.device) for h in ready]
        state = _BatchState(rows, tok, tok.eos_token_id, self._tok_lock)
        kwargs: dict[str, Any] = {
            "max_new_tokens": max(h.request.max_tokens for h in ready),
            "pad_token_id": pad_id, "eos_token_id": tok.eos_token_id,
            "do_sample": False, "temperature": None, "top_p": None, "top_k": None,
            "logits_processor": LogitsProcessorList([_as_processor(state)]),
            "stopping_criteria": StoppingCriteriaList([_as_criterion(state)]),
        }
        if any(h.request.ignore_eos for h in ready):
            kwargs["eos_token_id"] = None  # the rows' own criterion stops the others at eos
        names = [h.adapter for h in ready]
        context: Any = contextlib.nullcontext()
        if self.adapters:
            if len(set(names)) > 1:
                kwargs["adapter_names"] = names  # peft's mixed-adapter batch
            elif names[0] == BASE:  # one kind of row: peft's plain paths are a little faster
                context = self.model.disable_adapter()
            else:
                self.model.set_adapter(names[0])
        stats = self.stats  # counted before generating: clients may read them once answered
        stats.batches += 1
        stats.rows += len(ready)
        stats.max_batch_rows = max(stats.max_batch_rows, len(ready))
        stats.mixed_batches += len(set(names)) > 1
        self.model.eval()
        try:
            with context:
                self.model.generate(input_ids=input_ids.to(self.device),
                                    attention_mask=attention.to(self.device), **kwargs)
            state.finish_all("length")
        finally:
            stats.generated_tokens += sum(len(r.tokens) for r in rows)
            stats.busy_seconds += time.perf_counter() - started


def _check_servable(folder: Path) -> None:
    """peft's mixed-adapter batches take plain LoRA only (no DoRA)."""
    import json

    config = json.loads((folder / "adapter_config.json").read_text())
    if config.get("peft_type", "LORA").upper() != "LORA":
        raise ModelError(f"{folder}: only LoRA adapters can be served (got "
                         f"{config.get('peft_type')})")
    if config.get("use_dora"):
        raise ModelError(f"{folder}: DoRA adapters cannot share a batch with other adapters; "
                         "merge it (tunelab merge) and serve the merged model instead")
