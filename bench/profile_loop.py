"""Where the service's event loop spends its time under load: py-spy on the running server.

    .venv/bin/pip install --target build/tools py-spy
    .venv/bin/python -m bench.profile_loop --py-spy build/tools/bin/py-spy

Starts `python -m app.server` on the bundled model repository, loads it at concurrency 64 with
the photos, records every thread with `py-spy record --threads --nonblocking --format raw`
meanwhile, and prints the event loop thread's samples grouped by where they are (the raw
stacks are kept in build/profile_loop.txt for anything finer).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import subprocess
from pathlib import Path

from bench.harness import DEMO_MODEL, DEMO_REPO, ROOT, closed_loop, load_images, service

BUCKETS = (  # (label, a frame text that puts a sample there), first match wins
    ("softmax + top-k (app/pipeline/postprocess.py)", "postprocess.py"),
    ("request id (uuid4)", "_request_id"),
    ("hand-offs between threads (futures)", "futures.py"),
    ("hand-offs between threads (futures)", "ThreadPoolExecutor.submit"),
    ("batcher (queue, hand-off to the lane)", "batcher.py"),
    ("batcher (queue, hand-off to the lane)", "batches.py"),
    ("answer JSON and pydantic", "pydantic"),
    ("route, parameters, body, service (other)", "app/http/routes.py"),
    ("route, parameters, body, service (other)", "app/pipeline/service.py"),
    ("vit-serve middleware (log, metrics, admission)", "app/http/middleware.py"),
    ("framework layers (uvicorn/starlette/fastapi)", "starlette"),
    ("framework layers (uvicorn/starlette/fastapi)", "fastapi"),
    ("HTTP parsing and writes (httptools protocol)", "httptools_impl.py"),
    ("HTTP parsing and writes (httptools protocol)", "httptools.py"),
)
UVLOOP = "uvloop's C code (socket I/O, callbacks, wake-ups from threads)"


def bucket(frames: list[str]) -> str:
    if frames and frames[-1].startswith("Runner.run"):
        return UVLOOP  # nothing in Python below the loop: its C code
    stack = ";".join(frames)
    for label, text in BUCKETS:
        if text in stack:
            return label
    return "other"


def event_loop_shares(raw: Path) -> dict[str, float]:
    counts: collections.Counter[str] = collections.Counter()
    for line in raw.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        frames = stack.split(";")
        if "MainThread" in frames[0]:
            counts[bucket(frames[1:])] += int(n)
    total = sum(counts.values()) or 1
    return {label: round(n / total, 3) for label, n in counts.most_common()}


async def record(py_spy: Path, raw: Path, seconds: float, concurrency: int) -> str:
    images = load_images().bodies
    with service(DEMO_REPO, DEMO_MODEL) as server:
        target = server.target()
        await closed_loop(target, images, concurrency, 400, 10)  # warm-up
        cmd = [str(py_spy), "record", "-p", str(server.pid), "-o", str(raw), "--format", "raw"]
        cmd += ["-d", str(int(seconds)), "--threads", "--nonblocking", "-r", "200"]
        profiler = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        result = await closed_loop(target, images, concurrency, 10**6, seconds + 2, cpu=True)
        profiler.wait()
    return result.line()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--py-spy", type=Path, default=Path("py-spy"))
    p.add_argument("--seconds", type=float, default=25.0)
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--raw", type=Path, default=ROOT / "build" / "profile_loop.txt")
    a = p.parse_args(argv)
    print(asyncio.run(record(a.py_spy, a.raw, a.seconds, a.concurrency)))
    for label, share in event_loop_shares(a.raw).items():
        print(f"{100 * share:5.1f}% {label}")


if __name__ == "__main__":
    main()
