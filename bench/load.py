"""Load benchmark: the service against the machine's limit and a naive server, in one run.

    .venv/bin/python -m bench.load                                  # the bundled demo model
    .venv/bin/python -m bench.export_tiny && \\
    .venv/bin/python -m bench.load --repo build/bench_repo --model vit-ti16
    .venv/bin/python -m bench.load --soak-minutes 10                # and a soak at saturation
    .venv/bin/python -m bench.load --service-env VIT_SERVE_RUNTIME_INSTANCES=2 \
        VIT_SERVE_INTRA_OP_THREADS=1 --out bench/results/load_demo-shapes_per_core.json

In one process and one run, side by side:
- raw: `session.run` of the same graph in this process at batch sizes 1..64 on the native grid
  (the best img/s is the machine's limit; batch 1's median is the raw single-image latency);
- service: `python -m app.server` (uvicorn, continuous batching) on a free 127.0.0.1 port;
- naive: `bench.naive_server` (the same graph and preprocessing, `session.run` per request);
each at concurrency 1, 4, 16 and 64, bounded in requests and seconds per level, fed the real
photos in ../shared/testdata/photos (generated JPEGs when that folder is absent), one image per
request with the raw body. Both servers run at once and each level alternates between them in
`--rounds` rounds (default 4); every figure is the median over the rounds, so a noisy minute on
a shared machine falls on both. The client is a minimal HTTP/1.1 keep-alive client on asyncio
streams: on a 2-core machine the client shares the CPU with the server, so it must cost little.
The service's batch-size distribution is read from its /metrics histogram.

`--soak-minutes N` then runs the service at concurrency 64 for N minutes, sampling its resident
memory (/proc) and counting requests lost (no 200 answer). Figures are printed and written to
bench/results/load_<model>.json with a PNG plot beside it. Nothing here asserts on time.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import math
import os
import re
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np
import onnxruntime as ort
from PIL import Image

from app.models.spec import GRAPH_FILENAME, SPEC_FILENAME, ModelSpec
from bench.machine import machine_info

ROOT = Path(__file__).resolve().parent.parent
PHOTOS = ROOT.parent / "shared" / "testdata" / "photos"
HOST = "127.0.0.1"
CONCURRENCY = (1, 4, 16, 64)
RAW_BATCHES = (1, 4, 8, 16, 32, 64)


# --- the raw limit --------------------------------------------------------------------------


@dataclass
class RawResult:
    batch: int
    img_per_s: float
    ms_per_batch_p50: float
    spinning: bool = False
    when: str = "before"
    cpu_ms_per_image: float = 0.0  # this process's CPU time (every ORT thread) per image


def raw_sweep(graph: Path, spec: ModelSpec, seconds: float, when: str) -> list[RawResult]:
    """Every batch size, with ORT's threads spinning between runs and without (the service's
    default): alone on a machine spinning is a little faster, beside other work much slower;
    the machine's limit is the better of the two."""
    results = []
    for spinning in (True, False):
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.add_session_config_entry(
            "session.intra_op.allow_spinning", "1" if spinning else "0"
        )
        session = ort.InferenceSession(str(graph), options, providers=["CPUExecutionProvider"])
        for batch in RAW_BATCHES:
            r = raw_throughput(session, spec, batch, seconds)
            r.spinning, r.when = spinning, when
            results.append(r)
            print(
                f"    raw ({when}, spinning {'on ' if spinning else 'off'}) batch {batch:>2}: "
                f"{r.img_per_s:8.1f} img/s ({r.ms_per_batch_p50:.2f} ms, "
                f"{r.cpu_ms_per_image:.2f} ms CPU per image)"
            )
    return results


def raw_throughput(
    session: ort.InferenceSession, spec: ModelSpec, batch: int, seconds: float
) -> RawResult:
    """Median batch time of `session.run` at the native grid, after a warm-up."""
    gh, gw = spec.architecture.grid
    x = np.random.default_rng(0).integers(
        0, 256, (batch, gh, gw, spec.architecture.patch_dim), dtype=np.uint8
    )
    for _ in range(3):
        session.run(None, {spec.input_name: x})
    times: list[float] = []
    stop_at = time.perf_counter() + seconds
    cpu0 = time.process_time()
    while (time.perf_counter() < stop_at or len(times) < 5) and len(times) < 100_000:
        t0 = time.perf_counter()
        session.run(None, {spec.input_name: x})
        times.append(time.perf_counter() - t0)
    cpu_ms = (time.process_time() - cpu0) * 1e3 / (batch * len(times))
    p50 = statistics.median(times)
    return RawResult(
        batch=batch, img_per_s=batch / p50, ms_per_batch_p50=p50 * 1e3, cpu_ms_per_image=cpu_ms
    )


# --- images ---------------------------------------------------------------------------------


def load_images(limit: int = 100) -> tuple[list[bytes], str]:
    files = sorted(PHOTOS.glob("*.*"))[:limit] if PHOTOS.is_dir() else []
    if files:
        return [f.read_bytes() for f in files], f"{len(files)} photos from {PHOTOS}"
    print(f"note: {PHOTOS} is absent; sending 20 generated 500x375 JPEGs instead")
    rng = np.random.default_rng(0)
    images = []
    for _ in range(20):
        buf = io.BytesIO()
        pixels = rng.integers(0, 256, (375, 500, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(buf, "JPEG", quality=90)
        images.append(buf.getvalue())
    return images, "20 generated 500x375 JPEGs (../shared/testdata/photos is absent)"


# --- a small HTTP/1.1 client ----------------------------------------------------------------


@dataclass(frozen=True)
class Reply:
    status: int
    headers: dict[str, str]  # lower-case names; a repeated header keeps its last value
    body: bytes


class Connection:
    """One keep-alive HTTP/1.1 connection: POST a body, read status and body."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, port: int) -> Connection:
        reader, writer = await asyncio.open_connection(HOST, port)
        return cls(reader, writer)

    async def request(self, method: str, path: str, body: bytes = b"") -> tuple[int, bytes]:
        reply = await self.exchange(method, path, body)
        return reply.status, reply.body

    async def exchange(
        self, method: str, path: str, body: bytes = b"", content_type: str = "image/jpeg"
    ) -> Reply:
        """One request and its whole reply (Content-Length bodies only: what the service sends)."""
        await self.send(method, path, body, content_type)
        return await self.receive()

    async def send(
        self, method: str, path: str, body: bytes = b"", content_type: str = "image/jpeg"
    ) -> None:
        head = (
            f"{method} {path} HTTP/1.1\r\nHost: {HOST}\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        )
        self.writer.write(head.encode() + body)
        await self.writer.drain()

    async def receive(self) -> Reply:
        header = await self.reader.readuntil(b"\r\n\r\n")
        lines = header.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            if name:
                headers[name.strip().lower()] = value.strip()
        length = int(headers.get("content-length", "0"))
        return Reply(status, headers, await self.reader.readexactly(length))

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(OSError):
            await self.writer.wait_closed()


async def get(port: int, path: str) -> tuple[int, bytes]:
    conn = await Connection.open(port)
    try:
        return await conn.request("GET", path)
    finally:
        await conn.close()


# --- load -----------------------------------------------------------------------------------


@dataclass
class LoadResult:
    server: str
    concurrency: int
    requests: int
    ok: int
    errors: int
    lost: int  # sent and never answered (connection broken)
    seconds: float
    img_per_s: float
    latency_ms_p50: float
    latency_ms_p95: float
    latency_ms_p99: float
    batch_sizes: dict[str, int] = field(default_factory=dict)  # histogram bucket "le" -> count
    mean_batch_size: float | None = None
    # CPU time per answered image: the whole server process, its event loop thread alone (the
    # rest is decoding and inference), and this client. On a machine whose cores the server and
    # client share, these say where the cores went (the raw limit spends only inference on them).
    server_cpu_ms_per_image: float | None = None
    event_loop_cpu_ms_per_image: float | None = None
    client_cpu_ms_per_image: float | None = None
    rounds: int = 1  # figures are the median over this many rounds (counts: their sum)


def median_of(rounds: list[LoadResult]) -> LoadResult:
    """One level's rounds as one result: counts and seconds summed, every figure the median over
    the rounds (a shared machine's noise moves whole rounds, not single requests)."""

    def median(values: list[float | None]) -> float | None:
        known = [v for v in values if v is not None]
        return statistics.median(known) if known else None

    first = rounds[0]
    return LoadResult(
        server=first.server,
        concurrency=first.concurrency,
        requests=sum(r.requests for r in rounds),
        ok=sum(r.ok for r in rounds),
        errors=sum(r.errors for r in rounds),
        lost=sum(r.lost for r in rounds),
        seconds=round(sum(r.seconds for r in rounds), 2),
        img_per_s=statistics.median(r.img_per_s for r in rounds),
        latency_ms_p50=statistics.median(r.latency_ms_p50 for r in rounds),
        latency_ms_p95=statistics.median(r.latency_ms_p95 for r in rounds),
        latency_ms_p99=statistics.median(r.latency_ms_p99 for r in rounds),
        server_cpu_ms_per_image=median([r.server_cpu_ms_per_image for r in rounds]),
        event_loop_cpu_ms_per_image=median([r.event_loop_cpu_ms_per_image for r in rounds]),
        client_cpu_ms_per_image=median([r.client_cpu_ms_per_image for r in rounds]),
        rounds=len(rounds),
    )


def cpu_seconds(pid: int, thread: int | None = None) -> float:
    """User + system CPU time of a process, or of one of its threads (Linux /proc)."""
    where = f"/proc/{pid}" if thread is None else f"/proc/{pid}/task/{thread}"
    fields = Path(f"{where}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def load(
    port: int,
    path: str,
    images: list[bytes],
    concurrency: int,
    requests: int,
    max_seconds: float,
    server: str,
    pid: int | None = None,
) -> LoadResult:
    """`requests` POSTs (or as many as fit in `max_seconds`) from `concurrency` connections;
    with the server's `pid` (on Linux), its CPU time too."""
    latencies: list[float] = []
    errors = lost = sent = 0
    stop_at = time.monotonic() + max_seconds

    async def worker() -> None:
        nonlocal sent, errors, lost
        conn: Connection | None = None
        try:
            while sent < requests and time.monotonic() < stop_at:
                body = images[sent % len(images)]
                sent += 1
                t0 = time.perf_counter()
                try:
                    if conn is None:
                        conn = await Connection.open(port)
                    status, _ = await asyncio.wait_for(conn.request("POST", path, body), 120)
                except (OSError, asyncio.IncompleteReadError, TimeoutError):
                    lost += 1
                    if conn is not None:
                        await conn.close()
                    conn = None
                    continue
                latencies.append(time.perf_counter() - t0)
                if status != 200:
                    errors += 1
        finally:
            if conn is not None:
                await conn.close()

    cpu0 = (cpu_seconds(pid), cpu_seconds(pid, pid)) if pid is not None else (0.0, 0.0)
    client0 = time.process_time()
    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.perf_counter() - t0
    client = time.process_time() - client0
    cpu1 = (cpu_seconds(pid), cpu_seconds(pid, pid)) if pid is not None else (0.0, 0.0)
    answered = len(latencies) - errors

    def per_image(seconds: float) -> float | None:
        return round(seconds * 1e3 / answered, 3) if answered else None

    server_cpu = (per_image(cpu1[0] - cpu0[0]), per_image(cpu1[1] - cpu0[1]))

    lat = np.array(latencies or [float("nan")]) * 1e3
    return LoadResult(
        server=server,
        concurrency=concurrency,
        requests=sent,
        ok=len(latencies) - errors,
        errors=errors,
        lost=lost,
        seconds=round(elapsed, 2),
        img_per_s=(len(latencies) - errors) / elapsed,
        latency_ms_p50=float(np.percentile(lat, 50)),
        latency_ms_p95=float(np.percentile(lat, 95)),
        latency_ms_p99=float(np.percentile(lat, 99)),
        server_cpu_ms_per_image=server_cpu[0] if pid is not None else None,
        event_loop_cpu_ms_per_image=server_cpu[1] if pid is not None else None,
        client_cpu_ms_per_image=per_image(client),
    )


# --- the servers ----------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        port: int = s.getsockname()[1]
        return port


async def wait_ready(port: int, process: subprocess.Popen[bytes], timeout_s: float) -> None:
    stop_at = time.monotonic() + timeout_s
    while time.monotonic() < stop_at:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited with {process.returncode}")
        with contextlib.suppress(OSError, asyncio.IncompleteReadError):
            if (await get(port, "/readyz"))[0] == 200:
                return
        await asyncio.sleep(0.2)
    raise TimeoutError("the server did not become ready")


@contextlib.contextmanager
def running(
    cmd: list[str], env: dict[str, str], output: IO[bytes] | None = None
) -> Iterator[subprocess.Popen[bytes]]:
    """`output`: where the server's stdout and stderr go (None: this process's own)."""
    process = subprocess.Popen(
        cmd,
        cwd=ROOT,
        env={**os.environ, **env},
        stdout=output,
        stderr=None if output is None else subprocess.STDOUT,
    )
    try:
        yield process
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


def service_command(repo: Path, model: str, port: int) -> tuple[list[str], dict[str, str]]:
    env = {
        "VIT_SERVE_MODEL_REPO": str(repo),
        "VIT_SERVE_DEFAULT_MODEL": model,
        "VIT_SERVE_PORT": str(port),
        "VIT_SERVE_LOG_LEVEL": "WARNING",
        "VIT_SERVE_SHUTDOWN_DELAY_S": "0",
    }
    return [sys.executable, "-m", "app.server"], env


def naive_command(repo: Path, model: str, port: int) -> tuple[list[str], dict[str, str]]:
    cmd = [sys.executable, "-m", "bench.naive_server", "--repo", str(repo), "--model", model]
    return [*cmd, "--port", str(port)], {}


_BUCKET = re.compile(r'^vit_serve_batch_size_bucket\{[^}]*le="([^"]+)"[^}]*\} ([0-9.e+]+)$')
_SUM_COUNT = re.compile(r"^vit_serve_batch_size_(sum|count)\{[^}]*\} ([0-9.e+]+)$")


async def batch_histogram(port: int) -> dict[str, float]:
    """The service's cumulative batch-size histogram: {"le=1": n, ..., "sum": s, "count": c}."""
    status, body = await get(port, "/metrics")
    found: dict[str, float] = {}
    if status != 200:
        return found
    for line in body.decode().splitlines():
        if m := _BUCKET.match(line):
            found[f"le={m.group(1)}"] = found.get(f"le={m.group(1)}", 0.0) + float(m.group(2))
        elif m := _SUM_COUNT.match(line):
            found[m.group(1)] = found.get(m.group(1), 0.0) + float(m.group(2))
    return found


def histogram_delta(
    before: dict[str, float], after: dict[str, float]
) -> tuple[dict[str, int], float | None]:
    """Batches per size range between two scrapes (non-cumulative), and the mean batch size."""
    cumulative = {k: after[k] - before.get(k, 0.0) for k in after if k.startswith("le=")}
    ranges: dict[str, int] = {}
    previous_le, previous = "0", 0.0
    for key in sorted(cumulative, key=lambda k: float(k[3:])):
        le = key[3:]
        count = round(cumulative[key] - previous)
        if count:
            lo = float(previous_le)
            label = le if float(le) - lo <= 1 else f"{int(lo) + 1}-{le.removesuffix('.0')}"
            ranges[label.removesuffix(".0")] = count
        previous_le, previous = le, cumulative[key]
    batches = after.get("count", 0.0) - before.get("count", 0.0)
    images = after.get("sum", 0.0) - before.get("sum", 0.0)
    return ranges, (images / batches if batches else None)


@dataclass(frozen=True)
class Server:
    """A server under load: where to send, what to read back."""

    name: str
    port: int
    pid: int
    path: str
    batch_histogram: bool  # the service's /metrics has one; the naive server has none


async def run_levels(
    servers: list[Server],
    images: list[bytes],
    concurrencies: list[int],
    requests: int,
    max_seconds: float,
    rounds: int,
) -> dict[str, list[LoadResult]]:
    """Each level on every server, in `rounds` rounds that alternate the servers' order, so that
    a noisy minute on a shared machine falls on both; each figure is the median over rounds."""
    results: dict[str, list[LoadResult]] = {s.name: [] for s in servers}
    per_round_requests = max(1, math.ceil(requests / rounds))
    for c in concurrencies:
        for s in servers:
            # Warm-up at this concurrency: connections, thread pools, ORT's arena per batch size.
            await load(s.port, s.path, images, c, max(2 * c, 20), 10, s.name)
        before = {s.name: await batch_histogram(s.port) for s in servers if s.batch_histogram}
        done: dict[str, list[LoadResult]] = {s.name: [] for s in servers}
        for r in range(rounds):
            for s in servers if r % 2 == 0 else servers[::-1]:
                done[s.name].append(
                    await load(
                        s.port,
                        s.path,
                        images,
                        c,
                        per_round_requests,
                        max_seconds / rounds,
                        s.name,
                        s.pid,
                    )
                )
        for s in servers:
            result = median_of(done[s.name])
            if s.batch_histogram:
                result.batch_sizes, result.mean_batch_size = histogram_delta(
                    before[s.name], await batch_histogram(s.port)
                )
            print(format_load(result))
            results[s.name].append(result)
    return results


def format_load(r: LoadResult) -> str:
    batches = f"  mean batch {r.mean_batch_size:.1f}" if r.mean_batch_size else ""
    cpu = (
        f"  cpu/img {r.server_cpu_ms_per_image:.2f} ms (loop {r.event_loop_cpu_ms_per_image:.2f})"
        if r.server_cpu_ms_per_image is not None and r.event_loop_cpu_ms_per_image is not None
        else ""
    )
    return (
        f"{r.server:>7} concurrency {r.concurrency:>2}: {r.img_per_s:8.1f} img/s  "
        f"p50 {r.latency_ms_p50:7.1f}  p95 {r.latency_ms_p95:7.1f}  p99 {r.latency_ms_p99:7.1f} ms"
        f"  ({r.ok} ok, {r.errors} errors, {r.lost} lost){batches}{cpu}"
    )


# --- soak -----------------------------------------------------------------------------------


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


async def soak(
    port: int, pid: int, images: list[bytes], path: str, minutes: float, concurrency: int
) -> dict[str, Any]:
    """Saturate for `minutes`, sampling RSS every few seconds; RSS growth and requests lost."""
    seconds = minutes * 60
    samples: list[tuple[float, int]] = []
    t0 = time.monotonic()
    task = asyncio.create_task(
        load(port, path, images, concurrency, 10**9, seconds, "soak"), name="soak"
    )
    while not task.done():
        samples.append((round(time.monotonic() - t0, 1), rss_bytes(pid)))
        await asyncio.wait({task}, timeout=5)
    result = task.result()
    # The first samples include the arena growing to its working set: start after 10% of the run.
    settled = [rss for t, rss in samples if t >= 0.1 * seconds] or [rss for _, rss in samples]
    start, end = statistics.median(settled[:3]), statistics.median(settled[-3:])
    summary = {
        "minutes": minutes,
        "concurrency": concurrency,
        "load": asdict(result),
        "rss_mib_first": round(samples[0][1] / 2**20, 1),
        "rss_mib_settled_start": round(start / 2**20, 1),
        "rss_mib_end": round(end / 2**20, 1),
        "rss_mib_max": round(max(rss for _, rss in samples) / 2**20, 1),
        "rss_growth_pct": round(100 * (end - start) / start, 2),
        "lost": result.lost,
        "non_200": result.errors,
        "rss_samples": [[t, round(rss / 2**20, 1)] for t, rss in samples],
    }
    print(
        f"soak {minutes} min at concurrency {concurrency}: {result.img_per_s:.1f} img/s, "
        f"RSS {summary['rss_mib_settled_start']} -> {summary['rss_mib_end']} MiB "
        f"({summary['rss_growth_pct']:+.2f}%), {result.lost} lost, {result.errors} non-200"
    )
    return summary


# --- plot -----------------------------------------------------------------------------------


def plot(path: Path, model: str, results: list[LoadResult], raw_limit: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_tp, ax_p99) = plt.subplots(1, 2, figsize=(11, 4.2))
    for server, marker in (("service", "o"), ("naive", "s")):
        rows = [r for r in results if r.server == server]
        if not rows:
            continue
        xs = [r.concurrency for r in rows]
        ax_tp.plot(xs, [r.img_per_s for r in rows], marker=marker, label=server)
        ax_p99.plot(xs, [r.latency_ms_p99 for r in rows], marker=marker, label=server)
    ax_tp.axhline(raw_limit, color="grey", linestyle="--", label="raw ONNX Runtime limit")
    for ax, label in ((ax_tp, "images / s"), (ax_p99, "p99 latency (ms)")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(list(CONCURRENCY), [str(c) for c in CONCURRENCY])
        ax.set_xlabel("concurrent clients")
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
        ax.legend()
    ax_p99.set_yscale("log")
    fig.suptitle(f"{model}: throughput and p99 against concurrency ({os.cpu_count()} CPUs)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --- main -----------------------------------------------------------------------------------


async def bench_servers(a: argparse.Namespace, images: list[bytes]) -> dict[str, Any]:
    """Both servers run at once (the idle one costs nothing), each level alternating between
    them; then, with `--soak-minutes`, the service alone at the highest concurrency."""
    out: dict[str, Any] = {"service": [], "naive": [], "soak": None}
    ports = {"service": free_port(), "naive": free_port()}
    commands = {"service": service_command(a.repo, a.model, ports["service"])}
    commands["service"][1].update(setting.split("=", 1) for setting in a.service_env)
    if not a.skip_naive:
        commands["naive"] = naive_command(a.repo, a.model, ports["naive"])
    paths = {"service": f"/classify?model={a.model}&top_k=5", "naive": "/classify"}
    with contextlib.ExitStack() as stack:
        servers = []
        for name, (cmd, env) in commands.items():
            port = ports[name]
            process = stack.enter_context(running(cmd, env))
            await wait_ready(port, process, 120)
            servers.append(Server(name, port, process.pid, paths[name], name == "service"))
        out.update(
            await run_levels(
                servers, images, list(a.concurrency), a.requests, a.max_seconds, a.rounds
            )
        )
        if a.soak_minutes > 0:
            service = servers[0]
            out["soak"] = await soak(
                service.port, service.pid, images, service.path, a.soak_minutes, max(a.concurrency)
            )
    return out


def cpu_use(limit: RawResult, service: list[LoadResult], naive: list[LoadResult]) -> dict[str, Any]:
    """Where the cores go per image at the highest concurrency: the raw limit spends them on
    inference alone; the servers also on HTTP, decoding and resizing, and share them with the
    client. With every core busy, throughput is about cores / CPU per image."""
    found: dict[str, Any] = {"raw_limit": round(limit.cpu_ms_per_image, 3)}
    for r in (
        max(service, key=lambda r: r.concurrency, default=None),
        max(naive, key=lambda r: r.concurrency, default=None),
    ):
        if r is not None:
            found[f"{r.server}_c{r.concurrency}"] = {
                "server": r.server_cpu_ms_per_image,
                "event_loop": r.event_loop_cpu_ms_per_image,
                "client": r.client_cpu_ms_per_image,
            }
    return found


def targets(
    raw: list[RawResult], service: list[LoadResult], naive: list[LoadResult]
) -> dict[str, Any]:
    """The issue's targets, each figure beside its bound (reported, never asserted)."""
    limit = max(r.img_per_s for r in raw)
    single_ms = min(r.ms_per_batch_p50 for r in raw if r.batch == 1)
    by = {(r.server, r.concurrency): r for r in [*service, *naive]}
    found: dict[str, Any] = {}
    if s64 := by.get(("service", 64)):
        found["c64_throughput_vs_raw_limit"] = {
            "value": round(s64.img_per_s / limit, 3),
            "target": ">= 0.95",
        }
    if s1 := by.get(("service", 1)):
        found["c1_p50_minus_raw_single_ms"] = {
            "value": round(s1.latency_ms_p50 - single_ms, 2),
            "target": "<= 2.0",
        }
    s16, n16 = by.get(("service", 16)), by.get(("naive", 16))
    if s16 and n16:
        found["c16_throughput_vs_naive"] = {
            "value": round(s16.img_per_s / n16.img_per_s, 2),
            "target": ">= 1.2",
        }
        found["c16_p99_ms_service_vs_naive"] = {
            "value": [round(s16.latency_ms_p99, 1), round(n16.latency_ms_p99, 1)],
            "target": "service lower",
        }
    return found


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--repo", type=Path, default=ROOT / "model_repo")
    p.add_argument("--model", default="demo-shapes")
    p.add_argument("--concurrency", type=int, nargs="+", default=list(CONCURRENCY))
    p.add_argument("--requests", type=int, default=2000, help="per level (bounded by time too)")
    p.add_argument("--max-seconds", type=float, default=20.0, help="per level and server")
    p.add_argument(
        "--rounds", type=int, default=4, help="per level: alternating rounds, medians reported"
    )
    p.add_argument("--raw-seconds", type=float, default=3.0, help="per batch size")
    p.add_argument("--skip-naive", action="store_true")
    p.add_argument(
        "--service-env",
        nargs="*",
        default=[],
        metavar="NAME=VALUE",
        help="settings for the service, e.g. VIT_SERVE_RUNTIME_INSTANCES=2 "
        "VIT_SERVE_INTRA_OP_THREADS=1 (one single-threaded session per core)",
    )
    p.add_argument("--soak-minutes", type=float, default=0.0, help="0: no soak")
    p.add_argument("--out", type=Path, help="default: bench/results/load_<model>.json")
    a = p.parse_args(argv)
    out = a.out or ROOT / "bench" / "results" / f"load_{a.model}.json"

    spec = ModelSpec.load(a.repo / a.model / SPEC_FILENAME)
    version = max(spec.versions)
    graph = a.repo / a.model / str(version) / GRAPH_FILENAME
    # The service's session options (ORT_ENABLE_ALL, ORT's default thread count), before the
    # servers run and again after: other work on the machine shows as a difference.
    raw = raw_sweep(graph, spec, a.raw_seconds, "before")
    images, source = load_images()
    print(f"load with {source}")
    served = asyncio.run(bench_servers(a, images))
    raw += raw_sweep(graph, spec, a.raw_seconds, "after")
    best = max(raw, key=lambda r: r.img_per_s)
    found = targets(raw, served["service"], served["naive"])
    for name, t in found.items():
        print(f"target {name}: {t['value']} (target {t['target']})")
    cpu = cpu_use(best, served["service"], served["naive"])
    print(f"CPU ms per image: {cpu}")
    out.parent.mkdir(parents=True, exist_ok=True)
    png = out.with_suffix(".png")
    plot(png, a.model, [*served["service"], *served["naive"]], best.img_per_s)
    out.write_text(
        json.dumps(
            {
                "model": a.model,
                "version": version,
                "grid": list(spec.architecture.grid),
                "images": source,
                "machine": machine_info(),
                "raw": [asdict(r) for r in raw],
                "raw_limit": asdict(best),
                "raw_single_image_ms": min(r.ms_per_batch_p50 for r in raw if r.batch == 1),
                "service": [asdict(r) for r in served["service"]],
                "naive": [asdict(r) for r in served["naive"]],
                "soak": served["soak"],
                "service_env": a.service_env,
                "targets": found,
                "cpu_ms_per_image": cpu,
                "plot": str(png.relative_to(ROOT) if png.is_relative_to(ROOT) else png),
            },
            indent=2,
        )
        + "\n"
    )
    print(f"wrote {out} and {png}")


if __name__ == "__main__":
    main()
