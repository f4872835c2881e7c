"""What HTTP alone costs per request: the floor under the service's event loop.

Three servers, side by side on the same photos and client (bench.harness), one image per
request as `bench.load` sends them:
- `asgi`: a bare ASGI app under uvicorn with httptools and uvloop, as the service runs it; it
  reads the body and answers a fixed JSON of the service's size. No decoding, no inference: its
  CPU per request is what HTTP costs before any framework.
- `fastapi`: the same answer from one FastAPI route that reads the body (the framework's own
  routing, request and response objects).
- `service`: `python -m app.server` over the bundled demo model; its event loop thread alone.

    .venv/bin/python -m bench.http_floor     # about 7 minutes; bench/results/http_floor.json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request, Response

from bench.harness import (
    ROOT,
    LoadResult,
    Server,
    free_port,
    load_images,
    run_levels,
    running,
    service,
    write_results,
)

RESULTS = ROOT / "bench" / "results" / "http_floor.json"


@dataclass
class Report:
    images: str
    levels: list[LoadResult]


# The size of the service's answer for top_k=5 (the JSON bench.load gets back).
ANSWER = json.dumps(
    {
        "model": "demo-shapes",
        "version": 2,
        "predictions": [
            {"label": f"label-{i}", "index": i, "score": 0.2 - i / 100} for i in range(5)
        ],
    }
).encode()
JSON_HEADERS = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(ANSWER))]


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """The bare ASGI app: the whole body read, the fixed answer sent."""
    if scope["type"] == "lifespan":
        while (await receive())["type"] != "lifespan.shutdown":
            await send({"type": "lifespan.startup.complete"})
        await send({"type": "lifespan.shutdown.complete"})
        return
    while (await receive()).get("more_body"):
        pass
    await send({"type": "http.response.start", "status": 200, "headers": JSON_HEADERS})
    await send({"type": "http.response.body", "body": ANSWER})


framework = FastAPI()


@framework.get("/readyz")
async def ready() -> dict[str, str]:
    return {"status": "ready"}


@framework.post("/classify")
async def classify(request: Request) -> Response:
    await request.body()
    return Response(ANSWER, media_type="application/json")


@contextlib.contextmanager
def floor_server(name: str, target: str) -> Iterator[Server]:
    port = free_port()
    cmd = [sys.executable, "-m", "uvicorn", target, "--port", str(port), "--no-access-log"]
    cmd += ["--http", "httptools", "--loop", "uvloop", "--log-level", "warning"]
    with running(name, cmd, {}, port, "/classify", False, cwd=ROOT) as server:
        yield server


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--concurrency", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--requests", type=int, default=30000, help="per level and server")
    parser.add_argument("--seconds", type=float, default=60.0, help="per level and server")
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args(argv)
    photos = load_images()
    images = photos.bodies
    with (
        floor_server("asgi", "bench.http_floor:app") as asgi,
        floor_server("fastapi", "bench.http_floor:framework") as fast,
        service(ROOT / "model_repo", "demo-shapes") as svc,
    ):
        targets = [asgi.target(), fast.target(), svc.target()]
        results = asyncio.run(
            run_levels(targets, images, args.concurrency, args.requests, args.seconds, args.rounds)
        )
    rows: list[LoadResult] = [r for name in results for r in results[name]]
    print("| server | c | req/s | server CPU ms/req | event loop ms/req |")
    print("|---|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r.server} | {r.concurrency} | {r.img_per_s:.0f} | "
            f"{r.server_cpu_ms_per_image} | {r.event_loop_cpu_ms_per_image} |"
        )
    write_results(RESULTS, Report(photos.source, rows))
    print(f"written: {RESULTS}")


if __name__ == "__main__":
    main()
