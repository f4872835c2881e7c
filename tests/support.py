"""Paths, the tiny test model's repository and helpers shared by the tests (fixtures live in
conftest.py). No PyTorch here or in anything it imports: the service's tests run without it
(tests/export/tiny.py holds the tiny model's PyTorch side)."""

from __future__ import annotations

import contextlib
import os
import socket
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from app.core.settings import Settings
from app.engine import Engine, EngineHost, RemoteEngine
from app.main import create_app
from app.models.spec import Architecture, ModelSpec, Preprocess, Source, contract_tensors
from app.runtime.devicedecode import DeviceDecoder
from app.runtime.sessions import BackendFactory, RolloutBackendFactory

ROOT = Path(__file__).resolve().parents[1]
SHARED_TESTDATA = ROOT.parent / "shared" / "testdata"
PHOTOS = SHARED_TESTDATA / "photos"
ODD_IMAGES = SHARED_TESTDATA / "odd-images"
DEMO_MODEL = ROOT / "model_repo" / "demo-shapes"

TINY = "tiny"
TINY_LABELS = [f"class-{i}" for i in range(10)]
TINY_PREPROCESS = Preprocess(resize_mode="shorter_side", crop_pct=0.875, interpolation="bicubic")
# The tiny model as the export wrote it (versions 1 and 2, different weights), kept in the tree so
# that serving tests need no PyTorch. tests/export/test_tiny_repository.py checks it is what the
# export writes today; `.venv/bin/python -m tests.export.tiny` rewrites it.
TINY_REPO = ROOT / "tests" / "model_repo"
FORMATS_HINT = "send a JPEG, PNG, WebP, GIF, BMP or TIFF"

ClientFactory = Callable[..., contextlib.AbstractAsyncContextManager[httpx.AsyncClient]]


@dataclass(frozen=True)
class TinyRepo:
    root: Path  # a copy of TINY_REPO for this test session
    name: str


def need_folder(path: Path, what: str) -> None:
    """Skip the calling test, with the reason, when shared test data is absent."""
    if not path.is_dir():
        pytest.skip(f"{what} not found at {path}")


def make_spec(
    preprocess: Preprocess = TINY_PREPROCESS,
    grid: tuple[int, int] = (8, 8),
    patch_size: int = 8,
) -> ModelSpec:
    """A ModelSpec without a graph, for preprocessing tests."""
    arch = Architecture(
        patch_size=patch_size, grid=grid, embed_dim=32, depth=2, heads=2, num_classes=10
    )
    inputs, outputs = contract_tensors(arch)
    return ModelSpec(
        name="unit",
        architecture=arch,
        preprocess=preprocess,
        labels=TINY_LABELS,
        inputs=inputs,
        outputs=outputs,
        source=Source(framework="test"),
    )


@contextlib.asynccontextmanager
async def serve(
    settings: Settings,
    backend_factory: BackendFactory | None = None,
    rollout_factory: RolloutBackendFactory | None = None,
    device_decoder: DeviceDecoder | None = None,
) -> AsyncIterator[httpx.AsyncClient]:
    """The app over httpx's ASGI transport, its lifespan run as uvicorn would run it."""
    app = create_app(
        settings,
        backend_factory=backend_factory,
        rollout_factory=rollout_factory,
        device_decoder=device_decoder,
    )
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client,
    ):
        yield client


def free_port() -> int:
    """A loopback port free now (the kernel's pick)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@contextlib.asynccontextmanager
async def remote_of(engine: Engine) -> AsyncIterator[RemoteEngine]:
    """`engine` started behind its host, and a front end's RemoteEngine connected to it over
    their Unix socket (both in this process); all stopped after the block."""
    host = EngineHost(engine)
    address = f"@vit-serve-test-host-{os.getpid()}-{time.monotonic_ns()}"
    engine.start()
    await host.start(address)
    remote = RemoteEngine(address, 1 << 22)
    try:
        await remote.start(10.0)
        yield remote
    finally:
        await remote.stop()
        await host.stop()
        await engine.stop()
