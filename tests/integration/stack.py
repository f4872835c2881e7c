"""Real parts on loopback: uvicorn replicas, Debian's nginx and prometheus, and a bounded load.

Each part renders the deployment's own configuration file (deploy/) onto loopback ports and
temporary directories, so the tests run what docker-compose.yml runs, not a copy of it.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import io
import json
import os
import shutil
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from PIL import Image

import bench.nginx
from tests.support import ROOT, free_port

DEPLOY = ROOT / "deploy"
PROMETHEUS_CONF = DEPLOY / "prometheus" / "prometheus.yml"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "vit-serve.json"
SERVICE_JOB = "vit-serve"
READY_TIMEOUT_S = 60.0


def need_program(name: str, how: str) -> str:
    """The program's path (PATH, sbin, or beside this Python), or skip saying how to get it."""
    places = (Path(sys.executable).parent, Path("/usr/sbin"), Path("/sbin"))
    found = shutil.which(name) or next(
        (str(p) for d in places if (p := d / name).is_file() and os.access(p, os.X_OK)), None
    )
    if found is None:
        pytest.skip(f"{name} is not installed ({how}; .ci/run installs it)")
    return found


def wait_until(check: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.05)
    raise TimeoutError(f"{what} within {timeout_s:.0f} s")


def answers(url: str, status: int = 200) -> bool:
    try:
        return httpx.get(url, timeout=1.0).status_code == status
    except httpx.HTTPError:
        return False


def png_bytes(size: int = 64, seed: int = 0) -> bytes:
    image = Image.new("RGB", (size, size), ((seed * 37) % 256, (seed * 91) % 256, 128))
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def _stop(process: subprocess.Popen[bytes], timeout_s: float = 15.0) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=timeout_s)


@dataclass
class Replica:
    """`python -m app.server` on 127.0.0.1:port over a model repository."""

    port: int
    log_path: Path
    process: subprocess.Popen[bytes]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def log_lines(self) -> list[dict[str, Any]]:
        """The replica's JSON log lines (uvicorn's and the service's)."""
        lines = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            if line.startswith("{"):
                lines.append(json.loads(line))
        return lines

    def access_log(self) -> list[dict[str, Any]]:
        return [line for line in self.log_lines() if line.get("logger") == "app.access"]


def spawn_replica(model_repo: Path, work: Path, **settings: str) -> Replica:
    """Start one; `settings` are VIT_SERVE_* values by lower-case name (shutdown_delay_s="1")."""
    port = free_port()
    # Nothing from the calling shell's VIT_SERVE_* leaks in: the test decides every setting.
    env = {k: v for k, v in os.environ.items() if not k.startswith("VIT_SERVE_")}
    env.update(
        {
            "VIT_SERVE_MODEL_REPO": str(model_repo),
            "VIT_SERVE_HOST": "127.0.0.1",
            "VIT_SERVE_PORT": str(port),
            "VIT_SERVE_PROVIDERS": '["CPUExecutionProvider"]',
            "VIT_SERVE_INTRA_OP_THREADS": "1",
            "VIT_SERVE_PREPROCESS_THREADS": "1",
            "VIT_SERVE_LOG_FORMAT": "json",
            # Tests that stop a replica on purpose set a delay; the others stop at once.
            "VIT_SERVE_SHUTDOWN_DELAY_S": "0",
        }
    )
    env.update({f"VIT_SERVE_{k.upper()}": v for k, v in settings.items()})
    log_path = work / f"replica-{port}.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "app.server"],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    return Replica(port, log_path, process)


def _ready(replica: Replica) -> bool:
    return replica.process.poll() is None and answers(f"{replica.url}/readyz")


def _stop_all(processes: list[subprocess.Popen[bytes]], timeout_s: float = 15.0) -> None:
    for process in processes:  # all at once: each drains in parallel with the others
        if process.poll() is None:
            process.terminate()
    for process in processes:
        _stop(process, timeout_s)


@contextlib.contextmanager
def replicas(model_repo: Path, work: Path, count: int, **settings: str) -> Iterator[list[Replica]]:
    """`count` replicas, started side by side, ready when the block starts."""
    started = [spawn_replica(model_repo, work, **settings) for _ in range(count)]
    try:
        for replica in started:
            wait_until(
                functools.partial(_ready, replica),
                READY_TIMEOUT_S,
                f"replica on {replica.port} not ready (log: {replica.log_path})",
            )
        yield started
    finally:
        _stop_all([r.process for r in started])


@dataclass
class Nginx:
    port: int
    work: Path
    process: subprocess.Popen[bytes]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def access_log(self) -> list[dict[str, Any]]:
        path = self.work / "access.log"
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@contextlib.contextmanager
def nginx(upstreams: list[str], work: Path, max_conns: int | None = None) -> Iterator[Nginx]:
    binary = need_program("nginx", "Debian: apt-get install nginx")
    work.mkdir(parents=True, exist_ok=True)
    port = free_port()
    conf = work / "nginx.conf"
    conf.write_text(bench.nginx.render(port, upstreams, work, max_conns))
    check = subprocess.run(
        [binary, "-t", "-p", str(work), "-c", str(conf)], capture_output=True, text=True
    )
    assert check.returncode == 0, check.stderr
    with (work / "stderr.log").open("wb") as stderr:
        process = subprocess.Popen(
            [binary, "-p", str(work), "-c", str(conf), "-g", "daemon off;"],
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        )
    lb = Nginx(port, work, process)
    try:
        wait_until(
            lambda: process.poll() is None and answers(f"{lb.url}/lb-healthz"),
            15,
            f"nginx not answering (log: {work / 'error.log'})",
        )
        yield lb
    finally:
        _stop(process)


def render_prometheus_conf(targets: list[str], own_address: str) -> dict[str, Any]:
    """deploy/prometheus/prometheus.yml with the replicas as static targets, scraped each second."""
    config: dict[str, Any] = yaml.safe_load(PROMETHEUS_CONF.read_text())
    config["global"]["scrape_interval"] = "1s"
    config["global"]["scrape_timeout"] = "1s"
    config["global"]["evaluation_interval"] = "1s"
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    service = jobs[SERVICE_JOB]
    # Docker's DNS finds the replicas in compose; here they are listed.
    assert "dns_sd_configs" in service, "the compose job discovers replicas by DNS"
    del service["dns_sd_configs"]
    service["static_configs"] = [{"targets": targets}]
    for name, job in jobs.items():
        if name != SERVICE_JOB:
            job.pop("dns_sd_configs", None)
            job["static_configs"] = [{"targets": [own_address]}]
    return config


@dataclass
class Prometheus:
    port: int
    process: subprocess.Popen[bytes]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def query(self, expr: str) -> list[dict[str, Any]]:
        response = httpx.get(f"{self.url}/api/v1/query", params={"query": expr}, timeout=10)
        body = response.json()
        assert body.get("status") == "success", (expr, body)
        result: list[dict[str, Any]] = body["data"]["result"]
        return result

    def scrapes_done(self, job: str) -> float:
        """The oldest replica's completed scrape count (so callers can wait for a fresh one)."""
        result = self.query(f"min(count_over_time(up{{job={json.dumps(job)}}}[10m]))")
        return float(result[0]["value"][1]) if result else 0.0


@contextlib.contextmanager
def prometheus(targets: list[str], work: Path) -> Iterator[Prometheus]:
    binary = need_program("prometheus", "Debian: apt-get install prometheus")
    work.mkdir(parents=True, exist_ok=True)
    port = free_port()
    address = f"127.0.0.1:{port}"
    conf = work / "prometheus.yml"
    conf.write_text(yaml.safe_dump(render_prometheus_conf(targets, address)))
    command = [
        binary,
        f"--config.file={conf}",
        f"--storage.tsdb.path={work / 'data'}",
        f"--web.listen-address={address}",
        "--log.level=warn",
    ]
    with (work / "stderr.log").open("wb") as stderr:
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=stderr)
    server = Prometheus(port, process)
    try:
        wait_until(
            lambda: process.poll() is None and answers(f"{server.url}/-/ready"),
            30,
            f"prometheus not ready (log: {work / 'stderr.log'})",
        )
        yield server
    finally:
        _stop(process)


@dataclass
class LoadResult:
    statuses: Counter[int | str] = field(default_factory=Counter)  # status, or the error's name
    request_ids: dict[str, int] = field(default_factory=dict)  # X-Request-ID -> status

    @property
    def sent(self) -> int:
        return sum(self.statuses.values())


async def run_load(
    url: str,
    requests: int,
    *,
    concurrency: int = 8,
    timeout_s: float = 60.0,
    make_body: Callable[[int], tuple[bytes, str]] | None = None,
    on_answer: Callable[[int, LoadResult], None] | None = None,
    stop: Callable[[LoadResult], bool] | None = None,
) -> LoadResult:
    """POST /classify `requests` times (at most) from `concurrency` clients, within `timeout_s`.

    `stop` ends the load early once it holds; every request sent is counted, answered or not.
    """
    result = LoadResult()
    counter = iter(range(requests))
    body_of = make_body or (lambda i: (png_bytes(64, i % 8), "image/png"))

    async def client(http: httpx.AsyncClient) -> None:
        for i in counter:
            if stop is not None and stop(result):
                return
            body, content_type = body_of(i)
            request_id = f"load-{i}"
            try:
                response = await http.post(
                    "/classify",
                    content=body,
                    headers={"content-type": content_type, "x-request-id": request_id},
                )
                outcome: int | str = response.status_code
            except httpx.HTTPError as exc:
                outcome = type(exc).__name__
            result.statuses[outcome] += 1
            if isinstance(outcome, int):
                result.request_ids[request_id] = outcome
            if on_answer is not None:
                on_answer(i, result)

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=30.0, limits=limits) as http:
        await asyncio.wait_for(
            asyncio.gather(*(client(http) for _ in range(concurrency))), timeout=timeout_s
        )
    return result
