"""What every benchmark in bench/ runs on: servers, photos, raw graph timing, load, results.

Servers are started as deployed (`python -m app.server`) on a free loopback port. Load goes
through a small HTTP/1.1 keep-alive client on asyncio streams: on a 2-core machine the client
shares the CPU with the server, so it must cost little (httpx: about ten times its CPU a request).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import http.client
import io
import json
import math
import os
import random
import re
import socket
import statistics
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from PIL import Image

from app.core import threads
from app.models.spec import GRAPH_FILENAME, SPEC_FILENAME, ModelSpec
from bench.machine import machine_info

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
PHOTOS = ROOT.parent / "shared" / "testdata" / "photos"
# Where the photos are on a machine without ../shared (a lent GPU machine gets the working tree
# alone: bench.gpu_bundle carries a copy to it); unset: PHOTOS.
PHOTOS_ENV = "VIT_BENCH_PHOTOS"
DEMO_REPO = ROOT / "model_repo"
DEMO_MODEL = "demo-shapes"
HOST = "127.0.0.1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        port: int = s.getsockname()[1]
        return port


def shown(path: Path) -> str:
    """A path as results name it: from the project's root where it lies inside, not this
    machine's."""
    return os.path.relpath(path, ROOT) if path.resolve().is_relative_to(ROOT) else str(path)


# --- models and photos ----------------------------------------------------------------------


@dataclass(frozen=True)
class ModelFiles:
    """A model's spec and its highest version's folder in a repository."""

    name: str
    spec: ModelSpec
    version: int
    folder: Path

    @property
    def graph(self) -> Path:
        return self.folder / GRAPH_FILENAME


def find_model(repo: Path, name: str) -> ModelFiles:
    spec = ModelSpec.load(repo / name / SPEC_FILENAME)
    version = max(spec.versions)
    return ModelFiles(name, spec, version, repo / name / str(version))


@dataclass(frozen=True)
class Images:
    bodies: list[bytes]
    names: list[str]
    source: str  # where they came from, for the results


def photos_folder() -> Path:
    """The shared photos: $VIT_BENCH_PHOTOS where it is set, else ../shared/testdata/photos."""
    where = os.environ.get(PHOTOS_ENV)
    return Path(where) if where else PHOTOS


def load_images(limit: int = 100, folder: Path | None = None) -> Images:
    """The photos in `folder` (None: `photos_folder()`), or (up to) 20 generated 500x375 JPEGs
    where it holds none."""
    folder = folder or photos_folder()
    files = sorted(folder.glob("*.*"))[:limit] if folder.is_dir() else []
    if files:
        bodies, names = [f.read_bytes() for f in files], [f.name for f in files]
        return Images(bodies, names, f"{len(files)} photos from {shown(folder)}")
    print(f"note: {folder} holds no photos; using generated 500x375 JPEGs instead")
    rng = np.random.default_rng(0)
    bodies = []
    for _ in range(min(limit, 20)):
        buf = io.BytesIO()
        pixels = rng.integers(0, 256, (375, 500, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(buf, "JPEG", quality=90)
        bodies.append(buf.getvalue())
    names = [f"generated-{i:02d}.jpg" for i in range(len(bodies))]
    source = f"{len(bodies)} generated 500x375 JPEGs ({shown(folder)} holds no photos)"
    return Images(bodies, names, source)


# --- raw graph timing -----------------------------------------------------------------------


def native_patches(spec: ModelSpec, batch: int) -> np.ndarray:
    """Random uint8 patches (seed 0) at the model's native grid."""
    gh, gw = spec.architecture.grid
    shape = (batch, gh, gw, spec.architecture.patch_dim)
    return np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)


def batch_times(
    session: ort.InferenceSession,
    feeds: Mapping[str, object],
    seconds: float,
    min_runs: int = 5,
    max_runs: int = 100_000,
) -> list[float]:
    """Seconds of each `session.run`, as many as fit in `seconds` (at least `min_runs`)."""
    times: list[float] = []
    stop_at = time.perf_counter() + seconds
    while (time.perf_counter() < stop_at or len(times) < min_runs) and len(times) < max_runs:
        t0 = time.perf_counter()
        session.run(None, feeds)
        times.append(time.perf_counter() - t0)
    return times


@dataclass
class RawResult:
    batch: int
    img_per_s: float
    ms_per_batch_p50: float
    cpu_ms_per_image: float  # this process's CPU time (every ORT thread) per image


def raw_throughput(
    session: ort.InferenceSession, spec: ModelSpec, batch: int, seconds: float
) -> RawResult:
    """Median batch time of `session.run` at the native grid, after a warm-up."""
    feeds = {spec.input_name: native_patches(spec, batch)}
    batch_times(session, feeds, 0.0, min_runs=3)
    cpu0 = time.process_time()
    times = batch_times(session, feeds, seconds)
    cpu_ms = (time.process_time() - cpu0) * 1e3 / (batch * len(times))
    p50 = statistics.median(times)
    return RawResult(batch, batch / p50, p50 * 1e3, cpu_ms)


# --- a server's process (Linux /proc) -------------------------------------------------------


def _stat(path: Path) -> tuple[str, float]:
    """A /proc stat file's name (comm) and user + system CPU seconds."""
    stat = path.read_text()
    fields = stat.rsplit(")", 1)[1].split()
    comm = stat[stat.index("(") + 1 : stat.rindex(")")]
    return comm, (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def descendants(pid: int) -> list[int]:
    """A process's children, theirs, and so on (a supervisor's engine and front ends)."""
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            parents.setdefault(int(stat[stat.rindex(")") + 2 :].split()[1]), []).append(
                int(entry.name)
            )
    found, pending = [], [pid]
    while pending:
        children = parents.get(pending.pop(), [])
        found += children
        pending += children
    return found


def role_of(pid: int) -> str:
    """What a server's process is: "engine" or "front-end" (a supervisor's children, from their
    --role), else "main" (one process, or the supervisor itself)."""
    try:
        args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return "main"
    return args[args.index(b"--role") + 1].decode() if b"--role" in args else "main"


def cpu_by_role(pid: int) -> dict[str, float]:
    """CPU seconds of a server's processes, summed by role (see `role_of`)."""
    roles: dict[str, float] = {}
    for each in [pid, *descendants(pid)]:
        try:
            seconds = _stat(Path(f"/proc/{each}/stat"))[1]
        except OSError:  # ended while we look
            continue
        role = role_of(each)
        roles[role] = roles.get(role, 0.0) + seconds
    return roles


def cpu_seconds(pid: int, thread: int | None = None) -> float:
    """User + system CPU time of a process with every process under it (one server of several
    processes is one figure), or of one of its threads."""
    if thread is not None:
        return _stat(Path(f"/proc/{pid}/task/{thread}/stat"))[1]
    total = 0.0
    for each in [pid, *descendants(pid)]:
        try:
            total += _stat(Path(f"/proc/{each}/stat"))[1]
        except OSError:  # ended while we look
            continue
    return total


# A server's threads by what they do, from their OS-level names (app/core/threads.py): the
# event loop is the main thread; inference is the lanes' threads and ONNX Runtime's own (named
# after the thread that made the sessions); "other" is the rest (the runtime's and numpy's
# idle helpers, asyncio.to_thread, and threads that ended while measured).
THREAD_GROUPS = ("event_loop", "preprocessing", "inference", "other")


def thread_group(tid: int, comm: str, main: int) -> str:
    if tid == main:
        return "event_loop"
    if comm.startswith(threads.PREPROCESS):
        return "preprocessing"
    if comm.startswith((threads.INFERENCE, threads.SESSIONS)):
        return "inference"
    return "other"


def thread_cpu(pid: int) -> dict[int, tuple[str, float]]:
    """Each thread of a process: its OS-level name and its user + system CPU seconds so far."""
    found: dict[int, tuple[str, float]] = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            found[int(task.name)] = _stat(task / "stat")
        except OSError:  # ended while we look
            continue
    return found


def thread_groups(threads_cpu: Mapping[int, tuple[str, float]], main: int) -> dict[str, float]:
    """CPU seconds by group (THREAD_GROUPS, every one present) of {tid: (name, seconds)}."""
    groups = dict.fromkeys(THREAD_GROUPS, 0.0)
    for tid, (comm, seconds) in threads_cpu.items():
        groups[thread_group(tid, comm, main)] += seconds
    return groups


def thread_cpu_between(
    before: Mapping[int, tuple[str, float]], after: Mapping[int, tuple[str, float]]
) -> dict[int, tuple[str, float]]:
    """What each thread alive at the end spent since `before` (all of it for a new one)."""
    return {
        tid: (comm, seconds - (before[tid][1] if tid in before else 0.0))
        for tid, (comm, seconds) in after.items()
    }


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def open_sockets(pid: int) -> int:
    """Sockets a process holds: the connections it has accepted, plus its listener."""
    count = 0
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):  # closed while we look
            count += os.readlink(fd).startswith("socket:")
    return count


def mib(n: float) -> float:
    return round(n / 2**20, 1)


# --- a small HTTP/1.1 client ----------------------------------------------------------------


@dataclass(frozen=True)
class Reply:
    status: int
    headers: dict[str, str]  # lower-case names; a repeated header keeps its last value
    body: bytes


class Connection:
    """One keep-alive HTTP/1.1 connection to loopback (Content-Length bodies only)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, port: int) -> Connection:
        reader, writer = await asyncio.open_connection(HOST, port)
        return cls(reader, writer)

    async def exchange(
        self, method: str, path: str, body: bytes = b"", content_type: str = "image/jpeg"
    ) -> Reply:
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


async def get(port: int, path: str) -> Reply:
    conn = await Connection.open(port)
    try:
        return await conn.exchange("GET", path)
    finally:
        await conn.close()


# --- servers --------------------------------------------------------------------------------


def answered_200(reply: Reply) -> bool:
    return reply.status == 200


@dataclass(frozen=True)
class Target:
    """Where load goes, under a name for the results."""

    name: str
    port: int
    path: str  # with the query
    pid: int | None = None  # the server's process: its CPU time is measured when given
    batch_sizes: bool = False  # read the service's batch-size histogram around each level
    accept: Callable[[Reply], bool] = answered_200  # an answer that does not is an error


@dataclass(frozen=True)
class Server:
    """A running server process."""

    name: str
    port: int
    process: subprocess.Popen[bytes]
    path: str  # its /classify, with the query
    metrics: bool  # it serves the service's /metrics

    @property
    def pid(self) -> int:
        return self.process.pid

    def alive(self) -> bool:
        return self.process.poll() is None

    def target(
        self,
        name: str | None = None,
        path: str | None = None,
        accept: Callable[[Reply], bool] = answered_200,
    ) -> Target:
        """This server as a load target; with another path, without its batch-size histogram
        (the server's histogram then mixes the paths' load)."""
        return Target(
            name or self.name,
            self.port,
            path or self.path,
            self.pid,
            batch_sizes=self.metrics and path is None,
            accept=accept,
        )


def wait_ready(
    port: int, process: subprocess.Popen[bytes], timeout_s: float, path: str = "/readyz"
) -> None:
    """Until `path` answers 200; an error when the process exits or the time runs out."""
    stop_at = time.monotonic() + timeout_s
    while time.monotonic() < stop_at:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited with {process.returncode}")
        conn = http.client.HTTPConnection(HOST, port, timeout=5)
        try:
            conn.request("GET", path)
            if conn.getresponse().status == 200:
                return
        except (OSError, http.client.HTTPException):
            pass
        finally:
            conn.close()
        time.sleep(0.2)
    raise TimeoutError(f"the server on port {port} did not become ready in {timeout_s:g} s")


@contextlib.contextmanager
def running(
    name: str,
    cmd: list[str],
    env: Mapping[str, str],
    port: int,
    path: str,
    metrics: bool,
    log: Path | None = None,
    ready_timeout_s: float = 120.0,
    cwd: Path = ROOT,
) -> Iterator[Server]:
    """`cmd` listening on `port`, ready when the block starts, stopped after it; `log`: where
    its stdout and stderr go (None: this process's own); `cwd`: the checkout it runs from."""
    with contextlib.ExitStack() as stack:
        output = stack.enter_context(log.open("wb")) if log is not None else None
        process = subprocess.Popen(
            cmd,
            cwd=cwd,
            env={**os.environ, **env},
            stdout=output,
            stderr=None if output is None else subprocess.STDOUT,
        )
        try:
            wait_ready(port, process, ready_timeout_s)
            yield Server(name, port, process, path, metrics)
        finally:
            process.terminate()
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)


def service(
    repo: Path,
    model: str,
    env: Mapping[str, str] | None = None,
    log: Path | None = None,
    name: str = "service",
    tree: Path = ROOT,
    ready_timeout_s: float = 120.0,
) -> contextlib.AbstractContextManager[Server]:
    """`python -m app.server` over `repo`, `model` its default; `env`: VIT_SERVE_* overrides;
    `tree`: the checkout whose `app` it runs (another commit's, to compare two);
    `ready_timeout_s`: how long it may take to be ready."""
    port = free_port()
    settings = {
        "VIT_SERVE_MODEL_REPO": str(repo),
        "VIT_SERVE_DEFAULT_MODEL": model,
        "VIT_SERVE_PORT": str(port),
        "VIT_SERVE_LOG_LEVEL": "WARNING",
        "VIT_SERVE_SHUTDOWN_DELAY_S": "0",
        **(env or {}),
    }
    cmd = [sys.executable, "-m", "app.server"]
    path = f"/classify?model={model}&top_k=5"
    return running(name, cmd, settings, port, path, True, log, ready_timeout_s, cwd=tree)


def naive_server(repo: Path, model: str) -> contextlib.AbstractContextManager[Server]:
    """bench.naive_server: the same graph and preprocessing, `session.run` per request."""
    port = free_port()
    cmd = [sys.executable, "-m", "bench.naive_server", "--repo", str(repo), "--model", model]
    return running("naive", [*cmd, "--port", str(port)], {}, port, "/classify", False)


# --- Prometheus -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Sample:
    name: str
    labels: dict[str, str]
    value: float


_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)(?:\s+\S+)?$")
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')
_UNESCAPE = {"\\\\": "\\", '\\"': '"', "\\n": "\n"}


def parse_metrics(text: str) -> list[Sample]:
    """Prometheus' text format: one sample a line, comments and blank lines skipped."""
    samples = []
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        found = _SAMPLE.match(line.strip())
        if found is None:
            raise ValueError(f"not a Prometheus sample: {line!r}")
        name, labels, value = found.groups()
        tags = {
            k: re.sub(r"\\[\\\"n]", lambda m: _UNESCAPE[m.group(0)], v)
            for k, v in _LABEL.findall(labels or "")
        }
        samples.append(Sample(name, tags, float(value)))
    return samples


async def scrape(port: int) -> list[Sample]:
    """The server's /metrics; none where it does not answer 200."""
    reply = await get(port, "/metrics")
    return parse_metrics(reply.body.decode()) if reply.status == 200 else []


def matching(samples: list[Sample], name: str, **labels: str) -> list[Sample]:
    return [
        s
        for s in samples
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
    ]


def total(samples: list[Sample], name: str, **labels: str) -> float | None:
    """The sum of a metric over the label sets that match; None where it has no sample."""
    found = matching(samples, name, **labels)
    return sum(s.value for s in found) if found else None


@dataclass(frozen=True)
class Histogram:
    """A Prometheus histogram summed over the label sets that match: cumulative bucket counts
    by their `le` as written ("1.0", "+Inf"), the sum and the count."""

    buckets: dict[str, float]
    sum: float
    count: float

    @classmethod
    def of(cls, samples: list[Sample], name: str, **labels: str) -> Histogram:
        buckets: dict[str, float] = {}
        for s in matching(samples, f"{name}_bucket", **labels):
            buckets[s.labels["le"]] = buckets.get(s.labels["le"], 0.0) + s.value
        ordered = dict(sorted(buckets.items(), key=lambda kv: float(kv[0])))
        return cls(
            ordered,
            total(samples, f"{name}_sum", **labels) or 0.0,
            total(samples, f"{name}_count", **labels) or 0.0,
        )

    def since(self, before: Histogram) -> Histogram:
        """What was observed between two scrapes."""
        buckets = {le: n - before.buckets.get(le, 0.0) for le, n in self.buckets.items()}
        return Histogram(buckets, self.sum - before.sum, self.count - before.count)

    def at_most(self, q: float) -> float | None:
        """The bound of the first bucket holding the q-quantile; None above the largest."""
        total_count = next(reversed(self.buckets.values()), 0.0)
        le = next(le for le, n in self.buckets.items() if n >= q * total_count)
        return None if float(le) == math.inf else float(le)

    def ranges(self) -> dict[str, int]:
        """Observations per bucket (not cumulative), labelled "1", "2", "3-4", ...: for
        integer observations such as batch sizes."""
        found: dict[str, int] = {}
        previous_le, previous = "0", 0.0
        for le, n in self.buckets.items():
            count = round(n - previous)
            if count:
                lo = float(previous_le)
                label = le if float(le) - lo <= 1 else f"{int(lo) + 1}-{le.removesuffix('.0')}"
                found[label.removesuffix(".0")] = count
            previous_le, previous = le, n
        return found


async def batch_histogram(port: int) -> Histogram:
    return Histogram.of(await scrape(port), "vit_serve_batch_size")


# --- closed loop ----------------------------------------------------------------------------


NOT_WRITTEN = {"written": False}  # field metadata: kept in memory, left out of the results file


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
    statuses: dict[str, int] = field(default_factory=dict)
    batch_sizes: dict[str, int] = field(default_factory=dict)  # "1", "2", "3-4", ... -> batches
    mean_batch_size: float | None = None
    # CPU time per answered image: the whole server process, its event loop thread alone (the
    # rest is decoding and inference), and this client. On a machine whose cores the server and
    # client share, these say where the cores went (the raw limit spends only inference on them).
    server_cpu_ms_per_image: float | None = None
    event_loop_cpu_ms_per_image: float | None = None
    client_cpu_ms_per_image: float | None = None
    # The server's CPU per image by thread group (THREAD_GROUPS, from the threads' OS-level
    # names; "other" takes what threads that ended meanwhile spent, so the groups add up to
    # the whole); a server that does not name its threads has most of it under "other".
    server_cpu_ms_per_image_by_group: dict[str, float] | None = None
    # A server of several processes (VIT_SERVE_WORKERS > 1): its CPU per image by role (main:
    # the supervisor; engine; front-end, all of them).
    server_cpu_ms_per_image_by_process: dict[str, float] | None = None
    rounds: int = 1  # figures are the median over this many rounds (counts: their sum)
    latencies_ms: list[float] = field(default_factory=list, repr=False, metadata=NOT_WRITTEN)

    def line(self) -> str:
        batches = f"  mean batch {self.mean_batch_size:.1f}" if self.mean_batch_size else ""
        cpu = (
            f"  cpu/img {self.server_cpu_ms_per_image:.2f} ms "
            f"(loop {self.event_loop_cpu_ms_per_image:.2f})"
            if self.server_cpu_ms_per_image is not None
            and self.event_loop_cpu_ms_per_image is not None
            else ""
        )
        groups = self.server_cpu_ms_per_image_by_group
        if cpu and groups:
            cpu = (
                cpu[:-1] + ", " + ", ".join(f"{g} {groups[g]:.2f}" for g in THREAD_GROUPS[1:]) + ")"
            )
        return (
            f"{self.server:>7} concurrency {self.concurrency:>2}: {self.img_per_s:8.1f} img/s  "
            f"p50 {self.latency_ms_p50:7.1f}  p95 {self.latency_ms_p95:7.1f}  "
            f"p99 {self.latency_ms_p99:7.1f} ms  ({self.ok} ok, {self.errors} errors, "
            f"{self.lost} lost){batches}{cpu}"
        )


async def closed_loop(
    target: Target,
    images: Sequence[bytes],
    concurrency: int,
    requests: int,
    max_seconds: float,
    cpu: bool = False,
) -> LoadResult:
    """`requests` POSTs (or as many as fit in `max_seconds`) from `concurrency` connections,
    each sending its next when answered; with `cpu`, the target server's CPU time too."""
    latencies: list[float] = []
    statuses: Counter[str] = Counter()
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
                        conn = await Connection.open(target.port)
                    reply = await asyncio.wait_for(conn.exchange("POST", target.path, body), 120)
                except (OSError, asyncio.IncompleteReadError, TimeoutError):
                    lost += 1
                    if conn is not None:
                        await conn.close()
                    conn = None
                    continue
                latencies.append(time.perf_counter() - t0)
                statuses[str(reply.status)] += 1
                if not target.accept(reply):
                    errors += 1
        finally:
            if conn is not None:
                await conn.close()

    return await measured_load(
        target.name,
        concurrency,
        [worker() for _ in range(concurrency)],
        target.pid if cpu else None,
        latencies,
        statuses,
        lambda: (sent, errors, lost),
    )


async def measured_load(
    name: str,
    concurrency: int,
    workers: Sequence[Awaitable[None]],
    pid: int | None,
    latencies: list[float],
    statuses: Counter[str],
    counts: Callable[[], tuple[int, int, int]],
) -> LoadResult:
    """Run `workers` (which fill `latencies` in seconds and `statuses`), timed, with the client's
    CPU and, with a `pid`, the server's and its event loop's; `counts()`: (sent, errors, lost)
    once they are done."""
    cpu0 = (cpu_seconds(pid), cpu_seconds(pid, pid)) if pid is not None else (0.0, 0.0)
    threads0 = thread_cpu(pid) if pid is not None else {}
    roles0 = cpu_by_role(pid) if pid is not None else {}
    client0 = time.process_time()
    t0 = time.perf_counter()
    await asyncio.gather(*workers)
    elapsed = time.perf_counter() - t0
    client = time.process_time() - client0
    threads1 = thread_cpu(pid) if pid is not None else {}
    roles1 = cpu_by_role(pid) if pid is not None else {}
    cpu1 = (cpu_seconds(pid), cpu_seconds(pid, pid)) if pid is not None else (0.0, 0.0)
    sent, errors, lost = counts()
    answered = len(latencies) - errors

    def per_image(seconds: float) -> float | None:
        return round(seconds * 1e3 / answered, 3) if answered else None

    by_group: dict[str, float] | None = None
    if pid is not None and answered:
        groups = thread_groups(thread_cpu_between(threads0, threads1), pid)
        # Threads that ended in between: in the process's total, not in any thread's.
        groups["other"] += max(0.0, (cpu1[0] - cpu0[0]) - sum(groups.values()))
        by_group = {g: round(v * 1e3 / answered, 3) for g, v in groups.items()}
    lat = np.array(latencies or [float("nan")]) * 1e3
    return LoadResult(
        server=name,
        concurrency=concurrency,
        requests=sent,
        ok=answered,
        errors=errors,
        lost=lost,
        seconds=round(elapsed, 2),
        img_per_s=answered / elapsed,
        latency_ms_p50=float(np.percentile(lat, 50)),
        latency_ms_p95=float(np.percentile(lat, 95)),
        latency_ms_p99=float(np.percentile(lat, 99)),
        statuses=dict(sorted(statuses.items())),
        server_cpu_ms_per_image=per_image(cpu1[0] - cpu0[0]) if pid is not None else None,
        event_loop_cpu_ms_per_image=per_image(cpu1[1] - cpu0[1]) if pid is not None else None,
        client_cpu_ms_per_image=per_image(client),
        server_cpu_ms_per_image_by_group=by_group,
        server_cpu_ms_per_image_by_process=(
            {r: round((roles1[r] - roles0.get(r, 0.0)) * 1e3 / answered, 3) for r in roles1}
            if len(roles1) > 1 and answered
            else None
        ),
        latencies_ms=[s * 1e3 for s in latencies],
    )


def median_groups(rounds: list[dict[str, float] | None]) -> dict[str, float] | None:
    """Each group's median over the rounds that have groups (None where none has)."""
    known = [r for r in rounds if r is not None]
    if not known:
        return None
    return {g: statistics.median(r[g] for r in known) for g in THREAD_GROUPS}


def median_roles(rounds: list[dict[str, float] | None]) -> dict[str, float] | None:
    """Each process role's median over the rounds that measured roles."""
    known = [r for r in rounds if r is not None]
    if not known:
        return None
    roles = sorted({role for r in known for role in r})
    return {role: statistics.median(r.get(role, 0.0) for r in known) for role in roles}


def median_of(rounds: list[LoadResult]) -> LoadResult:
    """One level's rounds as one result: counts and seconds summed, every figure the median over
    the rounds (a shared machine's noise moves whole rounds, not single requests)."""

    def median(values: list[float | None]) -> float | None:
        known = [v for v in values if v is not None]
        return statistics.median(known) if known else None

    statuses: Counter[str] = Counter()
    for r in rounds:
        statuses.update(r.statuses)
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
        statuses=dict(sorted(statuses.items())),
        server_cpu_ms_per_image=median([r.server_cpu_ms_per_image for r in rounds]),
        event_loop_cpu_ms_per_image=median([r.event_loop_cpu_ms_per_image for r in rounds]),
        client_cpu_ms_per_image=median([r.client_cpu_ms_per_image for r in rounds]),
        server_cpu_ms_per_image_by_group=median_groups(
            [r.server_cpu_ms_per_image_by_group for r in rounds]
        ),
        server_cpu_ms_per_image_by_process=median_roles(
            [r.server_cpu_ms_per_image_by_process for r in rounds]
        ),
        rounds=len(rounds),
        latencies_ms=[ms for r in rounds for ms in r.latencies_ms],
    )


async def side_by_side(
    targets: list[Target],
    images: Sequence[bytes],
    concurrency: int,
    requests: int,
    max_seconds: float,
    rounds: int,
) -> list[LoadResult]:
    """One concurrency level on every target after a warm-up, in `rounds` rounds (each of
    `requests / rounds` requests and `max_seconds / rounds` at most) whose order rotates, so
    that a noisy minute on a shared machine falls on all; each figure is the median over them."""
    for t in targets:
        # Warm-up at this concurrency: connections, thread pools, ORT's arena per batch size.
        await closed_loop(t, images, concurrency, max(2 * concurrency, 20), 10)
    before = {t.name: await batch_histogram(t.port) for t in targets if t.batch_sizes}
    done: dict[str, list[LoadResult]] = {t.name: [] for t in targets}
    per_round = max(1, math.ceil(requests / rounds))
    for r in range(rounds):
        for t in targets[r % len(targets) :] + targets[: r % len(targets)]:
            result = await closed_loop(
                t, images, concurrency, per_round, max_seconds / rounds, cpu=True
            )
            done[t.name].append(result)
    results = []
    for t in targets:
        result = median_of(done[t.name])
        if t.batch_sizes:
            batches = (await batch_histogram(t.port)).since(before[t.name])
            result.batch_sizes = batches.ranges()
            result.mean_batch_size = batches.sum / batches.count if batches.count else None
        print(result.line())
        results.append(result)
    return results


async def run_levels(
    targets: list[Target],
    images: Sequence[bytes],
    concurrencies: Sequence[int],
    requests: int,
    max_seconds: float,
    rounds: int,
) -> dict[str, list[LoadResult]]:
    """`side_by_side` at each concurrency: every target's results, level by level."""
    results: dict[str, list[LoadResult]] = {t.name: [] for t in targets}
    for c in concurrencies:
        for r in await side_by_side(targets, images, c, requests, max_seconds, rounds):
            results[r.server].append(r)
    return results


# --- open loop ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Outcome:
    status: int | None  # None: no answer (client timeout or a broken connection)
    seconds: float  # from the send's start (connecting included) to the whole answer
    retry_after: str | None  # the answer's Retry-After header
    failure: str | None  # why there was no answer


@dataclass(frozen=True)
class Quantiles:
    count: int
    p50: float
    p99: float
    max: float

    @classmethod
    def of_seconds(cls, seconds: list[float]) -> Quantiles:
        ms = np.array(seconds) * 1e3
        return cls(
            len(seconds),
            round(float(np.percentile(ms, 50)), 2),
            round(float(np.percentile(ms, 99)), 2),
            round(float(ms.max()), 2),
        )


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
    latency_ms: dict[str, Quantiles]  # by status
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


async def open_loop(
    target: Target,
    images: Sequence[bytes],
    rate: float,
    seconds: float,
    max_requests: int,
    timeout_s: float,
    max_in_flight: int = 4096,
    seed: int = 0,
) -> OpenLoopResult:
    """POST `images` in turn at `rate` per second on average (Poisson arrivals) for `seconds`,
    whatever the server's pace: each request its own task on a keep-alive connection from an
    idle pool, so a slow answer never holds back the next send. Bounded: arrivals stop after
    `seconds` or `max_requests`, each request has a client timeout, and an arrival beyond
    `max_in_flight` outstanding is not sent (and counted)."""
    rng = random.Random(seed)
    loop = asyncio.get_running_loop()
    pool = _Pool(target.port)
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
                task = asyncio.create_task(_one(pool, target.path, body, timeout_s))
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
        latency_ms={s: Quantiles.of_seconds(v) for s, v in sorted(by_status.items())},
        goodput_img_per_s=round(statuses.get("200", 0) / wall, 1),
        retry_after_503=dict(Counter(o.retry_after or "missing" for o in done if o.status == 503)),
        max_in_flight_seen=peak,
        in_flight_each_second=in_flight,
        wall_seconds=round(wall, 2),
        client_cpu_s_per_s=round(cpu / wall, 2),
    )


# --- results --------------------------------------------------------------------------------


def plain(value: object) -> Any:
    """Results as JSON values: dataclasses by their fields (less those marked NOT_WRITTEN),
    paths as `shown`."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {
            f.name: plain(getattr(value, f.name))
            for f in dataclasses.fields(value)
            if f.metadata.get("written", True)
        }
    if isinstance(value, Mapping):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    if isinstance(value, Path):
        return shown(value)
    return value


def write_results(
    path: Path, report: object, machine_notes: Mapping[str, object] | None = None
) -> None:
    """`report` (a dataclass) as JSON under the run's date and the machine's header."""
    body = plain(report)
    if not isinstance(body, dict):
        raise TypeError(f"a report is a dataclass, not {type(report).__name__}")
    header = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {**machine_info(), **(machine_notes or {})},
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({**header, **body}, indent=2) + "\n")
    print(f"wrote {path}")
