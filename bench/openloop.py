"""Open-loop load: requests at a set mean rate (Poisson arrivals), whatever the server's pace.

A closed-loop client (bench.load) sends its next request only after an answer, so an overloaded
server slows its own load down. An open-loop one keeps sending at the rate it was given, as
independent users do, which is what shows how a server sheds load it cannot take: refused at once
(503), timed out (504), or lost. Each request is its own task on a keep-alive connection from an
idle pool (a new one when none is idle), so a slow answer never holds back the next send.

Bounded: arrivals stop after `seconds` or `max_requests`, every request has a client-side timeout,
and at most `max_in_flight` requests are outstanding (an arrival beyond that is not sent and is
counted, so that a hung server cannot make the client open connections without end).
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from dataclasses import dataclass

import numpy as np

from bench.load import Connection, Reply


@dataclass(frozen=True)
class Outcome:
    status: int | None  # None: no answer (client timeout or a broken connection)
    seconds: float  # from the send's start (connecting included) to the whole answer
    retry_after: str | None  # the answer's Retry-After header
    failure: str | None  # why there was no answer


@dataclass
class OpenLoopResult:
    rate_target: float  # requests per second asked for
    seconds_target: float
    sent: int
    not_sent_in_flight_cap: int  # arrivals dropped by the client itself: should be 0
    send_seconds: float  # first arrival to last
    arrival_rate: float  # (sent + not sent) / send_seconds: below the target if the client lagged
    send_rate: float  # sent / send_seconds
    send_lag_ms_p99: float  # how late arrivals left against their schedule
    answered: int
    lost: int  # sent - answered: a timeout or a broken connection
    lost_reasons: dict[str, int]
    statuses: dict[str, int]
    latency_ms: dict[str, dict[str, float]]  # status -> count, p50, p99, max
    goodput_img_per_s: float  # 200s per second, first send to last answer
    retry_after_503: dict[str, int]  # header value ("missing" when absent) -> count
    max_in_flight_seen: int
    in_flight_each_second: list[int]  # requests outstanding, sampled once a second of sending
    wall_seconds: float  # until the last answer
    client_cpu_s_per_s: float  # this process's CPU use: its share of the machine's cores


class _Pool:
    """Idle keep-alive connections; a request takes one or opens its own."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.idle: list[Connection] = []
        self.opened: set[Connection] = set()

    async def take(self) -> tuple[Connection, bool]:
        """A connection, and whether it served a request before."""
        if self.idle:
            return self.idle.pop(), True
        conn = await Connection.open(self.port)
        self.opened.add(conn)
        return conn, False

    async def give_back(self, conn: Connection, reply: Reply | None) -> None:
        # A connection without a whole answer, or one the server said it closes, is not reused.
        if reply is not None and reply.headers.get("connection", "").lower() != "close":
            self.idle.append(conn)
            return
        self.opened.discard(conn)
        await conn.close()

    async def close(self) -> None:
        for conn in list(self.opened):
            await conn.close()
        self.opened.clear()
        self.idle.clear()


async def _one(pool: _Pool, path: str, body: bytes, timeout_s: float) -> Outcome:
    t0 = time.perf_counter()
    conn: Connection | None = None
    reply: Reply | None = None
    failure: str | None = None
    # Where a failure happened, for the report: connecting points at the listen backlog,
    # sending at a server that stopped reading, receiving at one that gave up on the request.
    stage = "connecting"
    try:
        async with asyncio.timeout(timeout_s):
            conn, reused = await pool.take()
            connection = "a reused connection" if reused else "a new connection"
            stage = f"sending on {connection}"
            await conn.send("POST", path, body)
            stage = f"receiving on {connection}"
            reply = await conn.receive()
    except TimeoutError:
        failure = f"client timeout ({stage})"
    except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as exc:
        failure = f"{type(exc).__name__} ({stage})"
    except Exception as exc:  # an answer that is not HTTP: the server's fault, counted as lost
        failure = f"bad reply: {type(exc).__name__} ({stage})"
    seconds = time.perf_counter() - t0
    if conn is not None:
        await pool.give_back(conn, reply)
    if reply is None:
        return Outcome(None, seconds, None, failure)
    return Outcome(reply.status, seconds, reply.headers.get("retry-after"), None)


def _quantiles(seconds: list[float]) -> dict[str, float]:
    ms = np.array(seconds) * 1e3
    return {
        "count": len(seconds),
        "p50": round(float(np.percentile(ms, 50)), 2),
        "p99": round(float(np.percentile(ms, 99)), 2),
        "max": round(float(ms.max()), 2),
    }


async def open_loop(
    port: int,
    path: str,
    images: list[bytes],
    rate: float,
    seconds: float,
    max_requests: int,
    timeout_s: float,
    max_in_flight: int = 4096,
    seed: int = 0,
) -> OpenLoopResult:
    """POST `images` in turn to `path` at `rate` per second on average for `seconds`."""
    rng = random.Random(seed)
    loop = asyncio.get_running_loop()
    pool = _Pool(port)
    tasks: set[asyncio.Task[Outcome]] = set()
    done: list[Outcome] = []
    lags: list[float] = []
    sent = skipped = peak = 0
    in_flight: list[int] = []

    def finished(task: asyncio.Task[Outcome]) -> None:
        tasks.discard(task)
        done.append(task.result())

    cpu0, wall0 = time.process_time(), time.perf_counter()
    start = next_at = loop.time()
    last_send = start
    try:
        while sent + skipped < max_requests and next_at - start < seconds:
            now = loop.time()
            if next_at > now:
                await asyncio.sleep(next_at - now)
                continue
            # Arrivals that fell due while the loop was busy all leave now: the mean rate holds.
            lags.append(now - next_at)
            if now - start >= len(in_flight):
                in_flight.append(len(tasks))
            if len(tasks) >= max_in_flight:
                skipped += 1
            else:
                body = images[sent % len(images)]
                task = asyncio.create_task(_one(pool, path, body, timeout_s))
                tasks.add(task)
                task.add_done_callback(finished)
                sent += 1
                peak = max(peak, len(tasks))
            last_send = now
            next_at += rng.expovariate(rate)
        if tasks:
            await asyncio.wait(set(tasks))
    finally:
        await pool.close()
    wall = time.perf_counter() - wall0
    cpu = time.process_time() - cpu0
    send_seconds = max(last_send - start, 1e-9)

    statuses = Counter(str(o.status) for o in done if o.status is not None)
    by_status: dict[str, list[float]] = {}
    for o in done:
        if o.status is not None:
            by_status.setdefault(str(o.status), []).append(o.seconds)
    retry_after = Counter(o.retry_after or "missing" for o in done if o.status == 503)
    answered = sum(statuses.values())
    return OpenLoopResult(
        rate_target=round(rate, 1),
        seconds_target=seconds,
        sent=sent,
        not_sent_in_flight_cap=skipped,
        send_seconds=round(send_seconds, 2),
        arrival_rate=round((sent + skipped) / send_seconds, 1),
        send_rate=round(sent / send_seconds, 1),
        send_lag_ms_p99=round(float(np.percentile(np.array(lags or [0.0]) * 1e3, 99)), 2),
        answered=answered,
        lost=sent - answered,
        lost_reasons=dict(Counter(o.failure or "" for o in done if o.status is None)),
        statuses=dict(sorted(statuses.items())),
        latency_ms={s: _quantiles(v) for s, v in sorted(by_status.items())},
        goodput_img_per_s=round(statuses.get("200", 0) / wall, 1),
        retry_after_503=dict(retry_after),
        max_in_flight_seen=peak,
        in_flight_each_second=in_flight,
        wall_seconds=round(wall, 2),
        client_cpu_s_per_s=round(cpu / wall, 2),
    )
