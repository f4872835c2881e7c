"""The batch token budget follows the device the sessions run on, unless it is set."""

from __future__ import annotations

import pytest

from app.core.settings import Settings
from app.main import create_app
from tests.support import TinyRepo

pytestmark = pytest.mark.anyio


@pytest.mark.parametrize(("setting", "budget"), [(None, 2048), (640, 640)])
async def test_the_cpu_batch_budget(tiny_repo: TinyRepo, setting: int | None, budget: int) -> None:
    app = create_app(Settings(model_repo=tiny_repo.root, max_batch_tokens=setting))
    async with app.router.lifespan_context(app):
        engine = app.state.engine
        assert {provider for _, provider in engine.table.versions_served()} == {
            "CPUExecutionProvider"
        }
        assert engine.batcher.max_batch_tokens == budget
