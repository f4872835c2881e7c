"""API fixtures: the app over httpx's ASGI transport, its lifespan run as uvicorn would run it."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import numpy as np
import pytest
from numpy.typing import NDArray

from app.core.settings import Settings
from app.main import create_app
from app.models.repository import ModelVersion
from app.models.sessions import BackendFactory, RolloutBackendFactory
from tests.support import TinyRepo

ClientFactory = Callable[..., contextlib.AbstractAsyncContextManager[httpx.AsyncClient]]


@contextlib.asynccontextmanager
async def serve(
    settings: Settings,
    backend_factory: BackendFactory | None = None,
    rollout_factory: RolloutBackendFactory | None = None,
) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(settings, backend_factory=backend_factory, rollout_factory=rollout_factory)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client,
    ):
        yield client


@pytest.fixture(scope="session")
async def client(tiny_repo: TinyRepo) -> AsyncIterator[httpx.AsyncClient]:
    """The service with default limits over the tiny repository (versions 1 and 2)."""
    async with serve(Settings(model_repo=tiny_repo.root)) as c:
        yield c


@pytest.fixture
def make_client(tiny_repo: TinyRepo) -> ClientFactory:
    """A service with some settings changed (and optionally a fake backend), for one test."""

    def factory(
        backend_factory: BackendFactory | None = None, **overrides: Any
    ) -> contextlib.AbstractAsyncContextManager[httpx.AsyncClient]:
        return serve(Settings(model_repo=tiny_repo.root, **overrides), backend_factory)

    return factory


class GatedBackend:
    """Zero logits for every image; blocks in the inference thread while `gate` is clear."""

    provider = "fake"

    def __init__(self, num_classes: int, fail: bool = False) -> None:
        self.num_classes = num_classes
        self.fail = fail
        self.gate = threading.Event()
        self.gate.set()
        self.started = threading.Event()

    def run(self, patches: NDArray[np.uint8]) -> NDArray[np.float32]:
        self.started.set()
        self.gate.wait(timeout=10)
        if self.fail:
            raise RuntimeError("session exploded")
        return np.zeros((len(patches), self.num_classes), dtype=np.float32)


class FakeBackends:
    """A backend factory that keeps what it made, so a test can hold or break them."""

    def __init__(self, fail: bool = False) -> None:
        self.fail = fail
        self.made: dict[tuple[str, int], GatedBackend] = {}

    def __call__(self, version: ModelVersion) -> GatedBackend:
        backend = GatedBackend(version.spec.architecture.num_classes, self.fail)
        self.made[(version.name, version.version)] = backend
        return backend
