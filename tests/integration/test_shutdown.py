"""SIGTERM under load: every request a client sends gets one complete answer, counted by the client.

Real replicas (`python -m app.server`) on loopback, uploaders that post ~100 KB photos as
multipart without pause, each on its own keep-alive connection, and a SIGTERM in the middle.
A request is *lost* when it was sent (its connection was open) and no complete HTTP answer came
back: a reset, or a close without an answer. Each lost one is printed with its connection's
events (httpcore's trace): new or kept alive, and when. A connect that is refused is not a
request sent: once the listener has closed, that is what a client must see, and it may retry
elsewhere.

The same through Debian's nginx with deploy/nginx/nginx.conf: a replica stopping behind it
must not show its clients a single 502 (nor nginx's own 503 for "no replica could take it").
"""

from __future__ import annotations

import asyncio
import io
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.integration.stack import Replica, nginx, replicas
from tests.support import TinyRepo

pytestmark = [pytest.mark.integration, pytest.mark.slow]

DELAY_S = 2.0  # the replicas' shutdown delay in these tests
WARM_ANSWERS = 100  # answers before the SIGTERM: every connection is open and in use
LOAD_TIMEOUT_S = 60.0  # the whole load, whatever happens
NGINX_UNAVAILABLE = "no replica could take the request; retry shortly"


def photo(seed: int, side: int = 184) -> bytes:
    """A ~100 KB PNG of noise: like the probes' photos in size, and it does not compress."""
    pixels = np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


@dataclass
class Tally:
    """What the clients saw, each request counted once."""

    statuses: Counter[int] = field(default_factory=Counter)
    lost: Counter[str] = field(default_factory=Counter)  # sent, no answer: the error's name
    # Each lost request: when it was sent and when it failed, in s after the SIGTERM, and why.
    lost_at: list[str] = field(default_factory=list)
    refused: int = 0  # connect refused: nothing was sent
    first_refusal: float | None = None
    answered_after_sigterm: int = 0
    ok_after_sigterm: int = 0  # 200s to requests sent after it
    kept_alive_after_sigterm: int = 0  # requests sent after it, answered without closing
    connected_after_sigterm: int = 0  # new connections the server accepted after it
    bad_503: list[str] = field(default_factory=list)  # 503s without Retry-After or JSON detail
    nginx_own_503: int = 0
    warm_at: float | None = None
    sigterm_at: float | None = None  # when the first SIGTERM was sent

    @property
    def answered(self) -> int:
        return sum(self.statuses.values())

    def summary(self) -> str:
        return (
            f"answered {dict(self.statuses)}, lost {dict(self.lost)}, refused at connect "
            f"{self.refused}, answered after SIGTERM {self.answered_after_sigterm} (200s to "
            f"requests sent after it {self.ok_after_sigterm}), new connections after it "
            f"{self.connected_after_sigterm}"
            + (f"; lost: {self.lost_at[:5]}" if self.lost_at else "")
        )


@dataclass
class Trace:
    """httpcore's trace of one request: the connection it went on (new or kept alive) and when
    each step began and ended, in s after the SIGTERM."""

    tally: Tally
    sent_at: float
    events: list[str] = field(default_factory=list)

    async def record(self, name: str, info: dict[str, Any]) -> None:
        at = time.monotonic() - (self.tally.sigterm_at or self.sent_at)
        step = name.split(".", 1)[1]  # "connection.connect_tcp.complete" -> "connect_tcp.complete"
        if step == "connect_tcp.complete":
            step += f" from port {info['return_value'].get_extra_info('client_addr')[1]}"
            if self.tally.sigterm_at is not None:
                self.tally.connected_after_sigterm += 1
        self.events.append(f"{step} {at:+.3f}")


async def upload_until(
    url: str,
    concurrency: int,
    bodies: list[bytes],
    tally: Tally,
    done: Callable[[], bool],
) -> None:
    """`concurrency` clients post photos one after another until `done()` (or the timeout)."""

    async def client(http: httpx.AsyncClient, n: int) -> None:
        i = n
        while not done():
            body = bodies[i % len(bodies)]
            i += concurrency
            sent_at = time.monotonic()
            trace = Trace(tally, sent_at)
            try:
                response = await http.post(
                    "/classify",
                    files={"image": ("photo.png", body, "image/png")},
                    extensions={"trace": trace.record},
                )
            except httpx.ConnectError:
                tally.refused += 1
                if tally.first_refusal is None:
                    tally.first_refusal = time.monotonic()
                await asyncio.sleep(0.05)
                continue
            except httpx.HTTPError as exc:
                tally.lost[type(exc).__name__] += 1
                since = tally.sigterm_at or sent_at
                tally.lost_at.append(
                    f"sent {sent_at - since:+.3f} s, failed {time.monotonic() - since:+.3f} s: "
                    f"{exc.__cause__ or exc!r}; {trace.events}"
                )
                continue
            tally.statuses[response.status_code] += 1
            if tally.sigterm_at is not None:
                tally.answered_after_sigterm += 1
            if tally.sigterm_at is not None and sent_at > tally.sigterm_at:
                tally.ok_after_sigterm += response.status_code == 200
                if response.headers.get("connection") != "close":
                    tally.kept_alive_after_sigterm += 1
            if response.status_code == 503:
                detail = response.json().get("detail")
                if detail == NGINX_UNAVAILABLE:
                    tally.nginx_own_503 += 1
                if not (isinstance(detail, str) and response.headers.get("retry-after")):
                    tally.bad_503.append(response.text)

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    timeout = httpx.Timeout(30.0, connect=5.0)
    async with httpx.AsyncClient(base_url=url, timeout=timeout, limits=limits) as http:
        await asyncio.wait_for(
            asyncio.gather(*(client(http, n) for n in range(concurrency))), LOAD_TIMEOUT_S
        )


def stop_under_load(
    target: Replica,
    url: str,
    concurrency: int,
    signals: list[float],
    after_exit_s: float,
) -> Tally:
    """Load `url`; SIGTERM `target` at each of `signals` (seconds after the load is warm); go
    on until `after_exit_s` after it has exited."""
    bodies = [photo(seed) for seed in range(8)]
    tally = Tally()
    exited_at: list[float] = []
    warm = threading.Event()

    def done() -> bool:
        if tally.warm_at is None and tally.answered >= WARM_ANSWERS:
            tally.warm_at = time.monotonic()
            warm.set()
        if exited_at:
            return time.monotonic() > exited_at[0] + after_exit_s
        if target.process.poll() is not None:
            exited_at.append(time.monotonic())
        return False

    def signaller() -> None:
        # A thread: the clients' event loop may be too busy to send the signal on time.
        warm.wait(LOAD_TIMEOUT_S)
        if tally.warm_at is None:
            return  # the load ended first: the test fails on its own
        for at in signals:
            time.sleep(max(0.0, tally.warm_at + at - time.monotonic()))
            tally.sigterm_at = tally.sigterm_at or time.monotonic()
            target.process.send_signal(signal.SIGTERM)

    thread = threading.Thread(target=signaller, daemon=True)
    thread.start()
    asyncio.run(upload_until(url, concurrency, bodies, tally, done))
    warm.set()
    thread.join(timeout=5)
    assert exited_at, f"the replica did not exit: {tally.summary()}"
    return tally


PATHS = {
    # name: (shutdown_delay_s, seconds after the first SIGTERM of each signal)
    "delay": (DELAY_S, [0.0]),
    "no_delay": (0.0, [0.0]),
    "second_sigterm": (30.0, [0.0, 1.0]),
}


@pytest.mark.parametrize(
    ("concurrency", "path", "workers"),
    [
        (32, "delay", 1),
        # Here the clients' one event loop reads answers seconds late, then reuses kept-alive
        # connections that were idle all along: once about one run in twenty lost a request,
        # reset on a connection the server closed 2 s after its listener (no longer closed).
        (256, "delay", 1),
        (32, "no_delay", 1),
        (32, "second_sigterm", 1),
        # A supervisor, an engine and two front ends: the supervisor passes the signal on.
        (32, "delay", 2),
        (32, "second_sigterm", 2),
    ],
)
def test_sigterm_under_uploaders_leaves_no_request_without_an_answer(
    tiny_repo: TinyRepo, tmp_path: Path, concurrency: int, path: str, workers: int
) -> None:
    delay_s, signals = PATHS[path]
    settings = {
        "shutdown_delay_s": str(delay_s),
        "drain_timeout_s": "10",
        "workers": str(workers),
    }
    with replicas(tiny_repo.root, tmp_path, 1, **settings) as (replica,):
        tally = stop_under_load(replica, replica.url, concurrency, signals, after_exit_s=0.5)
        code = replica.process.returncode
    print(f"c={concurrency} {path} workers={workers}: {tally.summary()}")
    # Every request sent got one complete answer; nothing ended in a reset.
    assert not tally.lost, tally.summary()
    assert tally.statuses[200] >= WARM_ANSWERS, tally.summary()
    assert not tally.bad_503, tally.bad_503[:3]
    assert set(tally.statuses) <= {200, 503}, tally.summary()
    # The clients went on until after the exit: their connects were refused, not reset.
    assert tally.refused > 0, tally.summary()
    assert tally.sigterm_at is not None and tally.first_refusal is not None
    if delay_s:
        # The listener stayed open through the delay (the second SIGTERM cuts it short, 1 s
        # in): before the SIGTERM every connection was kept alive, after it each answer closes
        # its connection, and the clients' new connections were accepted, not refused...
        # (At c=256 on two cores the requests in flight at the SIGTERM may fill the delay.)
        assert concurrency > 32 or tally.connected_after_sigterm > 0, tally.summary()
        # ... serving as usual, each answer closing its connection (at c=256 on two cores the
        # requests in flight at the SIGTERM may fill the whole delay).
        assert tally.answered_after_sigterm > 0, tally.summary()
        assert concurrency > 32 or tally.ok_after_sigterm > 0, tally.summary()
        assert tally.kept_alive_after_sigterm == 0, tally.summary()
    # Drained and exited by itself, 0 on every path.
    assert code == 0, replica.log_path.read_text()[-3000:]


@pytest.mark.parametrize(("concurrency", "workers"), [(32, 1), (256, 1), (32, 2)])
def test_a_replica_stopping_behind_nginx_shows_its_clients_no_502(
    tiny_repo: TinyRepo, tmp_path: Path, concurrency: int, workers: int
) -> None:
    settings = {
        "shutdown_delay_s": str(DELAY_S),
        "drain_timeout_s": "10",
        "workers": str(workers),
    }
    with (
        replicas(tiny_repo.root, tmp_path, 2, **settings) as pair,
        nginx([r.address for r in pair], tmp_path / "nginx") as lb,
    ):
        stopping = pair[0]
        tally = stop_under_load(stopping, lb.url, concurrency, [0.0], after_exit_s=1.0)
        code = stopping.process.returncode
        served_in_delay = [
            e for e in stopping.access_log() if e.get("path") == "/classify" and e["status"] == 200
        ]
        retried = [e for e in lb.access_log() if ", " in e["upstream_status"]]
    print(
        f"nginx c={concurrency}: {tally.summary()}; nginx retried {len(retried)}, "
        f"the stopping replica answered 200 to {len(served_in_delay)} in all"
    )
    assert tally.statuses == Counter({200: tally.answered}), tally.summary()
    assert tally.statuses[502] == 0 and tally.nginx_own_503 == 0
    assert not tally.lost and tally.refused == 0, tally.summary()
    assert code == 0
    assert all(e["status"] == 200 for e in retried), retried[:3]
