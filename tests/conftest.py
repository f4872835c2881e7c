"""Session fixtures: the tiny model's repository and the service over it; anyio on asyncio."""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from app.core.settings import Settings
from app.runtime.sessions import BackendFactory
from tests.support import TINY, TINY_REPO, ClientFactory, TinyRepo, serve


@pytest.fixture(scope="session")
def tiny_repo(tmp_path_factory: pytest.TempPathFactory) -> TinyRepo:
    """Model `tiny`, versions 1 and 2 (different weights): a copy of tests/model_repo."""
    root = tmp_path_factory.mktemp("model_repo")
    shutil.copytree(TINY_REPO / TINY, root / TINY)
    return TinyRepo(root=root, name=TINY)


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


@pytest.fixture(scope="session")
def anyio_backend() -> str:
    """Async tests and fixtures run on asyncio (anyio's pytest plugin), one loop per session."""
    return "asyncio"
