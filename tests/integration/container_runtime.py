"""The image built and run for real: podman from Debian's packages, as a user here would run it.

What a machine like CI's needs (README, "Build and run the image"):
- CONTAINERS_CONF with `default_ulimits = []` (it refuses setrlimit beyond its own limits) and
  runc as the runtime (crun refuses its hybrid cgroups): scripts/container-base writes one;
- `--network=host` for the build and the containers;
- pip's CA during the build, where TLS is re-signed on the way out: the host's bundle and a
  pip.conf naming it, in a folder mounted read-only over /root (a folder every base has, so the
  mount leaves no file behind in the image; mounting the bundle over the base's own breaks
  the build's ca-certificates install, which replaces that file);
- the base, debian:bookworm-slim, made by scripts/container-base from Debian's packages.

Where the runtime cannot start, the tests skip saying why, except on CI (`CI` set), where they
fail: there they must run.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import shutil
import subprocess
import threading
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import httpx
import pytest

from tests.integration.stack import answers, wait_until
from tests.support import ROOT, free_port

T = TypeVar("T")

# The order of what this process sees (a request begun or answered, a signal sent, an exit):
# the tests ask what happened before what, and a count answers that whatever the machine's
# speed, where timestamps and slack would not. (next() on a count is atomic under the GIL: the
# load's event loop and podman's threads share it.)
_EVENTS = itertools.count()


def event() -> int:
    """The next event's number: later events have larger ones."""
    return next(_EVENTS)


CI = os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")
CACHE = Path(
    os.environ.get("VIT_SERVE_CONTAINER_CACHE")
    or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "vit-serve"
)
BASE_SCRIPT = ROOT / "scripts" / "container-base"
HOST_CA = Path("/etc/ssl/certs/ca-certificates.crt")
READY_TIMEOUT_S = 60.0
BUILD_TIMEOUT_S = 900.0
# Each replica as tests/integration/stack.py starts them: one inference and one decode thread.
SMALL = {"VIT_SERVE_INTRA_OP_THREADS": "1", "VIT_SERVE_PREPROCESS_THREADS": "1"}


def unavailable(reason: str) -> NoReturn:
    """Skip on a user's machine; fail on CI, where the container runtime must run."""
    if CI:
        pytest.fail(f"the container runtime must run on CI (CI={os.environ['CI']}): {reason}")
    pytest.skip(reason)


@dataclass(frozen=True)
class Podman:
    binary: str
    env: dict[str, str]

    def __call__(
        self, *args: str, timeout_s: float = 120.0, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(
            [self.binary, *args], env=self.env, capture_output=True, text=True, timeout=timeout_s
        )
        if check and done.returncode != 0:
            raise AssertionError(
                f"podman {' '.join(args)}: exit {done.returncode}\n{done.stderr[-3000:]}"
            )
        return done


def find_podman() -> Podman:
    """podman, runc and debootstrap, a root user and a runtime that starts; else skip (or fail
    on CI) saying which is missing."""
    if os.geteuid() != 0:
        unavailable("building the base image and running podman here need root")
    how = "apt-get install podman runc debootstrap; .ci/run installs them"
    missing = [p for p in ("podman", "runc", "debootstrap") if not _program(p)]
    if missing:
        unavailable(f"{', '.join(missing)} not installed ({how})")
    env = dict(os.environ)
    if "CONTAINERS_CONF" not in env:
        CACHE.mkdir(parents=True, exist_ok=True)
        conf = CACHE / "containers.conf"
        if not conf.is_file():  # scripts/container-base writes the same
            conf.write_text('[containers]\ndefault_ulimits = []\n\n[engine]\nruntime = "runc"\n')
        env["CONTAINERS_CONF"] = str(conf)
    podman = Podman(_program("podman") or "podman", env)
    try:
        info = podman("info", "--format", "{{.Host.OCIRuntime.Name}}", check=False)
    except subprocess.TimeoutExpired:
        unavailable("`podman info` did not answer within 120 s")
    if info.returncode != 0:
        unavailable(f"podman cannot start here: {info.stderr.strip()[-1000:]}")
    return podman


def _program(name: str) -> str | None:
    for folder in ("/usr/sbin", "/sbin"):
        path = Path(folder) / name
        if path.is_file() and os.access(path, os.X_OK):
            return str(path)
    return shutil.which(name)


def base_image(podman: Podman) -> str:
    """scripts/container-base: debian:bookworm-slim from debootstrap, cached; its name."""
    try:
        done = subprocess.run(
            [str(BASE_SCRIPT)],
            env={**podman.env, "VIT_SERVE_CONTAINER_CACHE": str(CACHE)},
            capture_output=True,
            text=True,
            timeout=BUILD_TIMEOUT_S,
        )
    except subprocess.TimeoutExpired:
        unavailable(f"{BASE_SCRIPT.name} did not finish within {BUILD_TIMEOUT_S:.0f} s")
    if done.returncode != 0:
        unavailable(f"{BASE_SCRIPT.name} failed (no Debian mirror?): {done.stderr[-2000:]}")
    return done.stdout.strip().splitlines()[-1]


def build_mounts() -> list[str]:
    """pip's CA for the build: the host's bundle and a pip.conf naming it, over /root."""
    if not HOST_CA.is_file():
        return []
    home = CACHE / "build-root"
    (home / ".config" / "pip").mkdir(parents=True, exist_ok=True)
    shutil.copyfile(HOST_CA, home / "ca-certificates.crt")
    (home / ".config" / "pip" / "pip.conf").write_text(
        "[global]\ncert = /root/ca-certificates.crt\n"
    )
    return ["--volume", f"{home}:/root:ro"]


@dataclass(frozen=True)
class Built:
    image: str
    seconds: float
    size_bytes: int
    log: Path


def build_cpu_image(podman: Podman, tag: str, log: Path) -> Built:
    """The repository's Dockerfile, VARIANT=cpu on the debootstrapped base, in the Docker format
    (the OCI format drops HEALTHCHECK). Layers are reused from earlier builds."""
    base = base_image(podman)
    command = [
        "build",
        "--format=docker",
        "--network=host",
        *build_mounts(),
        "--build-arg=VARIANT=cpu",
        f"--build-arg=CPU_IMAGE={base}",
        "--target=runtime",
        f"--tag={tag}",
        str(ROOT),
    ]
    started = time.monotonic()
    with log.open("w") as out:
        done = subprocess.run(
            [podman.binary, *command],
            env=podman.env,
            stdout=out,
            stderr=subprocess.STDOUT,
            timeout=BUILD_TIMEOUT_S,
        )
    seconds = time.monotonic() - started
    assert done.returncode == 0, f"podman build failed (log: {log}):\n{log.read_text()[-4000:]}"
    size = int(podman("image", "inspect", "--format", "{{.Size}}", tag).stdout.strip())
    # Earlier builds' stages, no longer tagged: kept a day for the layer cache, then dropped.
    podman("image", "prune", "--force", "--filter", "until=24h", check=False)
    return Built(tag, seconds, size, log)


def inspect_image(podman: Podman, image: str) -> dict[str, Any]:
    """`podman image inspect`: its Config, and the Healthcheck beside it."""
    (inspected,) = json.loads(podman("image", "inspect", image).stdout)
    result: dict[str, Any] = inspected
    return result


def run_python(podman: Podman, image: str, code: str) -> str:
    """`python -c code` in a throwaway container of the image (read-only, as served)."""
    done = podman(
        "run", "--rm", "--read-only", "--network=none", "--entrypoint=python", image, "-c", code
    )
    return done.stdout


@dataclass
class Container:
    """`podman run` of the image, attached: the client's exit is the container's."""

    podman: Podman
    name: str
    port: int
    process: subprocess.Popen[bytes]
    output: Path  # what `podman run` printed: the container's output and podman's own
    exited_at: int | None = None  # the event of the exit, seen by a watching thread

    def __post_init__(self) -> None:
        threading.Thread(target=self._watch, daemon=True).start()

    def _watch(self) -> None:
        self.process.wait()
        self.exited_at = event()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def signal(self, name: str) -> tuple[int, int]:
        """Sends SIGTERM or SIGKILL as an orchestrator does (`podman kill`); the events just
        before it was sent and just after `podman kill` returned (it landed in between)."""
        sending = event()
        self.podman("kill", f"--signal={name}", self.name)
        return sending, event()

    def wait(self, timeout_s: float) -> int:
        code = self.process.wait(timeout=timeout_s)
        wait_until(lambda: self.exited_at is not None, 5, "the exit recorded")
        return code

    def logs(self) -> list[str]:
        """The container's own output, stdout and stderr (`podman logs`), line by line."""
        done = self.podman("logs", self.name)
        return (done.stdout + done.stderr).splitlines()

    def access_log(self) -> list[dict[str, Any]]:
        lines = [json.loads(line) for line in self.logs() if line.startswith("{")]
        return [line for line in lines if line.get("logger") == "app.access"]


def start_container(
    podman: Podman,
    image: str,
    work: Path,
    env: dict[str, str] | None = None,
    volumes: Sequence[str] = (),
) -> Container:
    """One replica on the host network at a free loopback port, read-only with /tmp a tmpfs."""
    port = free_port()
    name = f"vit-serve-test-{os.getpid()}-{port}"
    settings = {
        "VIT_SERVE_HOST": "127.0.0.1",
        "VIT_SERVE_PORT": str(port),
        "VIT_SERVE_SHUTDOWN_DELAY_S": "0",
        **SMALL,
        **(env or {}),
    }
    command = [
        podman.binary,
        "run",
        f"--name={name}",
        "--network=host",
        "--read-only",
        "--tmpfs=/tmp",
        *(f"--env={k}={v}" for k, v in settings.items()),
        *(f"--volume={v}" for v in volumes),
        image,
    ]
    output = work / f"container-{port}.log"
    with output.open("wb") as out:
        process = subprocess.Popen(
            command, env=podman.env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )
    return Container(podman, name, port, process, output)


def wait_ready(container: Container) -> None:
    wait_until(
        lambda: container.process.poll() is None and answers(f"{container.url}/readyz"),
        READY_TIMEOUT_S,
        f"container {container.name} not ready (output: {container.output})",
    )


@contextlib.contextmanager
def containers(
    podman: Podman,
    image: str,
    work: Path,
    count: int,
    env: dict[str, str] | None = None,
    volumes: Sequence[str] = (),
) -> Iterator[list[Container]]:
    """`count` replicas started side by side, ready when the block starts, removed after it."""
    started = [start_container(podman, image, work, env, volumes) for _ in range(count)]
    try:
        for container in started:
            wait_ready(container)
        yield started
    finally:
        for container in started:
            podman("rm", "--force", "--time=0", container.name, check=False)
        for container in started:
            with contextlib.suppress(subprocess.TimeoutExpired):
                container.wait(timeout_s=30)
            if container.process.poll() is None:
                container.process.kill()


# --- load -----------------------------------------------------------------------------------


@dataclass
class Outcome:
    """One request as the client saw it."""

    request_id: str
    started: int  # the event of its start (see `event`)
    ended: int  # and of its answer or error
    status: int | None  # None: no HTTP answer (the error names why)
    error: str | None = None
    retry_after: str | None = None


@dataclass
class Load:
    """Bounded load: at most `requests` requests within `timeout_s`, from `concurrency` clients."""

    url: str
    requests: int
    concurrency: int
    timeout_s: float
    body: Callable[[int], tuple[bytes, str]]
    outcomes: list[Outcome] = field(default_factory=list)
    in_flight: dict[str, int] = field(default_factory=dict)  # request id -> started
    stopped: bool = False

    def answered(self) -> int:
        return len(self.outcomes)

    async def run(
        self,
        script: Callable[[Load], Awaitable[None]],
        client_done: Callable[[Outcome], bool] | None = None,
    ) -> None:
        """Sends until the bounds, `script` returning, or every client done (`client_done`
        true for one of its answers: e.g. a 503 that tells it to go elsewhere)."""
        counter = iter(range(self.requests))
        limits = httpx.Limits(
            max_connections=self.concurrency, max_keepalive_connections=self.concurrency
        )

        async def client(http: httpx.AsyncClient) -> None:
            for i in counter:
                if self.stopped:
                    return
                content, content_type = self.body(i)
                request_id = f"container-load-{i}"
                started = event()
                self.in_flight[request_id] = started
                try:
                    response = await http.post(
                        "/classify",
                        content=content,
                        headers={"content-type": content_type, "x-request-id": request_id},
                    )
                    outcome = Outcome(
                        request_id,
                        started,
                        event(),
                        response.status_code,
                        retry_after=response.headers.get("retry-after"),
                    )
                except httpx.HTTPError as exc:
                    outcome = Outcome(
                        request_id, started, event(), None, f"{type(exc).__name__}: {exc}"
                    )
                del self.in_flight[request_id]
                self.outcomes.append(outcome)
                if client_done is not None and client_done(outcome):
                    return

        async def scripted() -> None:
            try:
                await script(self)
            finally:
                self.stopped = True

        async with httpx.AsyncClient(base_url=self.url, timeout=30.0, limits=limits) as http:
            clients = asyncio.gather(*(client(http) for _ in range(self.concurrency)))
            steering = asyncio.ensure_future(scripted())
            try:
                await asyncio.wait_for(clients, timeout=self.timeout_s)
            finally:
                self.stopped = True
                if not steering.done():
                    steering.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await steering

    async def until(self, check: Callable[[], bool], timeout_s: float, what: str) -> None:
        deadline = time.monotonic() + timeout_s
        while not check():
            if time.monotonic() > deadline:
                raise TimeoutError(f"{what} within {timeout_s:.0f} s ({self.answered()} answered)")
            if self.stopped:
                raise RuntimeError(f"the load ended before {what} ({self.answered()} answered)")
            await asyncio.sleep(0.02)


async def in_thread(call: Callable[[], T]) -> T:
    """A blocking call (podman) off the event loop, so the load's clients keep sending."""
    return await asyncio.get_running_loop().run_in_executor(None, call)


def describe(outcomes: list[Outcome]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for o in outcomes:
        key = str(o.status) if o.status is not None else (o.error or "?").split(":")[0]
        counts[key] = counts.get(key, 0) + 1
    return dict(sorted(counts.items()))
