"""The HTTP server in front of the service: uvicorn with h11's parser and its limits, on the command's own event loop.

uvicorn's httptools parser (its default where httptools is installed, as Ray Serve's proxy runs it) reads request
heads of any size; h11's stops at ``HEAD_LIMIT_BYTES``. :class:`BoundedH11Protocol` is uvicorn's h11 protocol
with what a server facing unknown clients needs on top of those real settings:

- a request head (request line and headers) over the limit (h11's while it arrives, :class:`HeadLimits` once it is
  complete) is answered 414 (the request line alone is over it) or
  431 (the headers), any other malformed request 400, all in JSON like every other error, and the connection is
  closed a moment later without reading the rest (nothing of the oversized head is kept);
- a connection must deliver each request's complete head within ``--idle-timeout-s`` of opening or of its previous
  response, bytes trickling in or not (uvicorn's keep-alive timer restarts on every byte): past it, 408 where part
  of a head arrived, else the connection is simply closed. The body is the request's own deadline's business
  (``serve.pipeline``).

:class:`Server` is uvicorn's server without its signal handlers: ``serve.launch`` owns SIGINT / SIGTERM and drains.
"""

from __future__ import annotations

import contextlib
import json
import logging

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import STATUS_PHRASES, H11Protocol

#: Most bytes of a request line and headers together (h11's incomplete-event limit).
HEAD_LIMIT_BYTES = 64 * 1024
#: Seconds a connection stays open after an error answer that did not read the whole request.
LINGER_S = 1.0


class BoundedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a deadline for every request head and JSON answers to malformed requests."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.head_timeout_s = float(self.config.timeout_keep_alive)
        self._head_timer = None

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._arm_head_timer()

    def connection_lost(self, exc) -> None:
        self._cancel_head_timer()
        super().connection_lost(exc)

    def handle_events(self) -> None:
        super().handle_events()
        if self.conn.their_state is not h11.IDLE:  # a complete request head arrived (or the connection failed)
            self._cancel_head_timer()

    def on_response_complete(self) -> None:
        if not self.transport.is_closing():
            self._arm_head_timer()  # for the next request's head; a pipelined one already here cancels it
        super().on_response_complete()

    def send_400_response(self, msg: str) -> None:
        buffered, _ = self.conn.trailing_data
        if len(buffered) > HEAD_LIMIT_BYTES:
            if b"\n" not in buffered[:HEAD_LIMIT_BYTES]:
                self._answer(414, f"request line (URL) over {HEAD_LIMIT_BYTES // 1024} KiB")
            else:
                self._answer(431, f"request headers over {HEAD_LIMIT_BYTES // 1024} KiB")
        else:
            self._answer(400, "malformed HTTP request")

    def _arm_head_timer(self) -> None:
        self._cancel_head_timer()
        self._head_timer = self.loop.call_later(self.head_timeout_s, self._head_timeout)

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timeout(self) -> None:
        self._head_timer = None
        if self.transport.is_closing() or self.conn.their_state is not h11.IDLE:
            return
        if self.conn.trailing_data[0]:
            self._answer(408, f"request head not received within {self.head_timeout_s:g} s (--idle-timeout-s)")
        else:
            self.transport.close()

    def _answer(self, status: int, message: str) -> None:
        """A JSON error, then close: reading stops at once and the socket is closed after ``LINGER_S``, so the
        client reads the answer before its unread bytes reset the connection."""
        body = json.dumps({"error": message}).encode("utf-8")
        head = (b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\nconnection: close\r\n\r\n"
                % (status, STATUS_PHRASES[status], len(body)))
        self.transport.write(head + body)
        self._cancel_head_timer()
        with contextlib.suppress(RuntimeError):
            self.transport.pause_reading()
        self.loop.call_later(LINGER_S, self.transport.close)


class HeadLimits:
    """ASGI middleware: the same limits for a request head h11 parsed in one piece (its incomplete-event limit only
    applies while a head is still arriving): 414 for a URL, 431 for headers over ``HEAD_LIMIT_BYTES``."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            url = len(scope.get("raw_path", b"")) + len(scope.get("query_string", b""))
            headers = sum(len(name) + len(value) + 4 for name, value in scope.get("headers", ()))
            if url > HEAD_LIMIT_BYTES or url + headers > HEAD_LIMIT_BYTES:
                status = 414 if url > HEAD_LIMIT_BYTES else 431
                what = "request line (URL)" if status == 414 else "request headers"
                body = json.dumps({"error": f"{what} over {HEAD_LIMIT_BYTES // 1024} KiB"}).encode("utf-8")
                await send({"type": "http.response.start", "status": status, "headers": [
                    (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode("ascii")),
                    (b"connection", b"close")]})
                await send({"type": "http.response.body", "body": body})
                return
        await self.app(scope, receive, send)


class Server(uvicorn.Server):
    """uvicorn's server, leaving the process's signal handlers alone."""

    @contextlib.contextmanager
    def capture_signals(self):
        yield


def make_server(app, host: str, port: int, idle_timeout_s: float) -> Server:
    logging.getLogger("uvicorn.error").setLevel(logging.ERROR)  # not a line per malformed request a client sends
    config = uvicorn.Config(HeadLimits(app), host=host, port=port, http=BoundedH11Protocol,
                            h11_max_incomplete_event_size=HEAD_LIMIT_BYTES, timeout_keep_alive=idle_timeout_s,
                            lifespan="off", access_log=False, log_level="warning", log_config=None,
                            server_header=False)
    return Server(config)
