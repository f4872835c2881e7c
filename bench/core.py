"""The first benchmark: raw ONNX Runtime throughput of a graph, then the service under load.

    .venv/bin/python -m bench.core                       # the bundled demo model
    .venv/bin/python -m bench.core --model demo-shapes --requests 400 --out bench/results/core.json

Raw: img/s of `session.run` at batch 1, 8 and 32 on the native grid, in this process.
Service: a uvicorn process on 127.0.0.1 fed the real photos in ../shared/testdata/photos
(generated images when that folder is absent) by an async client at concurrency 1 and 16,
each bounded in request count and time; img/s and p50/p99 latency. Figures are printed and
written to a JSON file. Nothing here asserts on time.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx
import numpy as np
import onnxruntime as ort
from PIL import Image

from app.models.spec import GRAPH_FILENAME, SPEC_FILENAME, ModelSpec
from bench.machine import machine_info

ROOT = Path(__file__).resolve().parent.parent
PHOTOS = ROOT.parent / "shared" / "testdata" / "photos"


@dataclass
class RawResult:
    batch: int
    img_per_s: float
    ms_per_batch_p50: float


@dataclass
class LoadResult:
    concurrency: int
    requests: int
    errors: int
    seconds: float
    img_per_s: float
    latency_ms_p50: float
    latency_ms_p99: float


def raw_throughput(graph: Path, spec: ModelSpec, batch: int, seconds: float) -> RawResult:
    """Median batch time of `session.run` at the native grid, after a warm-up."""
    session = ort.InferenceSession(str(graph), providers=["CPUExecutionProvider"])
    gh, gw = spec.architecture.grid
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (batch, gh, gw, spec.architecture.patch_dim), dtype=np.uint8)
    for _ in range(3):
        session.run(None, {spec.input_name: x})
    times: list[float] = []
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline or len(times) < 5:
        t0 = time.perf_counter()
        session.run(None, {spec.input_name: x})
        times.append(time.perf_counter() - t0)
    p50 = statistics.median(times)
    return RawResult(batch=batch, img_per_s=batch / p50, ms_per_batch_p50=p50 * 1000)


def load_images(limit: int) -> tuple[list[bytes], str]:
    if PHOTOS.is_dir():
        files = sorted(PHOTOS.glob("*.*"))[:limit]
        return [f.read_bytes() for f in files], f"{len(files)} photos from {PHOTOS}"
    rng = np.random.default_rng(0)
    images = []
    for _ in range(min(limit, 20)):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (375, 500, 3), dtype=np.uint8)).save(buf, "JPEG")
        images.append(buf.getvalue())
    return images, "20 generated 500x375 JPEGs (../shared/testdata/photos is absent)"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


async def _wait_ready(client: httpx.AsyncClient, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if (await client.get("/readyz")).status_code == 200:
                return
        except httpx.TransportError:
            pass
        await asyncio.sleep(0.2)
    raise TimeoutError("the service did not become ready")


async def load(
    base_url: str,
    model: str,
    images: list[bytes],
    concurrency: int,
    requests: int,
    max_seconds: float,
) -> LoadResult:
    """`requests` POSTs (or as many as fit in `max_seconds`) from `concurrency` workers."""
    latencies: list[float] = []
    errors = 0
    sent = 0
    stop_at = time.monotonic() + max_seconds
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=base_url, timeout=60, limits=limits) as client:

        async def worker() -> None:
            nonlocal sent, errors
            while sent < requests and time.monotonic() < stop_at:
                body = images[sent % len(images)]
                sent += 1
                t0 = time.perf_counter()
                r = await client.post(
                    "/classify",
                    params={"model": model},
                    content=body,
                    headers={"content-type": "image/jpeg"},
                )
                latencies.append(time.perf_counter() - t0)
                if r.status_code != 200:
                    errors += 1

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - t0
    lat = np.array(latencies) * 1000
    return LoadResult(
        concurrency=concurrency,
        requests=len(latencies),
        errors=errors,
        seconds=round(elapsed, 2),
        img_per_s=len(latencies) / elapsed,
        latency_ms_p50=float(np.percentile(lat, 50)),
        latency_ms_p99=float(np.percentile(lat, 99)),
    )


async def service_bench(
    repo: Path, model: str, images: list[bytes], concurrencies: list[int], requests: int
) -> list[LoadResult]:
    port = free_port()
    env = {**os.environ, "VIT_SERVE_MODEL_REPO": str(repo)}
    cmd = [
        sys.executable,
        "-m",
        "uvicorn",
        "app.main:create_app",
        "--factory",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--log-level",
        "warning",
    ]
    server = subprocess.Popen(cmd, cwd=ROOT, env=env)
    try:
        base = f"http://127.0.0.1:{port}"
        async with httpx.AsyncClient(base_url=base) as client:
            await _wait_ready(client, timeout_s=60)
        results = []
        for c in concurrencies:
            await load(base, model, images, c, min(requests, 20), max_seconds=10)  # warm-up
            results.append(await load(base, model, images, c, requests, max_seconds=60))
        return results
    finally:
        server.terminate()
        server.wait(timeout=30)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--repo", type=Path, default=ROOT / "model_repo")
    p.add_argument("--model", default="demo-shapes")
    p.add_argument("--requests", type=int, default=300, help="per concurrency level")
    p.add_argument("--raw-seconds", type=float, default=3.0, help="per batch size")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "core.json")
    a = p.parse_args(argv)

    spec = ModelSpec.load(a.repo / a.model / SPEC_FILENAME)
    version = max(spec.versions)
    graph = a.repo / a.model / str(version) / GRAPH_FILENAME
    raw = [raw_throughput(graph, spec, b, a.raw_seconds) for b in (1, 8, 32)]
    for r in raw:
        print(
            f"raw onnxruntime  batch {r.batch:>2}: {r.img_per_s:8.1f} img/s "
            f"({r.ms_per_batch_p50:.2f} ms/batch)"
        )
    images, source = load_images(100)
    print(f"service load with {source}")
    served = asyncio.run(service_bench(a.repo, a.model, images, [1, 16], a.requests))
    for s in served:
        print(
            f"service concurrency {s.concurrency:>2}: {s.img_per_s:8.1f} img/s  "
            f"p50 {s.latency_ms_p50:.1f} ms  p99 {s.latency_ms_p99:.1f} ms  "
            f"({s.requests} requests, {s.errors} errors)"
        )
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(
        json.dumps(
            {
                "model": a.model,
                "version": version,
                "grid": list(spec.architecture.grid),
                "images": source,
                "machine": machine_info(),
                "raw": [asdict(r) for r in raw],
                "service": [asdict(s) for s in served],
            },
            indent=2,
        )
        + "\n"
    )
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
