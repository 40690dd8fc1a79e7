"""The ``tunelab ui`` web app: a FastAPI app (the same stack as ``tunelab serve``) serving a
plain HTML/JS/CSS page from ``static/`` and a JSON API under ``/api``.

Pages (one document, tabs): model and data, plan, train, compare, chat. Every API error is
``{"errors": [{"field", "message", ...}]}`` with the name of the form field it is about, so
the page can put the message next to that field.

Routes::

    GET  /api/info                       devices, GPUs, aliases, workspace
    POST /api/model                      check a model spec: kind, licence, size
    PUT  /api/uploads/{filename}         upload a data file (raw body) into WORKSPACE/uploads
    GET  /api/uploads                    the uploaded files
    POST /api/data/inspect               format, rendered examples, lengths, errors
    POST /api/plan                       memory, fit, time and licence (tunelab.plan)
    GET  /api/runs                       the workspace's runs
    POST /api/runs                       start a training run
    GET  /api/runs/{name}?since=STEP     a run: state, metrics, tokens/s, ETA, memory, log
    POST /api/runs/{name}/stop|resume
    POST /api/runs/{name}/compare        start tunelab compare on the run
    GET  /api/runs/{name}/compare        its state, table and verdict
    POST /api/runs/{name}/compare/stop
    GET  /runs/{name}/report.html, /runs/{name}/compare/report.html
    GET  /api/chat                       adapters that can chat; POST /api/chat  replies

Safety: the server binds to 127.0.0.1 by default. Because it starts processes and reads
files, requests are refused unless their ``Host`` is this machine (a page on another site
cannot reach it through DNS rebinding), and every request that changes something needs the
``X-Tunelab-UI`` header, which a cross-site form or ``fetch`` cannot send without a CORS
preflight that this server never approves.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import tempfile
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from tunelab.data import SUFFIXES
from tunelab.errors import TunelabError
from tunelab.ui import forms
from tunelab.ui.chat import MAX_TOKENS, ChatService
from tunelab.ui.forms import FieldError, error_body
from tunelab.ui.jobs import COMPARE_DIR, UPLOADS, Jobs

log = logging.getLogger(__name__)

STATIC = Path(__file__).resolve().parent / "static"
UI_HEADER = "x-tunelab-ui"
LOOPBACK = ("127.0.0.1", "localhost", "::1")
MAX_JSON_BYTES = 1 << 20
DEFAULT_MAX_UPLOAD = 1 << 30
# Everything from this server, nothing inline: a script injected through data shown on the
# page could not run, and nothing can load from anywhere else.
CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
       "connect-src 'self'; frame-src 'self'; frame-ancestors 'self'; base-uri 'none'; "
       "form-action 'none'")
# The reports are self-contained files with their own inline <style> and no script.
REPORT_CSP = "default-src 'none'; style-src 'unsafe-inline'; img-src data:; frame-ancestors 'self'"
_UPLOAD_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._ -]{0,127}$")


def _host_of(header: str) -> str:
    host = header.strip().lower()
    if host.startswith("["):  # [::1]:8000
        return host[1:].split("]", 1)[0]
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def default_gpu() -> str:
    """The planner's device for this machine: the CUDA GPU by name or memory, else cpu."""
    import torch

    from tunelab.plan import GPUS

    if not torch.cuda.is_available():
        return "cpu"
    name = torch.cuda.get_device_name(0).lower()
    for gpu in GPUS:
        if gpu.key in name.replace(" ", "") and not gpu.key.endswith("gb"):
            return gpu.key
    memory = torch.cuda.get_device_properties(0).total_memory
    generic = [g for g in GPUS if g.key.endswith("gb") and g.memory_bytes <= memory * 1.02]
    return max(generic, key=lambda g: g.memory_bytes).key if generic else "16gb"


class TokenizerCache:
    """Tokenizers by model spec: the data page re-renders on every change."""

    def __init__(self) -> None:
        import threading

        self._items: dict[str, Any] = {}
        self._lock = threading.Lock()

    def get(self, spec: str) -> Any:
        from tunelab import models
        from tunelab.errors import ModelError

        with self._lock:
            if spec not in self._items:
                try:
                    self._items[spec] = models.load_tokenizer(spec)
                except ModelError as exc:
                    raise FieldError.one("model", str(exc)) from None
                except (OSError, ValueError) as exc:
                    raise FieldError.one("model", f"cannot load the tokenizer of '{spec}': "
                                         f"{str(exc).splitlines()[0]}") from None
            return self._items[spec]


def create_app(workspace: str | os.PathLike[str], *, allow_parallel: bool = False,
               allowed_hosts: Iterable[str] = (), max_upload_bytes: int = DEFAULT_MAX_UPLOAD,
               chat_device: str = "auto", python: str | None = None,
               env: dict[str, str] | None = None) -> FastAPI:
    """The ui app over ``workspace``. ``allowed_hosts`` adds Host names to the loopback
    ones (the address the server listens on, when not loopback)."""
    import sys

    jobs = Jobs(workspace, python=python or sys.executable, allow_parallel=allow_parallel,
                env=env)
    chat = ChatService(jobs.root, device=chat_device)
    tokenizers = TokenizerCache()
    hosts = {h.lower().strip("[]") for h in (*LOOPBACK, *allowed_hosts)}

    @asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[None]:
        yield
        # Jobs are left running on purpose: they are meant to outlive the server.
        chat.close()

    app = FastAPI(title="tunelab ui", docs_url=None, redoc_url=None, openapi_url=None,
                  lifespan=lifespan)
    app.state.jobs = jobs
    app.state.chat = chat

    @app.middleware("http")
    async def guard(request: Request, call_next: Any) -> Response:
        if "*" not in hosts and _host_of(request.headers.get("host", "")) not in hosts:
            return JSONResponse({"errors": [{"field": "form", "message": "unknown Host; open "
                                             "the ui through the address it printed"}]},
                                status_code=403)
        if request.method not in ("GET", "HEAD", "OPTIONS") and UI_HEADER not in request.headers:
            return JSONResponse({"errors": [{"field": "form", "message": "requests that "
                                             f"change something need the {UI_HEADER} header"}]},
                                status_code=403)
        response = await call_next(request)
        response.headers.setdefault("Content-Security-Policy", CSP)
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["Cache-Control"] = "no-store"
        return response

    @app.exception_handler(TunelabError)
    async def _tunelab_error(request: Request, exc: TunelabError) -> JSONResponse:
        status = getattr(exc, "status", 400) if isinstance(exc, FieldError) else 400
        return JSONResponse(error_body(exc), status_code=status)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse({"errors": [{"field": "form", "message": str(exc.detail)}]},
                            status_code=exc.status_code)

    @app.exception_handler(RequestValidationError)
    async def _bad_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [{"field": str(e.get("loc", ["form"])[-1]), "message": e.get("msg", "invalid")}
                  for e in exc.errors()]
        return JSONResponse({"errors": errors}, status_code=400)

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> JSONResponse:
        log.exception("ui request failed: %s %s", request.method, request.url.path)
        return JSONResponse({"errors": [{"field": "form", "message": "internal error: "
                                         f"{type(exc).__name__}: {exc}"}]}, status_code=500)

    async def body_of(request: Request) -> dict[str, Any]:
        import json

        raw = await request.body()
        if len(raw) > MAX_JSON_BYTES:
            raise FieldError.one("form", "request too large", status=413)
        try:
            value = json.loads(raw or b"{}")
        except ValueError as exc:
            raise FieldError.one("form", f"not valid JSON: {exc}") from None
        if not isinstance(value, dict):
            raise FieldError.one("form", "expected a JSON object")
        return value

    # ------------------------------------------------------------------ page

    @app.get("/")
    async def index() -> FileResponse:
        return FileResponse(STATIC / "index.html", media_type="text/html")

    @app.get("/favicon.ico")
    async def favicon() -> FileResponse:
        return FileResponse(STATIC / "favicon.svg", media_type="image/svg+xml")

    @app.get("/static/{name}")
    async def static(name: str) -> FileResponse:
        path = (STATIC / name).resolve()
        if path.parent != STATIC or not path.is_file():
            raise StarletteHTTPException(404, f"no static file {name!r}")
        return FileResponse(path)

    # ------------------------------------------------------------------ model, data

    @app.get("/api/info")
    async def info() -> dict[str, Any]:
        from tunelab.config import CHOICES
        from tunelab.models import ALIASES, DEFAULT_MODEL
        from tunelab.plan import catalog_names, gpu_names
        from tunelab.ui.jobs import resolve_device

        device = await run_in_threadpool(resolve_device, "auto")
        return {"workspace": str(jobs.root), "uploads": str(jobs.root / UPLOADS),
                "aliases": sorted(ALIASES), "default_model": DEFAULT_MODEL,
                "catalog": catalog_names(), "gpus": gpu_names(),
                "default_gpu": await run_in_threadpool(default_gpu), "device": device,
                "allow_parallel": jobs.allow_parallel, "choices": CHOICES,
                "suffixes": list(SUFFIXES), "max_upload_bytes": max_upload_bytes,
                "chat_base": chat.base}

    @app.post("/api/model")
    async def check_model(request: Request) -> dict[str, Any]:
        body = await body_of(request)
        spec = forms.model_spec(body.get("model"))
        return await run_in_threadpool(_model_info, spec)

    @app.put("/api/uploads/{filename}")
    async def upload(filename: str, request: Request) -> dict[str, Any]:
        """The raw request body is the file (no multipart parser needed). It is streamed to
        a temporary file in the uploads folder, then linked under its final name, which
        never replaces an earlier upload: a name already taken by other content gets a
        ``-2``, ``-3``... suffix."""
        name = filename.strip()
        if not _UPLOAD_NAME.match(name) or Path(name).name != name:
            raise FieldError.one("file", f"invalid file name {filename!r}: use letters, "
                                 "digits, spaces, '.', '_' and '-'")
        if Path(name).suffix.lower() not in SUFFIXES:
            raise FieldError.one("file", f"unsupported file type '{Path(name).suffix}'; use "
                                 f"one of {', '.join(SUFFIXES)}")
        folder = jobs.root / UPLOADS
        folder.mkdir(exist_ok=True)
        digest = hashlib.sha256()
        size = 0
        fd, tmp_name = tempfile.mkstemp(prefix=".upload-", suffix=".part", dir=folder)
        tmp = Path(tmp_name)
        try:
            with os.fdopen(fd, "wb") as fh:
                async for chunk in request.stream():
                    size += len(chunk)
                    if size > max_upload_bytes:
                        raise FieldError.one("file", f"file is larger than the "
                                             f"{max_upload_bytes >> 20} MiB limit "
                                             "(tunelab ui --max-upload-mb)", status=413)
                    digest.update(chunk)
                    fh.write(chunk)
                fh.flush()
                os.fsync(fh.fileno())
            if size == 0:
                raise FieldError.one("file", "the file is empty")
            final = _place_upload(tmp, folder, name, digest.hexdigest())
        finally:
            tmp.unlink(missing_ok=True)  # the incomplete copy only; `final` is a hard link
        return {"path": str(final), "name": final.name, "bytes": size}

    @app.get("/api/uploads")
    async def uploads() -> dict[str, Any]:
        folder = jobs.root / UPLOADS
        files = sorted((p for p in folder.iterdir() if p.is_file()
                        and not p.name.startswith(".")), key=lambda p: -p.stat().st_mtime)
        return {"files": [{"name": p.name, "path": str(p), "bytes": p.stat().st_size}
                          for p in files]}

    @app.post("/api/data/inspect")
    async def inspect(request: Request) -> dict[str, Any]:
        body = await body_of(request)
        errors: list[dict[str, Any]] = []
        spec = path = None
        try:
            spec = forms.model_spec(body.get("model"))
        except FieldError as exc:
            errors.extend(exc.errors)
        try:
            path = forms.data_path(body.get("data"))
        except FieldError as exc:
            errors.extend(exc.errors)
        settings = {k: body[k] for k in ("format", "max_length", "train_on", "overlength",
                                         "val_fraction", "seed") if body.get(k) not in (None, "")}
        try:
            cfg = forms.train_config({**settings, "data": "-"})
        except FieldError as exc:
            errors.extend(exc.errors)
        if errors:
            raise FieldError(errors)
        assert spec is not None and path is not None

        def work() -> dict[str, Any]:
            from tunelab.ui.inspect import inspect_data

            tokenizer = tokenizers.get(spec)
            return inspect_data(path, tokenizer, fmt=cfg.format, max_length=cfg.max_length,
                                train_on=cfg.train_on, overlength=cfg.overlength,
                                val_fraction=cfg.val_fraction, seed=cfg.seed)

        result = await run_in_threadpool(work)
        result["model"] = spec
        return result

    # ------------------------------------------------------------------ plan

    @app.post("/api/plan")
    async def plan(request: Request) -> dict[str, Any]:
        body = await body_of(request)
        return await run_in_threadpool(_plan, body)

    # ------------------------------------------------------------------ runs

    @app.get("/api/runs")
    async def runs() -> dict[str, Any]:
        def work() -> dict[str, Any]:
            items = []
            for name in jobs.run_names():
                try:
                    items.append(jobs.run_info(name, details=False))
                except (OSError, ValueError) as exc:  # a run folder being written or broken
                    items.append({"name": name, "state": "unreadable", "error": str(exc)})
            return {"runs": items, "workspace": str(jobs.root)}

        return await run_in_threadpool(work)

    @app.post("/api/runs", status_code=201)
    async def start_run(request: Request) -> dict[str, Any]:
        body = await body_of(request)
        config = body.get("config")
        if not isinstance(config, dict):
            raise FieldError.one("form", "expected {name, config: {...}}")
        allow = forms.flag(body, "allow_parallel")
        state = await run_in_threadpool(jobs.start_train, body.get("name"), config,
                                        allow_parallel=allow)
        return {"name": body["name"].strip(), **state}

    @app.get("/api/runs/{name}")
    async def run(name: str, since: int = 0) -> dict[str, Any]:
        return await run_in_threadpool(lambda: jobs.run_info(name, since=since))

    @app.post("/api/runs/{name}/stop")
    async def stop(name: str) -> dict[str, Any]:
        return await run_in_threadpool(jobs.stop, name)

    @app.post("/api/runs/{name}/resume")
    async def resume(name: str, request: Request) -> dict[str, Any]:
        body = await body_of(request)
        allow = forms.flag(body, "allow_parallel")
        return await run_in_threadpool(lambda: jobs.resume_train(name, allow_parallel=allow))

    @app.post("/api/runs/{name}/compare", status_code=201)
    async def start_compare(name: str, request: Request) -> dict[str, Any]:
        body = await body_of(request)
        allow = forms.flag(body, "allow_parallel")
        options = {k: v for k, v in body.items() if k != "allow_parallel"}
        return await run_in_threadpool(lambda: jobs.start_compare(name, options,
                                                                  allow_parallel=allow))

    @app.get("/api/runs/{name}/compare")
    async def compare(name: str) -> dict[str, Any]:
        return await run_in_threadpool(jobs.compare_info, name)

    @app.post("/api/runs/{name}/compare/stop")
    async def stop_compare(name: str) -> dict[str, Any]:
        return await run_in_threadpool(lambda: jobs.stop(name, compare=True))

    def report_file(name: str, compare: bool) -> FileResponse:
        run_dir = jobs.run_dir(name)
        path = (run_dir / COMPARE_DIR if compare else run_dir) / "report.html"
        if not path.is_file():
            raise StarletteHTTPException(404, "no report yet: it is written when the "
                                         + ("comparison" if compare else "run") + " ends")
        return FileResponse(path, media_type="text/html",
                            headers={"Content-Security-Policy": REPORT_CSP})

    @app.get("/runs/{name}/report.html")
    async def run_report(name: str) -> FileResponse:
        return report_file(name, False)

    @app.get("/runs/{name}/compare/report.html")
    async def compare_report(name: str) -> FileResponse:
        return report_file(name, True)

    # ------------------------------------------------------------------ chat

    @app.get("/api/chat")
    async def chat_info() -> dict[str, Any]:
        return {"base": chat.base, "adapters": await run_in_threadpool(chat.adapters)}

    @app.post("/api/chat")
    async def chat_reply(request: Request) -> dict[str, Any]:
        body = await body_of(request)
        errors: list[dict[str, Any]] = []
        parsed: dict[str, Any] = {}
        for key, parse in (("model", lambda: forms.model_spec(body.get("model"))),
                           ("max_new_tokens", lambda: forms.integer(
                               body, "max_new_tokens", default=128, low=1, high=MAX_TOKENS)),
                           ("temperature", lambda: forms.number(body, "temperature",
                                                                default=0.0, high=5.0)),
                           ("seed", lambda: forms.integer(body, "seed"))):
            try:
                parsed[key] = parse()
            except FieldError as exc:
                errors.extend(exc.errors)
        columns = body.get("columns")
        if not isinstance(columns, list) or not all(isinstance(c, dict) for c in columns):
            errors.append({"field": "columns", "message": "expected a list of columns"})
        if errors:
            raise FieldError(errors)
        replies = await run_in_threadpool(
            lambda: chat.reply(parsed["model"], columns, max_new_tokens=parsed["max_new_tokens"],
                               temperature=parsed["temperature"], seed=parsed["seed"]))
        return {"replies": replies, "base": chat.base}

    return app


# ------------------------------------------------------------------------------ helpers


def _place_upload(tmp: Path, folder: Path, name: str, digest: str) -> Path:
    """Link ``tmp`` into ``folder`` as ``name`` (or ``stem-N.suffix``); the same content
    uploaded again reuses its file. ``os.link`` fails if the name exists, so two uploads
    racing for one name cannot overwrite each other."""
    stem, suffix = Path(name).stem, Path(name).suffix
    for n in range(1, 1000):
        candidate = folder / (name if n == 1 else f"{stem}-{n}{suffix}")
        if candidate.exists():
            if candidate.stat().st_size == tmp.stat().st_size and _sha256(candidate) == digest:
                return candidate
            continue
        try:
            os.link(tmp, candidate)
        except FileExistsError:
            continue
        except OSError:  # a filesystem without hard links: rename is atomic too
            os.replace(tmp, candidate)
        return candidate
    raise FieldError.one("file", f"too many uploads named {name!r}; rename the file")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _model_info(spec: str) -> dict[str, Any]:
    """What a model spec is (alias, GGUF, folder, hub id), its licence and its size, read
    without loading the weights."""
    from tunelab import models
    from tunelab.errors import ModelError
    from tunelab.plan import resolve_model as plan_resolve
    from tunelab.report.run import model_licence

    source = models.resolve_model(spec)
    out: dict[str, Any] = {"model": spec, "kind": source.kind, "path": source.path,
                           "licence": model_licence(spec)}
    try:
        arch = plan_resolve(spec).arch
        out["arch"] = {"name": arch.name, "params": arch.total_params, "layers": arch.layers,
                       "hidden": arch.hidden, "vocab": arch.vocab,
                       "describe": arch.describe()}
    except (ModelError, TunelabError, OSError, ValueError) as exc:
        out["arch"] = None
        out["arch_error"] = str(exc)
    return out


def _plan(body: dict[str, Any]) -> dict[str, Any]:
    """tunelab.plan.build_plan for the plan form; each input checked under its own name."""
    from tunelab.errors import ConfigError, ModelError
    from tunelab.plan import METHODS, build_plan, get_gpu
    from tunelab.plan.report import fmt_bytes, fmt_duration

    errors: list[dict[str, Any]] = []
    values: dict[str, Any] = {}
    checks = {
        "model": lambda: forms.text(body, "model", required=True),
        "method": lambda: forms.text(body, "method", default="lora"),
        "lora_r": lambda: forms.integer(body, "lora_r", default=16, low=1, high=4096),
        "max_length": lambda: forms.integer(body, "max_length", default=1024, low=8),
        "batch_size": lambda: forms.integer(body, "batch_size", default=4, low=1),
        "grad_accum": lambda: forms.integer(body, "grad_accum", default=1, low=1),
        "gpus": lambda: forms.integer(body, "gpus", default=1, low=1, high=1024),
        "gpu": lambda: forms.text(body, "gpu", default="cpu"),
        "grad_ckpt": lambda: forms.flag(body, "grad_ckpt"),
        "max_steps": lambda: forms.integer(body, "max_steps", default=0),
        "epochs": lambda: forms.number(body, "epochs", default=1.0),
        "examples": lambda: forms.integer(body, "examples", low=1),
        "avg_len": lambda: forms.number(body, "avg_len", low=1.0),
    }
    for key, check in checks.items():
        try:
            values[key] = check()
        except FieldError as exc:
            errors.extend(exc.errors)
    if "method" in values and values["method"] not in METHODS:
        errors.append({"field": "method", "message": f"unknown method {values['method']!r}; "
                       f"use one of {', '.join(METHODS)}"})
    if values.get("gpu"):
        try:
            get_gpu(values["gpu"])
        except ConfigError as exc:
            errors.append({"field": "gpu", "message": str(exc)})
    if values.get("epochs") is not None and values["epochs"] <= 0 and not values.get("max_steps"):
        errors.append({"field": "epochs", "message": "must be positive"})
    if errors:
        raise FieldError(errors)
    kwargs: dict[str, Any] = {}
    seq = values["max_length"]
    avg = min(values["avg_len"], seq) if values.get("avg_len") else None
    if values["max_steps"] and avg:
        # Steps x examples per step x their mean length: exactly the tokens the run sees.
        kwargs.update(examples=values["max_steps"] * values["batch_size"] * values["grad_accum"],
                      avg_len=avg, epochs=1.0)
    elif values.get("examples") and avg:
        kwargs.update(examples=values["examples"], avg_len=avg, epochs=values["epochs"])
    try:
        plan = build_plan(values["model"], gpu=values["gpu"], gpus=values["gpus"], seq=seq,
                          batch=values["batch_size"], grad_ckpt=values["grad_ckpt"],
                          lora_r=values["lora_r"], **kwargs)
    except ModelError as exc:
        raise FieldError.one("model", str(exc)) from None
    except ConfigError as exc:
        raise FieldError.one("form", str(exc)) from None
    out = plan.to_dict()
    out["selected"] = values["method"]
    out["readable"] = {
        name: {"total": fmt_bytes(mp.memory.total),
               "components": {k: fmt_bytes(v) for k, v in mp.memory.components().items()},
               "time": fmt_duration(mp.time.hours) if mp.time else None,
               "tokens_per_s": mp.time.tokens_per_second if mp.time else None}
        for name, mp in plan.methods.items()}
    out["usable_readable"] = fmt_bytes(plan.usable)
    out["tokens_note"] = plan.tokens_note
    return out
