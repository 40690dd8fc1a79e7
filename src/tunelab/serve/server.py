"""Running the API under uvicorn, with the deadlines a server on a network needs.

uvicorn closes a keep-alive connection that stays idle after an answer
(``timeout_keep_alive``), but sets no deadline for a request to arrive, nor for a client
to read its answer. A client that connects and sends nothing, or sends its headers one byte
at a time (slowloris), keeps its connection open indefinitely. So does a client that stops
reading a long answer while the server waits to write it. :func:`guarded_protocol` is
uvicorn's h11 protocol with two timers added:

* ``read_timeout``: a request's headers must be complete within this many seconds of the
  connection opening or of the previous answer ending. Bytes that keep trickling in do not
  extend it. When it runs out, the connection is closed. (The body's deadline belongs to the
  app: :func:`tunelab.serve.app.create_app`'s ``body_timeout`` answers 408 ``request_timeout``.)
* ``write_timeout``: when the client has left more than the transport's high-water mark
  (64 KiB) of the answer unread for this long, the connection is aborted. The app then sees
  the disconnect and stops generating for it.

The protocol also answers a request it cannot parse (a malformed request line or header,
headers over 16 KiB) with a 400 in OpenAI's error shape instead of uvicorn's plain text.
"""

from __future__ import annotations

import json
import logging
from typing import Any

log = logging.getLogger(__name__)

DEFAULT_READ_TIMEOUT = 30.0
DEFAULT_WRITE_TIMEOUT = 60.0
DEFAULT_KEEP_ALIVE = 5
MAX_INCOMPLETE_HEADERS = 16 * 1024  # h11's limit on headers still arriving; the app's
# HeaderLimit (tunelab.serve.app) applies the same 16 KiB to headers that came in one piece


def guarded_protocol(read_timeout: float = DEFAULT_READ_TIMEOUT,
                     write_timeout: float = DEFAULT_WRITE_TIMEOUT) -> type:
    """uvicorn's ``H11Protocol`` with a header deadline and a write-stall deadline."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    from tunelab.serve.app import error_body

    if read_timeout <= 0 or write_timeout <= 0:
        raise ValueError("read_timeout and write_timeout must be positive")

    class GuardedH11Protocol(H11Protocol):
        def connection_made(self, transport: Any) -> None:
            self._read_timer: Any = None
            self._write_timer: Any = None
            super().connection_made(transport)
            self._arm_read_timer()

        def connection_lost(self, exc: Exception | None) -> None:
            for timer in (self._read_timer, self._write_timer):
                if timer is not None:
                    timer.cancel()
            self._read_timer = self._write_timer = None
            super().connection_lost(exc)

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():
                self._arm_read_timer()  # the next request's headers have read_timeout too

        def _arm_read_timer(self) -> None:
            if self._read_timer is not None:
                self._read_timer.cancel()
            self._read_timer = self.loop.call_later(read_timeout, self._read_timed_out)

        def _read_timed_out(self) -> None:
            self._read_timer = None
            if self.transport.is_closing():
                return
            cycle = self.cycle
            if cycle is not None and not cycle.response_complete:
                return  # a request is being answered; its end arms the timer again
            log.info("closing a connection from %s: no complete request within %g s",
                     _peer(self.client), read_timeout)
            if self.transport.get_write_buffer_size():
                self.transport.abort()  # close() would wait for a client that does not read
            else:
                self.transport.close()

        def pause_writing(self) -> None:
            super().pause_writing()
            if self._write_timer is None:
                self._write_timer = self.loop.call_later(write_timeout, self._write_timed_out)

        def resume_writing(self) -> None:
            super().resume_writing()
            if self._write_timer is not None:
                self._write_timer.cancel()
                self._write_timer = None

        def _write_timed_out(self) -> None:
            self._write_timer = None
            log.info("aborting a connection from %s: it left its answer unread for %g s",
                     _peer(self.client), write_timeout)
            self.transport.abort()  # connection_lost tells the app, which stops generating

        def send_400_response(self, msg: str) -> None:
            body = json.dumps(error_body(
                "the request is not valid HTTP/1.1 (a malformed request line or header, or "
                "headers that are too long)", code="invalid_http")).encode()
            headers = [(b"content-type", b"application/json"),
                       (b"content-length", str(len(body)).encode()),
                       (b"connection", b"close")]
            try:
                out = self.conn.send(h11.Response(status_code=400, headers=headers,
                                                  reason=b"Bad Request"))
                out += self.conn.send(h11.Data(data=body))
                out += self.conn.send(h11.EndOfMessage())
                self.transport.write(out)
            except h11.LocalProtocolError:  # an answer is already under way: just close
                pass
            self.transport.close()

    GuardedH11Protocol.__qualname__ = GuardedH11Protocol.__name__
    return GuardedH11Protocol


def _peer(client: Any) -> str:
    return f"{client[0]}:{client[1]}" if client else "?"


def server_config(app: Any, *, host: str = "127.0.0.1", port: int = 8000,
                  read_timeout: float = DEFAULT_READ_TIMEOUT,
                  write_timeout: float = DEFAULT_WRITE_TIMEOUT,
                  keep_alive_timeout: int = DEFAULT_KEEP_ALIVE, log_level: str = "info",
                  **kwargs: Any) -> Any:
    """A ``uvicorn.Config`` for ``app`` with the guarded protocol and no websockets."""
    import uvicorn

    kwargs.setdefault("timeout_graceful_shutdown", 5)
    return uvicorn.Config(app, host=host, port=port, log_level=log_level,
                          http=guarded_protocol(read_timeout, write_timeout), ws="none",
                          timeout_keep_alive=keep_alive_timeout,
                          h11_max_incomplete_event_size=MAX_INCOMPLETE_HEADERS, **kwargs)
