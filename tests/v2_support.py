"""Helpers of the Open Inference Protocol's tests: the app over ASGI or on real sockets (HTTP
and gRPC, uvicorn in a thread), and a backend that can be held in its batch."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import uvicorn
from numpy.typing import NDArray

from app.core.settings import Settings
from app.main import create_app
from app.models.repository import ModelVersion
from tests.support import free_port


class HeldBackend:
    """Logits 0..classes-1 for every image (class `classes - 1` wins); a batch blocks in the
    inference thread while `gate` is clear, and `started` is set when one reaches it."""

    provider = "fake"

    def __init__(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self.gate = threading.Event()
        self.gate.set()
        self.started = threading.Event()
        self.batches: list[int] = []

    def run(self, patches: NDArray[np.uint8]) -> NDArray[np.float32]:
        self.batches.append(len(patches))
        self.started.set()
        self.gate.wait(timeout=10)  # never hang the suite
        row = np.arange(self.num_classes, dtype=np.float32)
        return np.tile(row, (len(patches), 1))


class HeldBackends:
    """A backend factory whose backends one `gate` holds."""

    def __init__(self) -> None:
        self.made: list[HeldBackend] = []
        self.gate = threading.Event()
        self.gate.set()

    def __call__(self, version: ModelVersion) -> HeldBackend:
        backend = HeldBackend(version.spec.architecture.num_classes)
        backend.gate = self.gate
        self.made.append(backend)
        return backend

    def started(self) -> bool:
        return any(b.started.is_set() for b in self.made)


@dataclass(frozen=True)
class Live:
    http: str  # host:port, as tritonclient takes it
    grpc: str
    app: Any

    @property
    def url(self) -> str:
        return f"http://{self.http}"


@contextlib.contextmanager
def live_server(
    settings: Settings, backend_factory: Any = None, rollout_factory: Any = None
) -> Iterator[Live]:
    """The app on real sockets: uvicorn (HTTP) in a thread of its own, its event loop serving
    gRPC too (on a free port unless `settings` names one)."""
    port = free_port()
    if settings.grpc_port is None:
        settings = settings.model_copy(update={"grpc_port": 0})
    app = create_app(settings, backend_factory=backend_factory, rollout_factory=rollout_factory)
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on")
    )
    thread = threading.Thread(target=server.run, name="v2-live-server", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the server did not start")
        time.sleep(0.02)
    try:
        yield Live(f"127.0.0.1:{port}", f"127.0.0.1:{app.state.grpc_port}", app)
    finally:
        server.should_exit = True
        thread.join(timeout=30)


async def wait_until(predicate: Any, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met")
        await asyncio.sleep(0.01)
