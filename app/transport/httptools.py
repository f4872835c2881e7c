"""uvicorn's httptools protocol with the limits of `app/transport/connections.py`, and a lingering
close.

Why httptools, with the limits added here, rather than uvicorn's h11 protocol (which has an
incomplete-event size limit of its own): h11 parses in Python, and the event loop's CPU per
request is what this service runs short of under load (docs/performance.md); the checks below
cost a few counters per request and a timer per request head.

What it adds to uvicorn's `HttpToolsProtocol`:
- The head of each request (request line and headers) is bounded in bytes, in fields and in
  time: 431 or 408 with the service's JSON body, counted as the bytes arrive, so a 64 MB header
  is refused after the first `header_max_bytes` rather than buffered whole.
- Malformed HTTP gets a JSON 400 naming what the parser found, instead of uvicorn's plain text.
- A connection that closes while the client may still be sending (an answer given before the
  whole body was read: 401, 413, 415, a 503, any answer with `Connection: close`) closes
  lingering, as nginx does: the answer, then FIN, then the rest of what the client sends is
  read and dropped until it closes its side (or `linger_s` passes). Closing a socket with unread
  data makes the kernel send a reset, and a client that gets one loses the answer it was sent.
- Open connections are capped (see `ConnectionRegistry`): the oldest idle one makes room for a
  new one; with none idle, the new one is answered 503 and closed.
- On shutdown (`shutdown()`, called for each connection when the listener has closed) no
  connection is cut short: a request under way is answered, then the connection closes; one
  that is kept alive, or accepted and not yet used, keeps its own timers (the keep-alive and
  head timeouts) and a request that arrives on it is answered with `Connection: close`.
  Closing those at once, as uvicorn does, races their clients: a client reusing a kept-alive
  connection a moment after the server closed it sees its request reset. The drain timeout
  (uvicorn's `timeout_graceful_shutdown`) bounds how long they are waited for.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, ClassVar, cast

import httptools
from uvicorn._types import ASGIReceiveCallable, ASGISendCallable, Scope
from uvicorn.config import Config
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.server import ServerState

from app.transport.connections import (
    TOO_MANY_CONNECTIONS,
    ConnectionRegistry,
    error_answer,
    head_timed_out,
    headers_too_large,
    malformed,
    raw_error_response,
    too_many_headers,
)

log = logging.getLogger("app.transport.connections")

# A lingering close ends when the client sends nothing for this long.
LINGER_IDLE_S = 2.0
# After a 408 for a head that did not arrive in time, the client gets only this long to stop.
LINGER_AFTER_TIMEOUT_S = 2.0


class HeadLimitError(Exception):
    """Raised in a parser callback: the request's head is over a limit (431)."""


class _ClosingTransport(asyncio.Transport):
    """The connection's transport as uvicorn sees it: every close goes through the protocol,
    which closes at once or lingers (`GuardedHttpToolsProtocol._close_requested`)."""

    def __init__(self, transport: asyncio.Transport, protocol: GuardedHttpToolsProtocol) -> None:
        super().__init__()
        self.inner = transport
        self._protocol = protocol
        self._closing = False

    def close(self) -> None:
        if not self._closing:
            self._closing = True
            self._protocol._close_requested()

    def is_closing(self) -> bool:
        return self._closing or self.inner.is_closing()

    def write(self, data: bytes | bytearray | memoryview[Any]) -> None:
        self.inner.write(data)

    def writelines(self, list_of_data: Any) -> None:
        self.inner.writelines(list_of_data)

    def write_eof(self) -> None:
        self.inner.write_eof()

    def can_write_eof(self) -> bool:
        return self.inner.can_write_eof()

    def abort(self) -> None:
        self._closing = True
        self.inner.abort()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self.inner.get_extra_info(name, default)

    def pause_reading(self) -> None:
        self.inner.pause_reading()

    def resume_reading(self) -> None:
        self.inner.resume_reading()

    def is_reading(self) -> bool:
        return self.inner.is_reading()

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self.inner.set_write_buffer_limits(high, low)

    def get_write_buffer_size(self) -> int:
        return self.inner.get_write_buffer_size()

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return self.inner.get_write_buffer_limits()

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self.inner.set_protocol(protocol)

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self.inner.get_protocol()


async def _refuse_connection(
    scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable
) -> None:
    """The app of a connection over the cap: 503 with the JSON detail, then close (lingering)."""
    headers, body = error_answer(503, TOO_MANY_CONNECTIONS)
    await send({"type": "http.response.start", "status": 503, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    """One connection. Subclassed per server by `protocol_class`, which sets `registry`."""

    registry: ClassVar[ConnectionRegistry]

    def __init__(
        self,
        config: Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self.limits = self.registry.limits
        self._head_timer: asyncio.TimerHandle | None = None
        self._message_open = False  # a request has begun and its last byte is not in yet
        self._in_head = False  # ... and its line and headers are not complete yet
        self._head_raw = 0  # bytes received while the head was incomplete
        self._head_fields = 0  # bytes of the URL and the header fields parsed so far
        self._header_count = 0
        self._linger_timer: asyncio.TimerHandle | None = None
        self._linger_budget_s = self.limits.linger_s
        self._linger_until = 0.0
        self._last_read = 0.0
        self.lingering = False
        self.draining = False  # the listener has closed: every answer closes its connection

    # --- opening and closing --------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # (uvloop's transports are not asyncio.Transport instances, only alike.)
        super().connection_made(_ClosingTransport(cast(asyncio.Transport, transport), self))
        registry = self.registry
        open_now = len(self.connections)
        if open_now > self.limits.max_connections:
            oldest = registry.oldest_idle()
            if oldest is not None:
                oldest.close_idle()
                registry.note(closed_idle=1)
            elif open_now > self.limits.ceiling:
                registry.note(dropped=1)
                self._close_now()
                return
            else:
                registry.note(refused=1)
                self.app = _refuse_connection
        registry.idle[self] = None
        self._arm_head_timer(self.limits.header_timeout_s)

    def connection_lost(self, exc: Exception | None) -> None:
        self.registry.idle.pop(self, None)
        if isinstance(self.transport, _ClosingTransport):
            self.transport._closing = True  # gone: nothing to linger for
        for timer in (self._head_timer, self._linger_timer):
            if timer is not None:
                timer.cancel()
        self._head_timer = self._linger_timer = None
        super().connection_lost(exc)

    def _inner(self) -> asyncio.Transport:
        transport = self.transport
        return transport.inner if isinstance(transport, _ClosingTransport) else transport

    def _close_now(self) -> None:
        self.registry.idle.pop(self, None)
        if isinstance(self.transport, _ClosingTransport):
            self.transport._closing = True
        self._inner().close()

    def close_idle(self) -> None:
        """Close a connection that holds no request (to make room, or on shutdown)."""
        self._close_now()

    def _close_requested(self) -> None:
        """uvicorn (or this class) closes the connection: at once when everything the client
        sent has been read, else lingering so that the answer is not lost to a reset."""
        if not self._message_open or self.lingering:
            self._close_now()
            return
        self.lingering = True
        for timer in (self._head_timer, self.timeout_keep_alive_task):
            if timer is not None:
                timer.cancel()
        self._head_timer = self.timeout_keep_alive_task = None
        self.registry.idle[self] = None  # holds no request any more: the first to make room
        inner = self._inner()
        if inner.can_write_eof():
            inner.write_eof()  # FIN once the answer has gone
        self.flow.resume_reading()
        now = self.loop.time()
        self._last_read = now
        self._linger_until = now + self._linger_budget_s
        self._linger_timer = self.loop.call_later(
            min(LINGER_IDLE_S, self._linger_budget_s), self._linger_check
        )

    def _linger_check(self) -> None:
        self._linger_timer = None
        now = self.loop.time()
        quiet_until = self._last_read + LINGER_IDLE_S
        if now >= self._linger_until or now >= quiet_until:
            self._close_now()
        else:
            self._linger_timer = self.loop.call_at(
                min(quiet_until, self._linger_until), self._linger_check
            )

    def shutdown(self) -> None:
        """The listener has closed: a request under way is answered, then the connection
        closes. Any other connection keeps its own timers (see the module's docstring)."""
        self.draining = True
        if self.cycle is not None and not self.cycle.response_complete:
            self.cycle.keep_alive = False  # answered, then closed

    # --- request heads ------------------------------------------------------------------------

    def _arm_head_timer(self, delay_s: float) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
        self._head_timer = self.loop.call_later(delay_s, self._head_timed_out)

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self.transport.is_closing():
            return
        if self._message_open and (self.cycle is None or self.cycle.response_complete):
            self._linger_budget_s = LINGER_AFTER_TIMEOUT_S
            self._refuse(408, head_timed_out(self.limits.header_timeout_s))
        elif not self._message_open:
            self.close_idle()  # connected and never sent a request

    def data_received(self, data: bytes) -> None:
        if self.lingering:
            self._last_read = self.loop.time()
            return
        self.registry.idle.pop(self, None)
        self._unset_keepalive_if_required()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            if self._should_upgrade():
                self.handle_websocket_upgrade()
            else:
                self._unsupported_upgrade_warning()
            return
        except httptools.HttpParserError as exc:
            cause = exc.__context__
            if isinstance(cause, HeadLimitError):
                self._refuse(431, str(cause))
            else:
                reason = str(cause) if isinstance(cause, httptools.HttpParserError) else str(exc)
                self._refuse(400, malformed(reason))
            return
        if self._in_head:
            # The head is still incomplete: this chunk was all head (or nearly: a chunk that
            # also ended the previous request is counted whole). A single huge header is
            # caught here, before the parser has buffered much more than the limit.
            self._head_raw += len(data)
            if self._head_raw > self.limits.header_max_bytes:
                self._refuse(431, headers_too_large(self.limits.header_max_bytes))

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._message_open = self._in_head = True
        self._head_raw = self._head_fields = self._header_count = 0
        if self._head_timer is None:
            self._arm_head_timer(self.limits.header_timeout_s)

    def on_url(self, url: bytes) -> None:
        self.url += url
        self._head_fields += len(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_count += 1
        if self._header_count > self.limits.header_max_count:
            raise HeadLimitError(too_many_headers(self.limits.header_max_count))
        self._head_fields += len(name) + len(value) + 4  # ": " and CRLF
        if self._head_fields > self.limits.header_max_bytes:
            raise HeadLimitError(headers_too_large(self.limits.header_max_bytes))
        name = name.lower()
        # As uvicorn's own: llhttp keeps trailing whitespace, which RFC 9110 (5.5) excludes
        # from a field's value.
        value = value.rstrip(b" \t")
        if name == b"expect" and value.lower() == b"100-continue":
            self.expect_100_continue = True
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        self._in_head = False
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        super().on_headers_complete()
        if self.draining and self.cycle is not None:
            self.cycle.keep_alive = False  # a request after the listener closed: answered, closed

    def on_message_complete(self) -> None:
        self._message_open = False
        super().on_message_complete()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self.timeout_keep_alive_task is not None:  # kept alive, waiting for a request
            self.registry.idle[self] = None

    def send_400_response(self, msg: str) -> None:
        self._refuse(400, malformed(msg))

    def _refuse(self, status: int, detail: str) -> None:
        """Answer a request the app never saw with the JSON error, then close (lingering)."""
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete:
            # A request is with the app (a body that turned out malformed): the app's answer
            # is dropped, and if it has begun one, no second answer can follow it.
            started = cycle.response_started
            cycle.disconnected = True
            cycle.message_event.set()
            if started:
                self.transport.close()
                return
        log.info("refused a request from %s: %d %s", _client(self.client), status, detail)
        self.transport.write(raw_error_response(status, detail, self.server_state.default_headers))
        self.transport.close()


def _client(client: tuple[str, int] | None) -> str:
    return f"{client[0]}:{client[1]}" if client else "?"


def protocol_class(registry: ConnectionRegistry) -> type[GuardedHttpToolsProtocol]:
    """The protocol for one server's `uvicorn.Config(http=...)`, sharing `registry`."""
    return type("ServerHttpProtocol", (GuardedHttpToolsProtocol,), {"registry": registry})
