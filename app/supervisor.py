"""`python -m app.server` with VIT_SERVE_WORKERS above 1: one engine process, several front ends.

The supervisor starts the engine process (it loads the models and runs the batcher, app/engine/
host.py) and `workers` front-end processes (each the whole HTTP server of app/server.py, with
its own listener on the same port, SO_REUSEPORT, so the kernel spreads connections over them;
the gRPC door likewise), then watches them:
- a front end that dies is started again; the others go on, and the engine gives back the
  places its requests held;
- an engine that dies is started again; meanwhile every front end answers not ready and 503
  (with Retry-After), and reconnects by itself. A restart rather than an exit, so that the
  replica keeps its listeners and its connections, and comes back in the time a load takes;
- SIGTERM (or SIGINT) is passed to the front ends, which drain as one process does; once they
  have exited, the engine is stopped, then the supervisor exits 0.
Every child gets SIGTERM if the supervisor itself dies (PR_SET_PDEATHSIG), so none outlives
it. Their metrics go to one folder (prometheus_client's multiprocess mode), which any front
end adds up for GET /metrics, and which goes away with the replica. Shared memory is anonymous
(app/engine/arena.py): nothing of it is left in /dev/shm whatever ends how.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

from app.core.settings import Settings
from app.http.metrics import MULTIPROC_ENV

log = logging.getLogger("app.server")

_PR_SET_PDEATHSIG = 1
RESTART_BACKOFF_S = (0.5, 1.0, 2.0, 5.0)  # after each consecutive quick death
STABLE_S = 30.0  # a child that ran this long starts its backoff over


def default_workers(gpu: bool, cores: int) -> int:
    """One process on a CPU host: there the cores that front ends would use are the ones the
    inference uses too, and a second process measured more img/s but a worse p99 (docs/
    performance.md). On a GPU host one process is the ceiling (its event loop and decoding,
    not the GPU): every core but two (the engine process's) to front ends."""
    return max(2, cores - 2) if gpu else 1


def engine_address(supervisor_pid: int) -> str:
    """An abstract Unix socket address (Linux, written "@..."): nothing on the filesystem to
    clean up."""
    return f"@vit-serve-engine-{supervisor_pid}"


def _die_with_parent() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def free_port(host: str) -> int:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        probe.bind((host, 0))
        port: int = probe.getsockname()[1]
        return port


@dataclass
class Child:
    role: str  # "engine" or "front-end <i>"
    argv: list[str]
    process: subprocess.Popen[bytes] | None = None
    started: float = 0.0
    deaths: int = 0  # quick deaths in a row
    restart_at: float | None = None
    extra: dict[str, str] = field(default_factory=dict)

    def start(self, env: dict[str, str]) -> None:
        self.process = subprocess.Popen(
            self.argv, env={**env, **self.extra}, preexec_fn=_die_with_parent
        )
        self.started = time.monotonic()
        self.restart_at = None

    @property
    def pid(self) -> int | None:
        return None if self.process is None else self.process.pid


class Supervisor:
    def __init__(self, settings: Settings, workers: int) -> None:
        self.settings = settings
        self.stopping = False
        self.metrics_dir = tempfile.mkdtemp(prefix="vit-serve-metrics-")
        self.address = engine_address(os.getpid())
        self.env = dict(os.environ)
        self.env[MULTIPROC_ENV] = self.metrics_dir
        # Port 0 means "any": every front end must listen on the same one.
        self.env["VIT_SERVE_HOST"] = settings.host
        self.env["VIT_SERVE_PORT"] = str(settings.port or free_port(settings.host))
        if settings.grpc_port == 0:
            self.env["VIT_SERVE_GRPC_PORT"] = str(free_port(settings.host))
        python = [sys.executable, "-m", "app.server"]
        self.engine = Child("engine", [*python, "--role", "engine", "--engine", self.address])
        self.front_ends = [
            Child(f"front-end {i}", [*python, "--role", "front-end", "--engine", self.address])
            for i in range(workers)
        ]

    @property
    def port(self) -> int:
        return int(self.env["VIT_SERVE_PORT"])

    def run(self) -> int:
        signal.signal(signal.SIGTERM, self._stop)
        signal.signal(signal.SIGINT, self._stop)
        log.info(
            "supervisor: an engine process and %d front ends on %s:%d",
            len(self.front_ends),
            self.settings.host,
            self.port,
        )
        try:
            self.engine.start(self.env)
            for child in self.front_ends:
                child.start(self.env)
            while not self.stopping:
                self._watch()
                time.sleep(0.1)
            return self._drain()
        finally:
            for child in [*self.front_ends, self.engine]:
                if child.process is not None and child.process.poll() is None:
                    child.process.kill()
            shutil.rmtree(self.metrics_dir, ignore_errors=True)

    def _stop(self, signum: int, frame: object) -> None:
        # Passed on at once, from the handler: a front end answering meanwhile would keep its
        # connections alive after the replica was told to stop. A second signal cuts the front
        # ends' delay short, as it does for one process.
        self.stopping = True
        for child in self.front_ends:
            if child.process is not None and child.process.poll() is None:
                child.process.send_signal(signal.SIGTERM)

    def _watch(self) -> None:
        now = time.monotonic()
        for child in [self.engine, *self.front_ends]:
            process = child.process
            if process is not None and process.poll() is not None:
                code = process.returncode
                lived = now - child.started
                child.deaths = 0 if lived >= STABLE_S else child.deaths + 1
                delay = (
                    RESTART_BACKOFF_S[min(child.deaths, len(RESTART_BACKOFF_S)) - 1]
                    if (child.deaths)
                    else 0.0
                )
                log.error(
                    "%s (pid %d) exited with %s after %.1f s; starting it again in %.1f s",
                    child.role,
                    process.pid,
                    code,
                    lived,
                    delay,
                )
                self._forget(process.pid)
                child.process = None
                child.restart_at = now + delay
            restart = child.restart_at is not None and now >= child.restart_at
            if child.process is None and restart and not self.stopping:
                child.start(self.env)

    def _forget(self, pid: int) -> None:
        """A dead process's live gauges (requests in flight) leave the sum."""
        with contextlib.suppress(Exception):
            from prometheus_client import multiprocess

            multiprocess.mark_process_dead(pid, self.metrics_dir)  # type: ignore[no-untyped-call]

    def _drain(self) -> int:
        """The front ends drain (delay, listener, in-flight requests) as one process does;
        then the engine stops, finishing what is queued."""
        log.info("supervisor: stopping %d front ends, then the engine", len(self.front_ends))
        limit = self.settings.shutdown_delay_s + 2 * self.settings.drain_timeout_s + 10
        for child in self.front_ends:
            if child.process is not None:
                try:
                    child.process.wait(timeout=limit)
                except subprocess.TimeoutExpired:
                    log.error("%s did not stop in %.0f s; killed", child.role, limit)
                    child.process.kill()
        code = 0
        if self.engine.process is not None and self.engine.process.poll() is None:
            self.engine.process.send_signal(signal.SIGTERM)
            try:
                code = self.engine.process.wait(timeout=self.settings.drain_timeout_s + 10)
            except subprocess.TimeoutExpired:
                self.engine.process.kill()
                code = 1
        failed = [c.role for c in self.front_ends if c.process and c.process.returncode not in (0,)]
        if failed:
            log.error("supervisor: %s did not exit cleanly", ", ".join(failed))
        return 0 if code == 0 and not failed else 1
