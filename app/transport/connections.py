"""Connection limits of the HTTP server (`python -m app.server`), the pure parts.

- Request heads are bounded: `header_max_bytes` for the request line and headers together and
  `header_max_count` fields (431 beyond), and must arrive within `header_timeout_s` of the
  connection opening or of the request's first byte (408, or a plain close for a connection
  that never sent one).
- Open connections are capped below the open-files limit, so that accepting can never run out
  of file descriptors: the server raises its soft limit to the hard one at start
  (`raise_open_files_limit`), and `connection_caps` keeps room under it for the process's own
  files and for the refusals.
- Answers the HTTP layer gives itself, before any request reaches the app, are the service's
  JSON `{"detail": ...}` (`raw_error_response`).

The protocol that enforces them is `app/transport/httptools.py`.
"""

from __future__ import annotations

import json
import logging
import resource
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from http import HTTPStatus
from pathlib import Path
from typing import Protocol

from app.core.settings import Settings
from app.http.frontdoor import RETRY_AFTER_S

log = logging.getLogger(__name__)

# File descriptors kept for the process itself beyond its connections: the listener, the event
# loop's own, logs, model graphs and TensorRT caches while they load, /proc reads for metrics.
FD_RESERVE = 128
# Connections over `max_connections` that are still answered 503 (with none idle to close);
# beyond this many more a new connection is closed at once.
REFUSAL_ROOM = 64
# Where /proc does not say how high a soft limit may go.
FALLBACK_NR_OPEN = 1 << 20

TOO_MANY_CONNECTIONS = "the server has too many open connections; retry shortly"


def headers_too_large(limit: int) -> str:
    size = f"{limit // 1024} KiB" if limit % 1024 == 0 else f"{limit} bytes"
    return f"the request line and headers are over the {size} limit"


def too_many_headers(limit: int) -> str:
    return f"the request has more than {limit} header fields"


def head_timed_out(seconds: float) -> str:
    return f"the request line and headers were not received within {seconds:g} s"


def malformed(reason: str) -> str:
    return f"not a valid HTTP/1.1 request: {reason.strip().rstrip('.') or 'unreadable'}"


def error_answer(
    status: int, detail: str, request_id: str | None = None
) -> tuple[list[tuple[bytes, bytes]], bytes]:
    """(headers, body) of the service's JSON error, with `Connection: close`, for an answer the
    HTTP layer gives itself: what the app's error handlers send (app/http/errors.py), 503s with
    `Retry-After` as there, and a request id of its own (no request reached the app)."""
    body = json.dumps({"detail": detail}, ensure_ascii=False, separators=(",", ":")).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", b"%d" % len(body)),
        (b"connection", b"close"),
        (b"x-request-id", (request_id or uuid.uuid4().hex).encode("ascii")),
    ]
    if status == 503:
        headers.append((b"retry-after", b"%d" % RETRY_AFTER_S))
    return headers, body


def raw_error_response(
    status: int,
    detail: str,
    default_headers: Iterable[tuple[bytes, bytes]] = (),
    request_id: str | None = None,
) -> bytes:
    """`error_answer` as the bytes of a complete HTTP/1.1 response (after uvicorn's default
    headers: date, server)."""
    headers, body = error_answer(status, detail, request_id)
    lines = [f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\n".encode("ascii")]
    lines += [name + b": " + value + b"\r\n" for name, value in [*default_headers, *headers]]
    return b"".join([*lines, b"\r\n", body])


# --- file descriptors -----------------------------------------------------------------------


class _Limits(Protocol):
    def __call__(self, which: int, /) -> tuple[int, int]: ...


def _nr_open() -> int:
    """The kernel's ceiling for any open-files limit (Linux), or a generous fallback."""
    try:
        return int(Path("/proc/sys/fs/nr_open").read_text())
    except (OSError, ValueError):
        return FALLBACK_NR_OPEN


def raise_open_files_limit(
    getrlimit: _Limits = resource.getrlimit,
    setrlimit: Callable[[int, tuple[int, int]], None] = resource.setrlimit,
    nr_open: Callable[[], int] = _nr_open,
) -> tuple[int, int]:
    """Raise this process's soft open-files limit to its hard limit; (before, after).

    The soft limit is often 1024 while the hard one is far higher: each connection holds a file
    descriptor, and a server that stays at 1024 fails to accept (and resets clients) long before
    the machine is short of anything. A hard limit of "unlimited" is taken as the kernel's
    ceiling (fs.nr_open). Should the raise be refused, the soft limit stays as it was.
    """
    soft, hard = getrlimit(resource.RLIMIT_NOFILE)
    target = nr_open() if hard == resource.RLIM_INFINITY else hard
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (OSError, ValueError) as exc:
            log.warning("could not raise the open-files limit from %d to %d: %s", soft, target, exc)
            return soft, soft
        return soft, target
    return soft, soft


def open_files_limit() -> int:
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return _nr_open() if soft == resource.RLIM_INFINITY else soft


def connection_caps(max_connections: int, open_files: int) -> tuple[int, int]:
    """(cap, ceiling): connections beyond `cap` make room by closing an idle one or are answered
    503; beyond `ceiling` they are closed at once. Both stay `FD_RESERVE` under `open_files`."""
    cap = max(1, min(max_connections, open_files - FD_RESERVE - REFUSAL_ROOM))
    return cap, cap + REFUSAL_ROOM


@dataclass(frozen=True)
class ConnectionLimits:
    header_max_bytes: int
    header_max_count: int
    header_timeout_s: float
    max_connections: int  # the cap after connection_caps
    ceiling: int
    # How long a closing connection may go on sending what it had begun (a body the answer did
    # not need) before it is closed: the body deadline, which bounds any upload anyway.
    linger_s: float

    @classmethod
    def from_settings(cls, settings: Settings, open_files: int) -> ConnectionLimits:
        cap, ceiling = connection_caps(settings.max_connections, open_files)
        if cap < settings.max_connections:
            log.warning(
                "max_connections %d is over what %d open files allow: capped at %d",
                settings.max_connections,
                open_files,
                cap,
            )
        return cls(
            header_max_bytes=settings.header_max_bytes,
            header_max_count=settings.header_max_count,
            header_timeout_s=settings.header_timeout_s,
            max_connections=cap,
            ceiling=ceiling,
            linger_s=settings.body_read_timeout_s,
        )


# --- the connections of one server ------------------------------------------------------------


class IdleConnection(Protocol):
    """A connection the registry can close to make room (app/transport/httptools.py's)."""

    def close_idle(self) -> None: ...


class ConnectionRegistry:
    """What the connections of one server share: the limits, the idle ones, the shedding counts.

    `idle` holds, oldest first, the connections that hold no request: accepted and silent, kept
    alive between requests, or lingering after their answer. At the cap, the oldest of them is
    closed to make room for a new connection (a client that connected to send nothing, or that
    sent its last request long ago, rather than one being served).
    """

    REPORT_EVERY_S = 10.0

    def __init__(self, limits: ConnectionLimits) -> None:
        self.limits = limits
        self.idle: dict[IdleConnection, None] = {}
        self.closed_idle = 0
        self.refused = 0
        self.dropped = 0
        self._reported = (0, 0, 0)
        self._report_at = 0.0

    def oldest_idle(self) -> IdleConnection | None:
        return next(iter(self.idle), None)

    def note(self, closed_idle: int = 0, refused: int = 0, dropped: int = 0) -> None:
        """Count a shed connection; a warning at most every REPORT_EVERY_S says how many."""
        self.closed_idle += closed_idle
        self.refused += refused
        self.dropped += dropped
        now = time.monotonic()
        if now < self._report_at:
            return
        self._report_at = now + self.REPORT_EVERY_S
        counts = (self.closed_idle, self.refused, self.dropped)
        closed, refused_now, dropped_now = (
            a - b for a, b in zip(counts, self._reported, strict=True)
        )
        self._reported = counts
        log.warning(
            "at the connection limit (%d): closed %d idle connection(s), answered %d with 503, "
            "closed %d new one(s) at once, since the last report",
            self.limits.max_connections,
            closed,
            refused_now,
            dropped_now,
        )
