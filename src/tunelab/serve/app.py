"""The OpenAI-compatible HTTP API over an :class:`~tunelab.serve.engine.Engine`.

Routes (all JSON; errors in OpenAI's shape ``{"error": {"message", "type", "param", "code"}}``):

* ``GET  /v1/models``, ``GET /v1/models/{id}``: the base and each adapter;
* ``POST /v1/chat/completions``: messages rendered with the model's chat template, exactly
  as in training; ``POST /v1/completions``: raw text prompts;
* both take ``model`` (the base id or an adapter name), ``temperature``, ``top_p``,
  ``max_tokens``, ``stop``, ``seed`` and ``stream`` (server-sent events);
* ``POST /admin/adapters`` ``{"name", "path"}`` and ``DELETE /admin/adapters/{name}``: load and
  unload adapters at run time, only with ``admin=True`` and only from ``adapter_dirs``;
* ``GET /health``: liveness, without the API key.

With ``api_key`` set every other route needs ``Authorization: Bearer <key>``. A request body
must arrive within ``body_timeout`` seconds (else 408 and the connection is closed); the
deadlines for headers and for slow readers are the HTTP protocol's
(:mod:`tunelab.serve.server`).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import math
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from tunelab.errors import TunelabError
from tunelab.serve.engine import (
    Completion,
    Engine,
    EngineError,
    GenRequest,
    check_name,
)

log = logging.getLogger(__name__)

ROLES = {"system", "user", "assistant", "developer"}  # developer = OpenAI's newer "system"
MAX_STOPS = 4


class APIError(Exception):
    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = (status, message, type,
                                                                        param, code)
        self.headers = dict(headers or {})

    @classmethod
    def from_engine(cls, exc: EngineError) -> APIError:
        kind = "server_error" if exc.status >= 500 else "invalid_request_error"
        # 503: the queue is full or the server is stopping; clients may retry (openai's do)
        headers = {"Retry-After": "1"} if exc.status == 503 else None
        return cls(exc.status, str(exc), type=kind, param=exc.param, code=exc.code,
                   headers=headers)


def error_body(message: str, *, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


# ------------------------------------------------------------------------ validation


def _number(body: dict, key: str, default: float, lo: float, hi: float, *,
            lo_open: bool = False) -> float:
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) \
            or not math.isfinite(value):
        raise APIError(400, f"'{key}' must be a number", param=key)
    if value > hi or value < lo or (lo_open and value == lo):
        bound = f"> {lo}" if lo_open else f">= {lo}"
        raise APIError(400, f"'{key}' must be {bound} and <= {hi}, got {value}", param=key)
    return float(value)


def _integer(body: dict, key: str) -> int | None:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise APIError(400, f"'{key}' must be an integer", param=key)
    return value


def _stops(body: dict) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise APIError(400, "'stop' must be a string or a list of strings", param="stop")
    if len(stops) > MAX_STOPS:
        raise APIError(400, f"'stop' takes at most {MAX_STOPS} strings", param="stop")
    return tuple(s for s in stops if s)


# request fields this server does not implement, and the values that mean "not used"
UNUSED = {"n": (None, 1), "best_of": (None, 1), "logprobs": (None, False),
          "top_logprobs": (None, 0), "echo": (None, False), "suffix": (None, ""),
          "tools": (None, []), "functions": (None, []), "tool_choice": (None, "none")}


def _reject_unsupported(body: dict, keys: Sequence[str]) -> None:
    for key in keys:
        if body.get(key) not in UNUSED[key]:
            raise APIError(400, f"'{key}' is not supported by this server", param=key)


def _content(message: dict, index: int) -> str:
    content = message.get("content")
    if isinstance(content, str):
        return content
    if content is None:
        return ""
    if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
        parts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" \
                    or not isinstance(part.get("text"), str):
                raise APIError(400, "only text content parts are supported",
                               param=f"messages[{index}].content")
            parts.append(part["text"])
        return "".join(parts)
    raise APIError(400, "'content' must be a string or a list of text parts",
                   param=f"messages[{index}].content")


def _messages(body: dict) -> list[dict[str, str]]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "'messages' must be a non-empty list", param="messages")
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise APIError(400, "each message must be an object", param=f"messages[{i}]")
        role = message.get("role")
        if role not in ROLES:
            raise APIError(400, f"unknown role {role!r}; allowed: system, user, assistant",
                           param=f"messages[{i}].role")
        out.append({"role": "system" if role == "developer" else role,
                    "content": _content(message, i)})
    return out


# ---------------------------------------------------------------------------- the app


class HeaderLimit:
    """Answers 431 when a request's target and headers exceed ``max_bytes`` together.
    (h11 refuses more than 16 KiB of headers only while they are still incomplete: headers
    that arrive in one piece pass it whatever their size.)"""

    def __init__(self, app: Any, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            size = len(scope.get("raw_path") or b"") + len(scope.get("query_string") or b"") \
                + sum(len(k) + len(v) + 4 for k, v in scope.get("headers") or ())
            if size > self.max_bytes:
                response = JSONResponse(
                    error_body(f"the request's headers are larger than {self.max_bytes} bytes",
                               code="headers_too_large"),
                    status_code=431, headers={"Connection": "close"})
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


def create_app(engine: Engine, *, api_key: str | None = None, admin: bool = False,
               adapter_dirs: Sequence[str | Path] = (), max_request_bytes: int = 1 << 20,
               max_tokens_limit: int = 1024, default_max_tokens: int = 256,
               body_timeout: float = 30.0, max_header_bytes: int = 16 * 1024) -> Any:
    """A FastAPI app serving ``engine``; it starts the engine's worker if it is not running."""
    if admin and not adapter_dirs:
        raise TunelabError("the admin endpoint needs at least one --adapter-dir to load from")
    if body_timeout <= 0:
        raise TunelabError("body_timeout must be positive")
    allowed = [Path(d).expanduser().resolve() for d in adapter_dirs]
    key = api_key.encode() if api_key else None
    default_max_tokens = min(default_max_tokens, max_tokens_limit)

    @asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[None]:
        started_here = not engine.running
        engine.start()
        try:
            yield
        finally:
            if started_here:
                await run_in_threadpool(engine.close)

    app = FastAPI(title="tunelab serve", lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.state.engine = engine
    app.add_middleware(HeaderLimit, max_bytes=max_header_bytes)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        headers = {**exc.headers, **({"WWW-Authenticate": "Bearer"} if exc.status == 401
                                     else {})}
        return JSONResponse(error_body(exc.message, type=exc.type, param=exc.param,
                                       code=exc.code), status_code=exc.status, headers=headers)

    @app.exception_handler(EngineError)
    async def _engine_error(request: Request, exc: EngineError) -> JSONResponse:
        return await _api_error(request, APIError.from_engine(exc))

    @app.exception_handler(TunelabError)
    async def _tunelab_error(request: Request, exc: TunelabError) -> JSONResponse:
        return await _api_error(request, APIError(400, str(exc)))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return JSONResponse(error_body(str(exc.detail), code=code), status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> JSONResponse:
        log.exception("internal error")
        return JSONResponse(error_body("internal server error", type="server_error"),
                            status_code=500)

    def check_key(request: Request) -> None:
        if key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, given = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), key):
            raise APIError(401, "Incorrect API key provided", code="invalid_api_key")

    async def read_json(request: Request) -> dict[str, Any]:
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > max_request_bytes:
            raise APIError(413, f"request body larger than {max_request_bytes} bytes",
                           code="request_too_large")

        async def read_body() -> bytes:
            chunks, size = [], 0
            async for chunk in request.stream():
                size += len(chunk)
                if size > max_request_bytes:
                    raise APIError(413, f"request body larger than {max_request_bytes} bytes",
                                   code="request_too_large")
                chunks.append(chunk)
            return b"".join(chunks)

        try:  # a client that sends its headers and then stalls must not hold the request
            raw = await asyncio.wait_for(read_body(), body_timeout)
        except asyncio.TimeoutError:
            raise APIError(408, f"the request body did not arrive within {body_timeout:g} s",
                           code="request_timeout", headers={"Connection": "close"}) from None
        except ClientDisconnect:
            raise APIError(400, "the client went away before sending the whole body",
                           code="client_disconnected") from None
        try:
            body = json.loads(raw)
        except (ValueError, RecursionError) as exc:  # RecursionError: absurdly deep nesting
            raise APIError(400, f"the request body is not valid JSON: {exc}",
                           code="invalid_json") from None
        if not isinstance(body, dict):
            raise APIError(400, "the request body must be a JSON object", code="invalid_json")
        return body

    def settings(body: dict, model: str, prompt_ids: list[int]) -> GenRequest:
        max_tokens = _integer(body, "max_completion_tokens")
        if max_tokens is None:
            max_tokens = _integer(body, "max_tokens")
        if max_tokens is None:
            max_tokens = default_max_tokens
        if max_tokens < 1 or max_tokens > max_tokens_limit:
            raise APIError(400, f"'max_tokens' must be between 1 and {max_tokens_limit}, "
                           f"got {max_tokens}", param="max_tokens")
        seed = _integer(body, "seed")
        return GenRequest(model=model, prompt_ids=prompt_ids, max_tokens=max_tokens,
                          temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
                          top_p=_number(body, "top_p", 1.0, 0.0, 1.0, lo_open=True),
                          seed=seed, stop=_stops(body))

    def model_of(body: dict) -> str:
        model = body.get("model")
        if not isinstance(model, str) or not model:
            raise APIError(400, "'model' is required", param="model")
        engine.adapter_for(model)  # raises UnknownModel (404)
        return model

    def stream_flag(body: dict) -> tuple[bool, bool]:
        stream = body.get("stream", False)
        if not isinstance(stream, bool) and stream is not None:
            raise APIError(400, "'stream' must be a boolean", param="stream")
        options = body.get("stream_options") or {}
        if not isinstance(options, dict):
            raise APIError(400, "'stream_options' must be an object", param="stream_options")
        return bool(stream), bool(options.get("include_usage"))

    async def run(request: GenRequest) -> Completion:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Completion] = loop.create_future()

        def sink(kind: str, payload: Any) -> None:
            if kind == "delta":
                return
            loop.call_soon_threadsafe(_settle, future, kind, payload)

        handle = engine.submit(request, sink)
        try:
            return await future
        finally:
            handle.cancel()  # a no-op once finished; stops the row if the client went away

    async def events(request: GenRequest) -> tuple[Any, asyncio.Queue]:
        loop = asyncio.get_running_loop()
        inbox: asyncio.Queue = asyncio.Queue()

        def sink(kind: str, payload: Any) -> None:
            loop.call_soon_threadsafe(inbox.put_nowait, (kind, payload))

        return engine.submit(request, sink), inbox

    def usage(c: Completion) -> dict[str, int]:
        return {"prompt_tokens": c.prompt_tokens, "completion_tokens": c.completion_tokens,
                "total_tokens": c.prompt_tokens + c.completion_tokens}

    def sse(data: dict[str, Any] | str) -> str:
        return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"

    def streaming(handle: Any, inbox: asyncio.Queue, chunk: Any, include_usage: bool) -> Any:
        async def body() -> AsyncIterator[str]:
            try:
                first = chunk(None, None, first=True)
                if first is not None:
                    yield sse(first)
                while True:
                    kind, payload = await inbox.get()
                    if kind == "delta":
                        yield sse(chunk(payload, None))
                    elif kind == "done":
                        yield sse(chunk(None, payload.finish_reason))
                        if include_usage:
                            yield sse(chunk(None, None, usage=usage(payload)))
                        yield sse("[DONE]")
                        return
                    else:
                        message = str(payload) if isinstance(payload, EngineError) \
                            else "generation failed"
                        yield sse(error_body(message, type="server_error"))
                        return
            finally:
                handle.cancel()

        return StreamingResponse(body(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache",
                                          "X-Accel-Buffering": "no"})

    def model_card(model_id: str) -> dict[str, Any]:
        card = {"id": model_id, "object": "model", "created": created, "owned_by": "tunelab"}
        if model_id != engine.base_name:
            card["parent"] = engine.base_name
            card["root"] = engine.base_name
        return card

    created = int(time.time())
    auth = [Depends(check_key)]

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "models": len(engine.model_ids)}

    @app.get("/v1/models", dependencies=auth)
    async def list_models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card(m) for m in engine.model_ids]}

    @app.get("/v1/models/{model_id}", dependencies=auth)
    async def get_model(model_id: str) -> dict[str, Any]:
        engine.adapter_for(model_id)
        return model_card(model_id)

    @app.post("/v1/chat/completions", dependencies=auth)
    async def chat_completions(request: Request) -> Any:
        body = await read_json(request)
        model = model_of(body)
        _reject_unsupported(body, ("n", "logprobs", "top_logprobs", "tools", "functions",
                                   "tool_choice"))
        messages = _messages(body)
        prompt_ids = await run_in_threadpool(
            lambda: engine.tokenize(engine.render_chat(messages)))
        gen = settings(body, model, prompt_ids)
        stream, include_usage = stream_flag(body)
        rid, now = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if not stream:
            result = await run(gen)
            return {"id": rid, "object": "chat.completion", "created": now, "model": model,
                    "choices": [{"index": 0, "message": {"role": "assistant",
                                                         "content": result.text},
                                 "logprobs": None, "finish_reason": result.finish_reason}],
                    "usage": usage(result)}

        def chunk(text: str | None, finish: str | None, *, first: bool = False,
                  usage: dict | None = None) -> dict[str, Any]:
            out: dict[str, Any] = {"id": rid, "object": "chat.completion.chunk", "created": now,
                                   "model": model}
            if usage is not None:
                out.update(choices=[], usage=usage)
                return out
            delta = {"role": "assistant", "content": ""} if first else \
                ({"content": text} if text is not None else {})
            out["choices"] = [{"index": 0, "delta": delta, "logprobs": None,
                               "finish_reason": finish}]
            if include_usage:
                out["usage"] = None
            return out

        handle, inbox = await events(gen)
        return streaming(handle, inbox, chunk, include_usage)

    @app.post("/v1/completions", dependencies=auth)
    async def completions(request: Request) -> Any:
        body = await read_json(request)
        model = model_of(body)
        _reject_unsupported(body, ("n", "best_of", "logprobs", "echo", "suffix"))
        prompt = body.get("prompt")
        prompts = [prompt] if isinstance(prompt, str) else prompt
        if not isinstance(prompts, list) or not prompts \
                or not all(isinstance(p, str) for p in prompts):
            raise APIError(400, "'prompt' must be a string or a non-empty list of strings",
                           param="prompt")
        encoded = await run_in_threadpool(lambda: [engine.tokenize(p) for p in prompts])
        gens = [settings(body, model, ids) for ids in encoded]
        stream, include_usage = stream_flag(body)
        rid, now = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        if not stream:
            results = await asyncio.gather(*(run(g) for g in gens))
            total = {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
            for r in results:
                for k, v in usage(r).items():
                    total[k] += v
            return {"id": rid, "object": "text_completion", "created": now, "model": model,
                    "choices": [{"index": i, "text": r.text, "logprobs": None,
                                 "finish_reason": r.finish_reason}
                                for i, r in enumerate(results)],
                    "usage": total}
        if len(gens) != 1:
            raise APIError(400, "streaming takes a single prompt", param="prompt")

        def chunk(text: str | None, finish: str | None, *, first: bool = False,
                  usage: dict | None = None) -> dict[str, Any] | None:
            if first:
                return None
            out: dict[str, Any] = {"id": rid, "object": "text_completion", "created": now,
                                   "model": model}
            if usage is not None:
                out.update(choices=[], usage=usage)
                return out
            out["choices"] = [{"index": 0, "text": text or "", "logprobs": None,
                               "finish_reason": finish}]
            if include_usage:
                out["usage"] = None
            return out

        handle, inbox = await events(gens[0])
        return streaming(handle, inbox, chunk, include_usage)

    if admin:
        def allowed_path(raw: Any) -> Path:
            if not isinstance(raw, str) or not raw or "\x00" in raw:
                raise APIError(400, "'path' must be a folder name or path", param="path")
            given = Path(raw).expanduser()
            if ".." in given.parts:
                raise APIError(403, "'path' may not contain '..'", param="path",
                               code="path_not_allowed")
            candidates = [given] if given.is_absolute() else [d / given for d in allowed]
            for candidate in candidates:
                try:
                    resolved = candidate.resolve(strict=True)  # follows symlinks
                except (OSError, RuntimeError):
                    continue
                if any(resolved == d or resolved.is_relative_to(d) for d in allowed):
                    return resolved
                raise APIError(403, "adapters can only be loaded from the --adapter-dir "
                               "folders", param="path", code="path_not_allowed")
            raise APIError(404, f"adapter folder not found: {raw}", param="path",
                           code="adapter_not_found")

        @app.get("/admin/adapters", dependencies=auth)
        async def list_adapters() -> dict[str, Any]:
            return {"object": "list", "data": [{"id": n, "path": p}
                                               for n, p in engine.adapters.items()]}

        @app.post("/admin/adapters", dependencies=auth, status_code=201)
        async def load_adapter(request: Request) -> dict[str, Any]:
            body = await read_json(request)
            name = check_name(body.get("name"))
            path = allowed_path(body.get("path"))
            try:
                folder = await run_in_threadpool(engine.load_adapter, name, path)
            except EngineError:
                raise
            except TunelabError as exc:
                raise APIError(400, str(exc), param="path", code="invalid_adapter") from None
            return {**model_card(name), "path": folder}

        @app.delete("/admin/adapters/{name}", dependencies=auth)
        async def unload_adapter(name: str) -> dict[str, Any]:
            await run_in_threadpool(engine.unload_adapter, name)
            return {"id": name, "object": "model", "deleted": True}

    return app


def _settle(future: asyncio.Future, kind: str, payload: Any) -> None:
    if future.done():
        return
    if kind == "done":
        future.set_result(payload)
    elif isinstance(payload, EngineError):
        future.set_exception(payload)
    else:
        future.set_exception(EngineError("generation failed", status=500))
