"""A mixed load of valid and abusive requests against a live ``tunelab serve``, shared by
``tests/serve/test_serve_load.py`` and ``benchmarks/serve_load.py``.

:func:`build_cases` makes a deterministic list of requests. About 60% are valid generations
(chat and completions, some streamed, spread over the base and two adapters, max_tokens 4-8)
plus model listings. The rest are abuse, each with the exact status and error code the
server must answer: malformed JSON and HTTP, wrong types, values out of range, oversized
bodies (declared and chunked), prompts over the context length, unknown models, traversal
names (``../a``, absolute paths, a symlink's name) as model ids and as admin loads, wrong
methods and routes, and missing or wrong API keys. :func:`run_load` sends the cases with a
bounded number of requests in flight and checks every answer.
:func:`serve_process` starts ``tunelab serve`` as a subprocess, so its memory can be
measured on its own.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import random
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

TEXTS = ["capital of France?", "hello", "Tallinn is the capital of Estonia. Where is it?",
         "JSON record", "A quick brown fox jumps over the lazy dog.", "0 1 2 3",
         "Fine-tuning adapts a model to a task. Why?", "question answer"]
VALID_KINDS = ("chat", "chat_stream", "completion", "completion_stream")


@dataclass
class Case:
    kind: str  # a valid kind (VALID_KINDS, "models") or the name of an abuse
    method: str = "POST"
    path: str = "/v1/chat/completions"
    body: Any = None  # JSON-able, or bytes sent as they are
    headers: dict[str, str] = field(default_factory=dict)
    raw: bytes | None = None  # sent over a bare socket instead (malformed HTTP)
    chunked: int = 0  # send this many bytes as a chunked body (no content-length)
    status: int = 200
    codes: tuple[str | None, ...] = ()  # allowed error codes ("" = do not check)
    also: tuple[int, ...] = ()  # other statuses allowed (with the same codes)
    max_tokens: int = 0
    prompts: int = 1

    @property
    def generates(self) -> bool:
        return self.kind in VALID_KINDS


@dataclass
class Outcome:
    case: Case
    status: int
    latency: float
    problem: str | None = None
    tokens: int = 0


def _chat(model: str, text: str, max_tokens: int, **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": text}],
            "max_tokens": max_tokens, **extra}


def abuse_cases(*, api_key: str | None, outside: str, max_tokens_limit: int,
                max_request_bytes: int, context_length: int) -> list[Case]:
    """One of each abusive request, with the answer the server must give."""
    auth = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    big = "x" * (max_request_bytes + 1024)
    chat = "/v1/chat/completions"
    cmpl = "/v1/completions"
    admin = "/admin/adapters"

    def bad(kind: str, body: Any, status: int = 400, *codes: str | None, path: str = chat,
            method: str = "POST", headers: dict[str, str] | None = None) -> Case:
        return Case(kind, method, path, body, {**auth, **(headers or {})}, status=status,
                    codes=codes or ("",))

    ok = _chat("a", "hello", 4)
    cases = [
        bad("malformed_json", b'{"model": "a", "messages": [', 400, "invalid_json"),
        bad("not_utf8", b'\xff\xfe{"model": "a"}', 400, "invalid_json"),
        bad("empty_body", b"", 400, "invalid_json"),
        bad("json_array", b"[1, 2, 3]", 400, "invalid_json"),
        bad("json_string", b'"hello"', 400, "invalid_json"),
        bad("deep_nesting", b"[" * 50_000, 400, "invalid_json"),
        bad("nan", b'{"model": "a", "messages": [{"role": "user", "content": "x"}], '
                   b'"temperature": NaN}', 400),
        bad("messages_not_a_list", {"model": "a", "messages": "hello"}),
        bad("messages_empty", {"model": "a", "messages": []}),
        bad("message_not_an_object", {"model": "a", "messages": ["hello"]}),
        bad("content_int", {"model": "a", "messages": [{"role": "user", "content": 42}]}),
        bad("content_image", {"model": "a", "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "file:///etc/passwd"}}]}]}),
        bad("role_unknown", {"model": "a", "messages": [{"role": "robot", "content": "x"}]}),
        bad("max_tokens_string", {**ok, "max_tokens": "8"}),
        bad("max_tokens_float", {**ok, "max_tokens": 4.5}),
        bad("max_tokens_zero", {**ok, "max_tokens": 0}),
        bad("max_tokens_negative", {**ok, "max_tokens": -1}),
        bad("max_tokens_over_limit", {**ok, "max_tokens": max_tokens_limit + 1}),
        bad("max_tokens_huge", {**ok, "max_tokens": 10**30}),
        bad("temperature_string", {**ok, "temperature": "hot"}),
        bad("temperature_out_of_range", {**ok, "temperature": 9}),
        bad("top_p_zero", {**ok, "top_p": 0}),
        bad("seed_string", {**ok, "seed": "x"}),
        bad("stream_string", {**ok, "stream": "yes"}),
        bad("stream_options_list", {**ok, "stream": True, "stream_options": [1]}),
        bad("stop_int", {**ok, "stop": 5}),
        bad("too_many_stops", {**ok, "stop": ["a", "b", "c", "d", "e"]}),
        bad("n_above_one", {**ok, "n": 3}),
        bad("logprobs", {**ok, "logprobs": True}),
        bad("tools", {**ok, "tools": [{"type": "function", "function": {"name": "f"}}]}),
        bad("model_missing", {"messages": ok["messages"]}),
        bad("model_int", {**ok, "model": 5}),
        bad("model_unknown", {**ok, "model": "nope"}, 404, "model_not_found"),
        bad("oversized_declared", _chat("a", big, 4), 413, "request_too_large"),
        Case("oversized_chunked", "POST", chat, None, dict(auth), chunked=len(big),
             status=413, codes=("request_too_large",)),
        bad("context_too_long", _chat("a", "hello world " * (context_length // 2), 4), 400,
            "context_length_exceeded"),
        bad("prompt_token_ids", {"model": "a", "prompt": [1, 2, 3], "max_tokens": 4},
            path=cmpl),
        bad("prompt_missing", {"model": "a", "max_tokens": 4}, path=cmpl),
        bad("stream_two_prompts", {"model": "a", "prompt": ["a", "b"], "stream": True,
                                   "max_tokens": 4}, path=cmpl),
        bad("echo", {"model": "a", "prompt": "a", "echo": True}, path=cmpl),
        bad("wrong_method", None, 405, "method_not_allowed", method="GET"),
        bad("unknown_route", {"input": "x"}, 404, "not_found", path="/v1/embeddings"),
        bad("unknown_model_route", None, 404, "model_not_found", path="/v1/models/nope",
            method="GET"),
        bad("encoded_traversal_route", None, 404, "model_not_found", "not_found",
            path="/v1/models/..%2F..%2Fetc%2Fpasswd", method="GET"),
    ]
    # names that look like paths are only ever names: never a file is opened for them
    for name in ("../a", "..", "/etc/passwd", "a/../b", "~/a", "sneaky", outside, "a\x00",
                 "A", "a "):
        cases.append(bad("model_traversal", {**ok, "model": name}, 404, "model_not_found"))
        cases.append(bad("model_traversal_completion", {"model": name, "prompt": "x",
                                                        "max_tokens": 4},
                         404, "model_not_found", path=cmpl))
    # admin loads: only names, only paths inside --adapter-dir
    for path in ("../outside", "d/../../outside", outside, "sneaky", "/etc", "/",
                 "~/../../etc"):
        cases.append(bad("admin_traversal", {"name": "e", "path": path}, 403,
                         "path_not_allowed", path=admin))
    for name in ("../x", "/abs", "a/b", "", "__base__", "x" * 65):
        cases.append(bad("admin_bad_name", {"name": name, "path": "d"}, 400, path=admin))
    cases += [
        bad("admin_nul_path", {"name": "e", "path": "d\x00"}, 400, path=admin),
        bad("admin_path_int", {"name": "e", "path": 5}, 400, path=admin),
        bad("admin_missing_path", {"name": "e", "path": "missing"}, 404, "adapter_not_found",
            path=admin),
        bad("admin_not_an_adapter", {"name": "e", "path": "empty"}, 400, "invalid_adapter",
            path=admin),
        bad("admin_taken_name", {"name": "a", "path": "d"}, 409, "model_exists", path=admin),
        bad("admin_malformed_json", b'{"name": ', 400, "invalid_json", path=admin),
        bad("admin_delete_unknown", None, 404, "model_not_found", path=f"{admin}/nope",
            method="DELETE"),
        bad("admin_delete_traversal", None, 404, "model_not_found", "not_found",
            path=f"{admin}/..%2Fa", method="DELETE"),
    ]
    if api_key:
        for headers in ({}, {"Authorization": "Bearer wrong"},
                        {"Authorization": f"Basic {api_key}"},
                        {"Authorization": f"Bearer {api_key}x"}):
            cases.append(Case("bad_api_key", "POST", chat, ok, headers, status=401,
                              codes=("invalid_api_key",)))
            cases.append(Case("bad_api_key_admin", "POST", admin, {"name": "e", "path": "d"},
                              headers, status=401, codes=("invalid_api_key",)))
    # malformed HTTP, below the app: the protocol answers 400 in the same error shape
    cases += [
        Case("http_garbage", raw=b"\x00\x01GARBAGE\r\n\r\n", status=400,
             codes=("invalid_http",)),
        Case("http_bad_request_line", raw=b"GET /v1/models HTTP/9.9 extra\r\n\r\n",
             status=400, codes=("invalid_http",)),
        # 431 from the app when the headers arrive in one piece, 400 from h11 when they
        # arrive in parts and pass 16 KiB before they are complete
        Case("http_huge_headers", raw=b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close"
             b"\r\nX-Big: " + b"a" * 40_000 + b"\r\n\r\n", status=431, also=(400,),
             codes=("headers_too_large", "invalid_http")),
        Case("huge_headers", "GET", "/v1/models", None,
             {**auth, "X-Big": "a" * 20_000}, status=431, also=(400,),
             codes=("headers_too_large", "invalid_http")),
        Case("http_bad_content_length", raw=b"POST /v1/chat/completions HTTP/1.1\r\n"
             b"Host: x\r\nContent-Length: abc\r\n\r\n{}", status=400, codes=("invalid_http",)),
    ]
    return cases


def valid_case(i: int, rng: random.Random, models: list[str], api_key: str | None) -> Case:
    auth = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    model, text = models[i % len(models)], rng.choice(TEXTS)
    max_tokens = rng.randint(4, 8)
    sampling: dict[str, Any] = {"temperature": 0}
    if rng.random() < 0.25:
        sampling = {"temperature": 0.8, "top_p": 0.9, "seed": rng.randrange(1000)}
    kind = rng.choices(VALID_KINDS + ("models",), weights=(45, 25, 15, 8, 7))[0]
    if kind == "models":
        return Case("models", "GET", "/v1/models", None, auth)
    stream = kind.endswith("_stream")
    extra: dict[str, Any] = {**sampling, "stream": stream}
    if stream:  # so that every answer reports its token count
        extra["stream_options"] = {"include_usage": True}
    if kind.startswith("chat"):
        return Case(kind, "POST", "/v1/chat/completions", _chat(model, text, max_tokens,
                                                                **extra), auth,
                    max_tokens=max_tokens)
    prompts = [text] if stream or rng.random() < 0.7 else [text, rng.choice(TEXTS)]
    body = {"model": model, "prompt": prompts[0] if len(prompts) == 1 else prompts,
            "max_tokens": max_tokens, **extra}
    return Case(kind, "POST", "/v1/completions", body, auth, max_tokens=max_tokens,
                prompts=len(prompts))


def build_cases(n: int, *, seed: int = 0, models: list[str], api_key: str | None = None,
                outside: str = "/tmp/outside", max_tokens_limit: int = 16,
                max_request_bytes: int = 64 * 1024, context_length: int = 512,
                abuse_share: float = 0.4) -> list[Case]:
    """``n`` requests: ``abuse_share`` of them abusive (every kind at least once when n
    allows), the rest valid, shuffled with ``seed``."""
    rng = random.Random(seed)
    abuse = abuse_cases(api_key=api_key, outside=outside, max_tokens_limit=max_tokens_limit,
                        max_request_bytes=max_request_bytes, context_length=context_length)
    n_abuse = round(n * abuse_share)
    bad = [abuse[i % len(abuse)] for i in range(n_abuse)]
    good = [valid_case(i, rng, models, api_key) for i in range(n - n_abuse)]
    cases = bad + good
    rng.shuffle(cases)
    return cases


# ------------------------------------------------------------------------ checking answers


def _check_error(case: Case, status: int, headers: Any, data: bytes) -> str | None:
    if status != case.status and status not in case.also:
        return f"status {status}, expected {case.status}: {data[:300]!r}"
    if not headers.get("content-type", "").startswith("application/json"):
        return f"error answer is {headers.get('content-type')!r}, not JSON"
    try:
        body = json.loads(data)
    except ValueError:
        return f"error answer is not JSON: {data[:300]!r}"
    err = body.get("error") if isinstance(body, dict) else None
    if set(body) != {"error"} or not isinstance(err, dict) \
            or not {"message", "type", "param", "code"} <= set(err) \
            or not isinstance(err["message"], str) or not err["message"]:
        return f"error not in OpenAI's shape: {body}"
    if "" not in case.codes and err["code"] not in case.codes:
        return f"error code {err['code']!r}, expected one of {case.codes}"
    return None


def _check_valid(case: Case, status: int, headers: Any, data: bytes) -> tuple[str | None, int]:
    if status != 200:
        return f"status {status} for a valid request: {data[:300]!r}", 0
    if case.kind == "models":
        ids = [m["id"] for m in json.loads(data)["data"]]
        return (None if ids else "no models listed"), 0
    if case.kind.endswith("_stream"):
        if not headers.get("content-type", "").startswith("text/event-stream"):
            return f"stream answered as {headers.get('content-type')!r}", 0
        events = [line[len("data: "):] for line in data.decode().split("\n\n") if line]
        if not events or events[-1] != "[DONE]":
            return f"stream does not end with [DONE]: {data[-200:]!r}", 0
        chunks = [json.loads(e) for e in events[:-1]]
        if any("error" in c for c in chunks):
            return f"error inside the stream: {chunks}", 0
        if any(c["model"] != case.body["model"] for c in chunks):
            return "a chunk names another model", 0
        finishes = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]]
        if finishes[-1] not in ("stop", "length") or any(f for f in finishes[:-1]):
            return f"finish reasons {finishes}", 0
        usage = [c["usage"] for c in chunks if not c["choices"]]
        if len(usage) != 1 or chunks[-1]["choices"]:
            return "the stream does not end with one usage chunk", 0
        tokens = usage[0]["completion_tokens"]
        if not 0 <= tokens <= case.max_tokens:
            return f"{tokens} tokens, max_tokens {case.max_tokens}", tokens
        return None, tokens
    body = json.loads(data)
    if body["model"] != case.body["model"]:
        return f"answered by {body['model']!r}", 0
    choices = body["choices"]
    if len(choices) != case.prompts:
        return f"{len(choices)} choices for {case.prompts} prompts", 0
    if any(c["finish_reason"] not in ("stop", "length") for c in choices):
        return f"finish reasons {[c['finish_reason'] for c in choices]}", 0
    text = [c["message"]["content"] if "message" in c else c["text"] for c in choices]
    if not all(isinstance(t, str) for t in text):
        return f"answers are not text: {text}", 0
    tokens = body["usage"]["completion_tokens"]
    if tokens > case.max_tokens * case.prompts:
        return f"{tokens} tokens > max_tokens {case.max_tokens}", tokens
    return None, tokens


async def _send_raw(host: str, port: int, raw: bytes) -> tuple[int, dict[str, str], bytes]:
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(raw)
        await writer.drain()
        data = await asyncio.wait_for(reader.read(), 60)  # the server closes after answering
    finally:
        writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1]) if lines[0].startswith("HTTP/1.1 ") else 0
    headers = {k.strip().lower(): v.strip() for k, _, v in
               (line.partition(":") for line in lines[1:])}
    return status, headers, body


async def _one(client: httpx.AsyncClient, url: httpx.URL, case: Case) -> Outcome:
    start = time.perf_counter()
    try:
        if case.raw is not None:
            status, headers, data = await _send_raw(url.host, url.port, case.raw)
        else:
            content: Any
            if case.chunked:
                async def chunks(n: int = case.chunked) -> Any:
                    for _ in range(0, n, 8192):
                        yield b" " * 8192

                content = chunks()
            elif isinstance(case.body, bytes):
                content = case.body
            elif case.body is not None:
                content = json.dumps(case.body).encode()
            else:
                content = None
            headers_out = {**case.headers}
            if content is not None:
                headers_out.setdefault("Content-Type", "application/json")
            async with client.stream(case.method, case.path, content=content,
                                     headers=headers_out) as r:
                data = await r.aread()
                status, headers = r.status_code, r.headers
    except (httpx.HTTPError, OSError, asyncio.TimeoutError) as exc:
        return Outcome(case, 0, time.perf_counter() - start,
                       f"no HTTP answer: {type(exc).__name__}: {exc}")
    latency = time.perf_counter() - start
    tokens = 0
    try:
        if case.status == 200:
            problem, tokens = _check_valid(case, status, headers, data)
        else:
            problem = _check_error(case, status, headers, data)
    except (ValueError, KeyError, IndexError, TypeError) as exc:
        problem = f"malformed answer ({type(exc).__name__}: {exc}): {data[:300]!r}"
    return Outcome(case, status, latency, problem, tokens)


async def _run(base_url: str, cases: list[Case], concurrency: int) -> list[Outcome]:
    # idle connections expire here before the server's keep-alive timeout (5 s) closes
    # them; the same 5 s on both sides races: the server may close a connection just as a
    # request goes out on it
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency,
                          keepalive_expiry=2.0)
    gate = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(base_url=base_url, limits=limits, timeout=180) as client:
        url = httpx.URL(base_url)

        async def bounded(case: Case) -> Outcome:
            async with gate:
                return await _one(client, url, case)

        return list(await asyncio.gather(*(bounded(c) for c in cases)))


def percentile(values: list[float], p: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)] if ordered else float("nan")


def _summary(latencies: list[float]) -> dict[str, float]:
    ms = [1000 * x for x in latencies]
    return {"n": len(ms), "p50": round(percentile(ms, 50), 1),
            "p90": round(percentile(ms, 90), 1), "p99": round(percentile(ms, 99), 1),
            "max": round(max(ms, default=float("nan")), 1)}


def run_load(base_url: str, cases: list[Case], concurrency: int = 48) -> dict[str, Any]:
    """Send ``cases`` with at most ``concurrency`` in flight; figures and every problem."""
    start = time.perf_counter()
    outcomes = asyncio.run(_run(base_url, cases, concurrency))
    wall = time.perf_counter() - start
    valid = [o for o in outcomes if o.case.generates and o.problem is None]
    latencies = [o.latency for o in valid]
    tokens = sum(o.tokens for o in valid)
    return {
        "requests": len(cases), "concurrency": concurrency, "wall_s": round(wall, 2),
        "requests_per_s": round(len(cases) / wall, 1),
        "generations": len([c for c in cases if c.generates]),
        "generations_per_s": round(len(valid) / wall, 1),
        "completion_tokens": tokens, "completion_tokens_per_s": round(tokens / wall, 1),
        "latency_ms": _summary(latencies),
        "latency_ms_by_kind": {kind: _summary([o.latency for o in valid if o.case.kind == kind])
                               for kind in VALID_KINDS},
        "error_latency_ms": _summary([o.latency for o in outcomes
                                      if o.case.status != 200 and o.case.raw is None]),
        "statuses": dict(sorted(Counter(o.status for o in outcomes).items())),
        "kinds": dict(sorted(Counter(o.case.kind for o in outcomes).items())),
        "problems": [f"{o.case.kind} {o.case.method} {o.case.path}: {o.problem}"
                     for o in outcomes if o.problem],
    }


# ---------------------------------------------------------------------- the server process


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def serve_process(model: str, adapters: dict[str, str | Path], *, log: Path,
                  args: Sequence[str] = (), env: dict[str, str] | None = None,
                  startup_timeout: float = 180) -> Iterator[tuple[str, subprocess.Popen]]:
    """``python -m tunelab serve`` on a free loopback port; yields its URL and process.
    Its output goes to ``log`` (a pipe could fill up and block it)."""
    port = free_port()
    cmd = [sys.executable, "-m", "tunelab", "serve", "--model", str(model), "--port",
           str(port), *(a for n, p in adapters.items() for a in ("--adapter", f"{n}={p}")),
           *args]
    url = f"http://127.0.0.1:{port}"
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT,
                                env={**os.environ, **(env or {})})
    try:
        deadline = time.monotonic() + startup_timeout
        while True:
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"tunelab serve did not start:\n{log.read_text()}")
            time.sleep(0.2)
        yield url, proc
    finally:
        proc.terminate()  # SIGTERM: uvicorn shuts down gracefully
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class ProcessWatch:
    """Samples a process's resident memory in a thread; ``peak`` and ``rss()`` in bytes."""

    def __init__(self, pid: int, every: float = 0.2) -> None:
        import psutil  # a dependency of accelerate

        self.process = psutil.Process(pid)
        self.peak = self.rss()
        self._every = every
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def rss(self) -> int:
        return self.process.memory_info().rss

    def fds(self) -> int:
        return self.process.num_fds()

    def threads(self) -> int:
        return self.process.num_threads()

    def cpu_seconds(self) -> float:
        times = self.process.cpu_times()
        return times.user + times.system

    def _sample(self) -> None:
        while not self._stop.wait(self._every):
            self.peak = max(self.peak, self.rss())

    def __enter__(self) -> ProcessWatch:
        self.peak = self.rss()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._stop.clear()
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.peak = max(self.peak, self.rss())
