"""Open-loop load: the service sent photos at a set rate (Poisson arrivals), whatever its pace.

    .venv/bin/python -m bench.openloop --rate 400 --seconds 20

A closed loop (bench.load) slows down with the server; an open loop shows how it sheds what it
cannot take: refused at once (503), timed out (504) or lost. Writes
bench/results/openloop_<model>.json. bench.hostile runs the same client at 4x capacity.
"""

from __future__ import annotations

import argparse
import asyncio
from dataclasses import dataclass
from pathlib import Path

from bench.harness import (
    DEMO_MODEL,
    DEMO_REPO,
    RESULTS,
    OpenLoopResult,
    load_images,
    open_loop,
    service,
    write_results,
)


@dataclass
class OpenLoopReport:
    model: str
    images: str
    service_env: list[str]
    load: OpenLoopResult


def summary(r: OpenLoopResult) -> str:
    lines = [
        f"target {r.rate_target:.0f} req/s, arrivals at {r.arrival_rate:.0f} req/s: sent "
        f"{r.sent} ({r.not_sent_in_flight_cap} not: client cap), answered {r.answered}, "
        f"lost {r.lost}, goodput {r.goodput_img_per_s:.1f} img/s",
        f"statuses {r.statuses}  503 Retry-After {r.retry_after_503 or 'no 503s'}",
    ]
    for status, q in r.latency_ms.items():
        lines.append(f"  {status}: p50 {q.p50:.1f} ms  p99 {q.p99:.1f} ms  max {q.max:.1f} ms")
    if r.lost:
        lines.append(f"  lost: {r.lost_reasons}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--repo", type=Path, default=DEMO_REPO)
    p.add_argument("--model", default=DEMO_MODEL)
    p.add_argument("--rate", type=float, default=400.0, help="requests per second, on average")
    p.add_argument("--seconds", type=float, default=10.0, help="of arrivals")
    p.add_argument("--max-requests", type=int, default=40_000)
    p.add_argument("--timeout-s", type=float, default=60.0, help="the client's, per request")
    p.add_argument("--max-in-flight", type=int, default=4096, help="arrivals beyond: not sent")
    p.add_argument("--service-env", nargs="*", default=[], metavar="NAME=VALUE")
    p.add_argument("--out", type=Path, help="default: bench/results/openloop_<model>.json")
    a = p.parse_args(argv)

    images = load_images()
    env = dict(setting.split("=", 1) for setting in a.service_env)
    print(f"open loop at {a.rate:g} req/s for {a.seconds:g} s with {images.source}")
    with service(a.repo, a.model, env) as server:
        result = asyncio.run(
            open_loop(
                server.target(),
                images.bodies,
                a.rate,
                a.seconds,
                a.max_requests,
                a.timeout_s,
                a.max_in_flight,
            )
        )
    print(summary(result))
    report = OpenLoopReport(a.model, images.source, a.service_env, result)
    write_results(a.out or RESULTS / f"openloop_{a.model}.json", report)


if __name__ == "__main__":
    main()
