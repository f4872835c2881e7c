"""The HTTP server's connection limits (app/transport/connections.py and httptools.py), in
process.

The protocol is driven through a fake transport: bytes in, the bytes it writes and whether it
half-closes or closes. tests/integration/test_connection_limits.py does the same over sockets.
"""

from __future__ import annotations

import asyncio
import json
import logging
import resource
from collections.abc import Iterator
from typing import Any

import pytest
import uvicorn
from uvicorn.server import ServerState

from app.core.settings import Settings
from app.transport import httptools as protocol_module
from app.transport.connections import (
    FD_RESERVE,
    REFUSAL_ROOM,
    TOO_MANY_CONNECTIONS,
    ConnectionLimits,
    ConnectionRegistry,
    connection_caps,
    raise_open_files_limit,
    raw_error_response,
)
from app.transport.httptools import GuardedHttpToolsProtocol, protocol_class

pytestmark = pytest.mark.anyio

GET = b"GET /x HTTP/1.1\r\nhost: t\r\n\r\n"


# --- the pure parts -------------------------------------------------------------------------


def test_connections_are_capped_below_the_open_files_limit() -> None:
    assert connection_caps(4096, 1_048_576) == (4096, 4096 + REFUSAL_ROOM)
    # The probe's machine: 1,024 open files leave room for the process and the refusals.
    cap, ceiling = connection_caps(4096, 1024)
    assert (cap, ceiling) == (1024 - FD_RESERVE - REFUSAL_ROOM, 1024 - FD_RESERVE)
    assert connection_caps(4096, 100) == (1, 1 + REFUSAL_ROOM)  # absurdly few: still serves


def test_the_soft_open_files_limit_is_raised_to_the_hard_one() -> None:
    calls: list[tuple[int, int]] = []

    def setrlimit(_: int, limits: tuple[int, int]) -> None:
        calls.append(limits)

    assert raise_open_files_limit(lambda _: (1024, 524288), setrlimit) == (1024, 524288)
    assert calls == [(524288, 524288)]
    # "unlimited" is the kernel's ceiling; at the hard limit already, nothing to do.
    infinite = resource.RLIM_INFINITY
    assert raise_open_files_limit(lambda _: (1024, infinite), setrlimit, lambda: 9999) == (
        1024,
        9999,
    )
    assert calls[-1] == (9999, infinite)
    assert raise_open_files_limit(lambda _: (4096, 4096), setrlimit) == (4096, 4096)
    assert len(calls) == 2


def test_a_refused_raise_keeps_the_limit_and_says_so(caplog: pytest.LogCaptureFixture) -> None:
    def refuse(_: int, __: tuple[int, int]) -> None:
        raise ValueError("not allowed")

    with caplog.at_level(logging.WARNING):
        assert raise_open_files_limit(lambda _: (1024, 4096), refuse) == (1024, 1024)
    assert "could not raise the open-files limit from 1024 to 4096" in caplog.text


def test_the_http_layers_own_answers_are_the_services_json_errors() -> None:
    raw = raw_error_response(503, "busy", [(b"server", b"uvicorn")], request_id="r1")
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    assert lines[0] == "HTTP/1.1 503 Service Unavailable"
    assert lines[1:] == [
        "server: uvicorn",
        "content-type: application/json",
        f"content-length: {len(body)}",
        "connection: close",
        "x-request-id: r1",
        "retry-after: 1",
    ]
    assert json.loads(body) == {"detail": "busy"}
    assert b"retry-after" not in raw_error_response(431, "big")


# --- the protocol through a fake transport ----------------------------------------------------


class FakeTransport(asyncio.Transport):
    def __init__(self, protocol: asyncio.Protocol) -> None:
        super().__init__()
        self.protocol = protocol
        self.written = bytearray()
        self.eof_written = False
        self.closed = False

    def write(self, data: Any) -> None:
        assert not self.closed
        self.written += data

    def write_eof(self) -> None:
        self.eof_written = True

    def can_write_eof(self) -> bool:
        return True

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            asyncio.get_running_loop().call_soon(self.protocol.connection_lost, None)

    def is_closing(self) -> bool:
        return self.closed

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"peername": ("127.0.0.1", 5555), "sockname": ("127.0.0.1", 80)}.get(name, default)

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def answer(self) -> tuple[int, dict[str, Any]]:
        head, _, body = bytes(self.written).partition(b"\r\n\r\n")
        return int(head.split()[1]), json.loads(body)


async def ok_app(scope: Any, receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    while (await receive()).get("more_body"):
        pass
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})


class Server:
    """One server's protocols, as uvicorn makes them, over fake transports."""

    def __init__(self, **settings: Any) -> None:
        self.limits = ConnectionLimits.from_settings(
            Settings(**{"header_timeout_s": 5.0, **settings}), open_files=1_000_000
        )
        self.registry = ConnectionRegistry(self.limits)
        self.config = uvicorn.Config(ok_app, log_config=None, http=protocol_class(self.registry))
        self.config.load()
        self.state = ServerState()

    def connect(self) -> tuple[GuardedHttpToolsProtocol, FakeTransport]:
        cls = self.config.http_protocol_class
        protocol = cls(config=self.config, server_state=self.state, app_state={})  # type: ignore[call-arg]
        assert isinstance(protocol, GuardedHttpToolsProtocol)
        transport = FakeTransport(protocol)
        protocol.connection_made(transport)
        return protocol, transport


@pytest.fixture
def quick_linger(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setattr(protocol_module, "LINGER_IDLE_S", 0.05)
    yield


async def settle(seconds: float = 0.02) -> None:
    await asyncio.sleep(seconds)


async def test_a_request_is_served_and_the_connection_kept() -> None:
    server = Server()
    protocol, transport = server.connect()
    protocol.data_received(GET)
    await settle()
    assert transport.written.startswith(b"HTTP/1.1 200 OK")
    assert not transport.closed
    assert protocol in server.registry.idle  # kept alive between requests: first to make room


async def test_too_many_fields_and_too_many_bytes_are_431s(quick_linger: None) -> None:
    server = Server(header_max_count=3, header_max_bytes=1024)
    protocol, transport = server.connect()
    protocol.data_received(b"GET / HTTP/1.1\r\na: 1\r\nb: 2\r\nc: 3\r\nd: 4\r\n\r\n")
    assert transport.answer() == (431, {"detail": "the request has more than 3 header fields"})
    # One header, sent in pieces, never finished: refused once the head passes the limit,
    # with what the client sends on read and dropped.
    protocol, transport = server.connect()
    protocol.data_received(b"GET / HTTP/1.1\r\nx: ")
    for _ in range(4):
        protocol.data_received(b"a" * 300)
    status, body = transport.answer()
    assert (status, body["detail"]) == (
        431,
        "the request line and headers are over the 1 KiB limit",
    )
    assert transport.eof_written and not transport.closed  # lingering: the answer, then FIN
    protocol.data_received(b"a" * 10_000)  # dropped
    await settle(0.15)
    assert transport.closed  # quiet for LINGER_IDLE_S


async def test_a_connection_at_the_cap_closes_the_oldest_idle_one() -> None:
    server = Server(max_connections=2)
    _, first_t = server.connect()
    _, second_t = server.connect()
    _, third_t = server.connect()
    assert first_t.closed and not second_t.closed and not third_t.closed
    assert server.registry.closed_idle == 1


async def test_with_none_idle_a_connection_over_the_cap_is_answered_503() -> None:
    server = Server(max_connections=1)
    busy, _ = server.connect()
    busy.data_received(b"GET / HTTP/1.1\r\n")  # part-way through a head: not idle
    refused, transport = server.connect()
    refused.data_received(GET)
    await settle()
    assert transport.answer() == (503, {"detail": TOO_MANY_CONNECTIONS})
    assert b"retry-after: 1" in transport.written
    assert transport.closed  # everything it sent was read: closed at once
    assert server.registry.refused == 1


async def test_at_shutdown_no_connection_is_cut_short() -> None:
    """The listener has closed: kept-alive and new connections keep their own timers, so a
    request already on its way on one is answered (then closed), never reset."""
    server = Server(header_timeout_s=2.5)  # keep-alive: uvicorn's 5 s
    kept, kept_t = server.connect()
    kept.data_received(GET)
    await settle()
    assert kept_t.written.startswith(b"HTTP/1.1 200 OK") and not kept_t.closed
    kept_t.written.clear()
    late, late_t = server.connect()  # accepted; its request not in yet
    silent, silent_t = server.connect()  # accepted; never sends one
    busy, busy_t = server.connect()
    busy.data_received(b"POST /x HTTP/1.1\r\nhost: t\r\ncontent-length: 4\r\n\r\nab")
    for protocol in (kept, late, silent, busy):
        protocol.shutdown()
    await settle(2.2)  # longer than the 2 s that shutdown once gave them
    assert not (kept_t.closed or late_t.closed or silent_t.closed or busy_t.closed)
    # The client reuses its kept-alive connection; another sends its first request; the one
    # under way ends its body: each answered once, with Connection: close, then closed.
    kept.data_received(GET)
    late.data_received(GET)
    busy.data_received(b"cd")
    await settle()
    for transport in (kept_t, late_t, busy_t):
        head = bytes(transport.written).partition(b"\r\n\r\n")[0]
        assert head.startswith(b"HTTP/1.1 200 OK") and b"connection: close" in head, head
        assert transport.written.count(b"HTTP/1.1") == 1 and transport.closed
    # Silence still ends at the connection's own head timeout, not sooner.
    assert not silent_t.closed
    await settle(0.4)
    assert silent_t.closed and not silent_t.written
