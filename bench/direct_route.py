"""What serving POST /classify past the router saves (app/http/direct.py), side by side.

    .venv/bin/python -m bench.direct_route
    .venv/bin/python -m bench.direct_route --requests 400 --rounds 12

One app in this process, over the bundled model repository, with an instant backend (the
graph's cost is not what is compared): each round sends the same raw-body PNG requests straight
to the ASGI app, once through the direct route and once through Starlette's router (the direct
route switched off for that half), and measures the event loop thread's CPU time per request
(time.thread_time: decoding runs in the pool's threads, so it is not in it). Rounds alternate
which goes first; the medians and their difference are printed and written to
bench/results/direct_route.json.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from app.core.settings import Settings
from app.http.direct import DirectRoute
from app.main import create_app
from app.models.repository import ModelVersion
from bench.harness import DEMO_REPO, RESULTS, write_results
from tests.images import png


@dataclass
class DirectRouteReport:
    requests_per_round: int
    rounds: int
    direct_us: list[float]  # event-loop CPU per request, each round
    router_us: list[float]
    direct_median_us: float
    router_median_us: float
    saved_median_us: float  # router - direct, the median of the rounds' differences


class Instant:
    provider = "fake"

    def __init__(self, version: ModelVersion) -> None:
        self.num_classes = version.spec.architecture.num_classes

    def run(self, patches: NDArray[np.uint8]) -> NDArray[np.float32]:
        return np.zeros((len(patches), self.num_classes), np.float32)


@contextmanager
def router_only() -> Iterator[None]:
    original = DirectRoute.matches
    DirectRoute.matches = lambda self, scope: False  # type: ignore[method-assign]
    try:
        yield
    finally:
        DirectRoute.matches = original  # type: ignore[method-assign]


async def one_request(app: Any, body: bytes) -> int:
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/classify",
        "raw_path": b"/classify",
        "query_string": b"top_k=3",
        "root_path": "",
        "headers": [
            (b"host", b"bench"),
            (b"content-type", b"image/png"),
            (b"content-length", str(len(body)).encode()),
        ],
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 8000),
        "state": {},
    }
    sent = False
    status = 0

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if sent:
            await asyncio.sleep(3600)
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]

    await app(scope, receive, send)
    return status


async def measure(app: Any, body: bytes, requests: int) -> float:
    started = time.thread_time()
    for _ in range(requests):
        status = await one_request(app, body)
        if status != 200:
            raise RuntimeError(f"POST /classify answered {status}")
    return (time.thread_time() - started) / requests * 1e6


async def run(requests: int, rounds: int) -> DirectRouteReport:
    settings = Settings(model_repo=DEMO_REPO, warmup=False, log_level="WARNING")
    app = create_app(settings, backend_factory=Instant, rollout_factory=lambda v: None)
    body = png(64, 64)
    direct: list[float] = []
    router: list[float] = []
    async with app.router.lifespan_context(app):
        await measure(app, body, 50)  # warm: imports, caches, the OpenAPI document
        for r in range(rounds):
            order = ("direct", "router") if r % 2 == 0 else ("router", "direct")
            for mode in order:
                if mode == "direct":
                    direct.append(await measure(app, body, requests))
                else:
                    with router_only():
                        router.append(await measure(app, body, requests))
    saved = [b - a for a, b in zip(direct, router, strict=True)]
    return DirectRouteReport(
        requests_per_round=requests,
        rounds=rounds,
        direct_us=[round(x, 1) for x in direct],
        router_us=[round(x, 1) for x in router],
        direct_median_us=round(statistics.median(direct), 1),
        router_median_us=round(statistics.median(router), 1),
        saved_median_us=round(statistics.median(saved), 1),
    )


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--requests", type=int, default=300, help="per round and path")
    p.add_argument("--rounds", type=int, default=10)
    args = p.parse_args(argv)
    report = asyncio.run(run(args.requests, args.rounds))
    print(
        f"event loop CPU per request: direct {report.direct_median_us} us, router "
        f"{report.router_median_us} us; saved {report.saved_median_us} us (median of "
        f"{report.rounds} rounds of {report.requests_per_round})"
    )
    write_results(RESULTS / "direct_route.json", report)


if __name__ == "__main__":
    main()
