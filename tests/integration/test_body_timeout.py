"""A client that trickles its body is cut off with a 408, against the real server (uvicorn).

The in-process client (httpx over ASGI) hands the app a whole body at once, so the deadline is
tested here over a real socket: headers with a Content-Length, then a byte every 0.2 s.
"""

from __future__ import annotations

import contextlib
import json
import select
import socket
import threading
import time
from collections.abc import Iterator
from urllib.parse import urlsplit

import httpx
import pytest

from tests.images import png
from tests.integration.live import LiveServer, run_server
from tests.support import TinyRepo

pytestmark = pytest.mark.integration

TIMEOUT_S = 1.0
TRICKLE_EVERY_S = 0.2  # far within any per-chunk timeout: only a whole-body deadline ends it
DECLARED = 1000  # Content-Length promised: at 5 bytes/s the body would take 200 s
TIMED_OUT = (
    "the request body was not received within 1 s: send it without pauses, and on a slow link "
    "fewer or smaller images per request"
)


@pytest.fixture(scope="module")
def server(tiny_repo: TinyRepo, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    log_path = tmp_path_factory.mktemp("server") / "uvicorn.log"
    with contextlib.ExitStack() as stack:
        # The server's environment is copied as it starts: the variable is needed only then.
        with pytest.MonkeyPatch.context() as env:
            env.setenv("VIT_SERVE_BODY_READ_TIMEOUT_S", str(TIMEOUT_S))
            live = stack.enter_context(run_server(tiny_repo.root, tiny_repo.name, log_path))
        yield live


@contextlib.contextmanager
def trickling(base_url: str) -> Iterator[socket.socket]:
    """A connection that has sent a POST's headers and none of its body yet."""
    url = urlsplit(base_url)
    host, port = url.hostname or "127.0.0.1", url.port or 80
    with socket.create_connection((host, port), timeout=10 * TIMEOUT_S) as sock:
        head = (
            f"POST /classify HTTP/1.1\r\nHost: {host}:{port}\r\n"
            f"Content-Type: image/png\r\nContent-Length: {DECLARED}\r\n\r\n"
        )
        sock.sendall(head.encode("ascii"))
        yield sock


def trickle_until_answered(sock: socket.socket) -> tuple[bytes, int]:
    """Send a byte every TRICKLE_EVERY_S until the server answers; (its answer, bytes sent).

    Reads to the end of the stream, so it also fails (socket timeout) if the server keeps the
    connection open after answering.
    """
    sent = 0
    deadline = time.monotonic() + 10 * TIMEOUT_S  # bounds a broken run; nothing is timed
    while not select.select([sock], [], [], TRICKLE_EVERY_S)[0]:
        if time.monotonic() > deadline:
            raise TimeoutError(f"no answer after {sent} trickled bytes")
        sock.sendall(b"\x89")
        sent += 1
    chunks = []
    with contextlib.suppress(ConnectionResetError):  # a byte that crossed the server's close
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks), sent


def parse(raw: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    assert len(body) == int(headers["content-length"]), raw
    return int(status_line.split()[1]), headers, body


def test_a_trickled_body_is_cut_off_with_a_408_while_others_are_served(
    server: LiveServer,
) -> None:
    # (request, status, whether the trickling client had its answer yet)
    served: list[tuple[str, int, bool]] = []
    answered = threading.Event()

    def others() -> None:
        with httpx.Client(base_url=server.base_url, timeout=5) as client:
            time.sleep(TRICKLE_EVERY_S)  # the trickle is under way
            for _ in range(2):
                response = client.get("/healthz")
                served.append(("GET /healthz", response.status_code, answered.is_set()))
                response = client.post(
                    "/classify", content=png(64, 64), headers={"content-type": "image/png"}
                )
                served.append(("POST /classify", response.status_code, answered.is_set()))

    meanwhile = threading.Thread(target=others)
    with trickling(server.base_url) as sock:
        meanwhile.start()
        raw, sent = trickle_until_answered(sock)
        answered.set()
    meanwhile.join(timeout=10)

    status, headers, body = parse(raw)
    # Cut off by the deadline over the whole body (the detail names it), though each byte
    # came well within any per-read timeout; and not at the first pause: bytes were taken.
    assert (status, json.loads(body)) == (408, {"detail": TIMED_OUT})
    assert headers["connection"] == "close"
    assert sent >= 3, sent
    # The server went on answering others while this client held its request open.
    assert [(what, code) for what, code, _ in served] == [
        ("GET /healthz", 200),
        ("POST /classify", 200),
    ] * 2
    assert not served[0][2], served
    assert httpx.get(f"{server.base_url}/healthz", timeout=5).status_code == 200
