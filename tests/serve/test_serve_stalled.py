"""Clients that stall: they connect and send nothing, trickle their headers, stop in the
middle of a body, or never read their answer. The server keeps serving everyone else and
closes the stalled connection itself (``tunelab.serve.server``'s read and write deadlines,
and the app's body deadline). A full queue is answered with 503 in OpenAI's shape.

The server here runs the same ``server_config`` as ``tunelab serve``, with deadlines of a
couple of seconds. "Eventually" means within a generous 60 s, and nothing asserts on speed."""

from __future__ import annotations

import asyncio
import json
import select
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import pytest

from tests.serve.conftest import running_uvicorn
from tunelab.serve.app import create_app
from tunelab.serve.server import server_config

READ_TIMEOUT = 2.0
WRITE_TIMEOUT = 2.0
KEEP_ALIVE = 1
EVENTUALLY = 60.0


@contextmanager
def guarded_server(app, *, sndbuf: int | None = None, **timeouts) -> Iterator[tuple[str, object]]:
    """``app`` under uvicorn with tunelab's protocol and timeouts (see ``running_uvicorn``)."""
    config = server_config(app, log_level="warning", lifespan="on", **timeouts)
    with running_uvicorn(config, sndbuf=sndbuf) as running:
        yield running


@pytest.fixture(scope="module")
def guarded(engine):
    app = create_app(engine, max_tokens_limit=500, max_request_bytes=64 * 1024,
                     body_timeout=READ_TIMEOUT)
    with guarded_server(app, sndbuf=4096, read_timeout=READ_TIMEOUT,
                        write_timeout=WRITE_TIMEOUT, keep_alive_timeout=KEEP_ALIVE) as running:
        yield running


def open_connections(server) -> int:
    return len(server.server_state.connections)


def wait_until(predicate, timeout: float = EVENTUALLY) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("the server did not get there in time")
        time.sleep(0.05)


def settled(server) -> int:
    """The number of open connections once earlier clients' keep-alives have ended."""
    wait_until(lambda: open_connections(server) == 0)
    return 0


def connect(url: str, rcvbuf: int | None = None) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if rcvbuf:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.connect((host, int(port)))
    return sock


def read_until_closed(sock: socket.socket, timeout: float = EVENTUALLY) -> bytes:
    """Everything the server sends until it closes (or resets) the connection."""
    sock.settimeout(timeout)
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except ConnectionResetError:
        pass
    except TimeoutError:
        raise AssertionError(f"the server kept the connection open; got {data[:200]!r}") \
            from None
    finally:
        sock.close()
    return data


def served_meanwhile(url: str) -> None:
    """Another client gets an answer while stalled connections are open."""
    r = httpx.post(f"{url}/v1/chat/completions", timeout=EVENTUALLY, json={
        "model": "b", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 5,
        "temperature": 0})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] <= 5
    assert httpx.get(f"{url}/v1/models", timeout=EVENTUALLY).status_code == 200


def request_head(path: str = "/v1/chat/completions", **headers: str) -> bytes:
    lines = [f"POST {path} HTTP/1.1", "Host: test", *(f"{k.replace('_', '-')}: {v}"
                                                      for k, v in headers.items())]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def test_connections_that_send_nothing_are_closed_while_others_are_served(guarded):
    url, server = guarded
    before = settled(server)
    silent = [connect(url) for _ in range(20)]
    wait_until(lambda: open_connections(server) >= before + 20)
    served_meanwhile(url)
    for sock in silent:
        assert read_until_closed(sock) == b""  # closed without a word
    wait_until(lambda: open_connections(server) <= before)


def test_trickled_headers_do_not_extend_the_deadline(guarded):
    """Slowloris: a byte of header every 50 ms, on a new connection and on a kept-alive one.
    If the bytes extended the deadline, these connections would never be closed."""
    url, server = guarded
    settled(server)
    fresh = connect(url)
    kept = connect(url)
    kept.sendall(b"GET /v1/models HTTP/1.1\r\nHost: test\r\n\r\n")
    kept.settimeout(EVENTUALLY)
    assert kept.recv(65536).startswith(b"HTTP/1.1 200")
    sent = {fresh: 0, kept: 0}
    for sock in sent:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: test\r\n")
        sock.setblocking(False)
    other = threading.Thread(target=served_meanwhile, args=(url,))
    other.start()
    line = b"X-Slow: 1\r\n"
    deadline = time.monotonic() + EVENTUALLY
    trickling = set(sent)
    while trickling and time.monotonic() < deadline:
        for sock in list(trickling):
            try:
                readable, _, _ = select.select([sock], [], [], 0)
                if readable and sock.recv(65536) == b"":
                    raise ConnectionResetError
                i = sent[sock] % len(line)
                sent[sock] += sock.send(line[i:i + 1])
            except (ConnectionResetError, BrokenPipeError):
                trickling.discard(sock)
                sock.close()
        time.sleep(0.05)
    other.join()
    assert not trickling, f"still open after trickling {sent} bytes"
    assert min(sent.values()) >= 3, sent  # they were closed while bytes kept coming


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
def test_a_body_that_stalls_gets_408_and_the_connection_is_closed(guarded, framing):
    url, server = guarded
    settled(server)
    stalled = []
    for _ in range(5):
        sock = connect(url)
        if framing == "content-length":
            sock.sendall(request_head(Content_Type="application/json", Content_Length="1000")
                         + b'{"model": ')
        else:
            sock.sendall(request_head(Content_Type="application/json",
                                      Transfer_Encoding="chunked") + b'a\r\n{"model": \r\n')
        stalled.append(sock)
    served_meanwhile(url)
    for sock in stalled:
        answer = read_until_closed(sock)
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 408"), answer[:300]
        assert b"connection: close" in head.lower()
        error = json.loads(body)["error"]
        assert error["code"] == "request_timeout" and error["type"] == "invalid_request_error"
    wait_until(lambda: open_connections(server) == 0)


def test_a_client_that_never_reads_its_stream_is_dropped(guarded):
    """A long stream fills the socket buffers and the transport's 64 KiB: after the write
    deadline the server aborts the connection. A short answer fits in the buffers; the
    server finishes it and closes the connection after the keep-alive timeout."""
    url, server = guarded
    settled(server)

    def stream_request(max_tokens: int) -> bytes:
        body = json.dumps({"model": "tiny", "messages": [{"role": "user", "content": "hello"}],
                           "max_tokens": max_tokens, "temperature": 0, "stream": True,
                           "stream_options": {"include_usage": True}}).encode()
        return request_head(Content_Type="application/json",
                            Content_Length=str(len(body))) + body

    long_ = connect(url, rcvbuf=4096)
    long_.sendall(stream_request(480))  # ~90 KB of events from the tiny model; the buffers
    # of both sockets (4 KiB asked, 8 KiB given) and the transport's 64 KiB hold about 72 KB
    short = connect(url, rcvbuf=4096)
    short.sendall(stream_request(4))
    served_meanwhile(url)
    wait_until(lambda: open_connections(server) == 0)  # both dropped, neither read a byte
    cut = read_until_closed(long_)
    assert cut.startswith(b"HTTP/1.1 200"), cut[:300]
    assert b"data: [DONE]" not in cut, \
        "the whole answer fitted in the socket buffers: the test needs a longer stream"
    whole = read_until_closed(short)
    assert whole.startswith(b"HTTP/1.1 200") and b"data: [DONE]" in whole
    served_meanwhile(url)


def test_a_full_queue_answers_503_in_openai_shape(tiny_model_dir, adapter_dirs):
    from tunelab.serve.engine import Engine

    engine = Engine.load(str(tiny_model_dir), [("a", str(adapter_dirs["a"]))], name="tiny",
                         device="cpu", max_batch_size=1, batch_wait_ms=0, max_queue=1)
    with guarded_server(create_app(engine)) as (url, _):
        async def burst() -> list[httpx.Response]:
            async with httpx.AsyncClient(base_url=url, timeout=EVENTUALLY) as client:
                return list(await asyncio.gather(*(client.post("/v1/chat/completions", json={
                    "model": "a", "messages": [{"role": "user", "content": f"hello {i}"}],
                    "max_tokens": 32, "temperature": 0}) for i in range(24))))

        answers = asyncio.run(burst())
        statuses = {r.status_code for r in answers}
        assert statuses == {200, 503}, statuses
        for r in answers:
            if r.status_code == 503:
                error = r.json()["error"]
                assert error["code"] == "overloaded" and error["type"] == "server_error"
                assert "retry" in error["message"] and r.headers["retry-after"] == "1"
        again = httpx.post(f"{url}/v1/chat/completions", timeout=EVENTUALLY, json={
            "model": "a", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 4})
        assert again.status_code == 200
    engine.close()
