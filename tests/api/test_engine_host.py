"""The engine's host and a front end's RemoteEngine over their Unix socket, in one process."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest

from app.core.errors import BusyError
from app.core.settings import Settings
from app.engine import Job
from app.main import load_engine
from tests.support import TinyRepo, remote_of

pytestmark = pytest.mark.anyio


async def test_a_reload_that_fails_unexpectedly_is_answered(
    tiny_repo: TinyRepo, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = load_engine(Settings(model_repo=tiny_repo.root))
    async with remote_of(engine) as remote:

        async def broken() -> None:
            raise KeyError("secret")

        monkeypatch.setattr(engine, "reload", broken)
        with pytest.raises(RuntimeError, match=r"^KeyError in the engine; it is logged there$"):
            await remote.reload()


async def test_jobs_answered_together_each_get_their_outputs_and_their_places_back(
    tiny_repo: TinyRepo,
) -> None:
    # Four request places in all: three images queued, one batch of one running.
    settings = Settings(
        model_repo=tiny_repo.root, max_queue_images=3, max_batch_size=1, runtime_instances=1
    )
    async with remote_of(load_engine(settings)) as remote:
        permits = [await remote.admit(None, None) for _ in range(4)]
        with pytest.raises(BusyError):
            await remote.admit(None, None)
        patch_dim = permits[0].served.spec.architecture.patch_dim
        grids = [np.full((8, 8, patch_dim), i, dtype=np.uint8) for i in range(3)]
        results = await asyncio.gather(
            *(
                remote.infer(p, Job([g], None, time.monotonic() + 10))
                for p, g in zip(permits[:3], grids, strict=True)
            )
        )
        for permit in permits:  # in one turn: one release message
            permit.release()
        await asyncio.sleep(0.2)
        again = [await remote.admit(None, None) for _ in range(4)]  # every place came back
        alone = [
            await remote.infer(permit, Job([grid], None, time.monotonic() + 10))
            for permit, grid in zip(again, grids, strict=False)
        ]
    for together, single in zip(results, alone, strict=True):
        (output,) = together.outputs
        np.testing.assert_array_equal(output.logits, single.outputs[0].logits)
        assert output.queued_s >= 0.0
    # Different inputs, different answers: each job got its own outputs back.
    assert len({tuple(r.outputs[0].logits.tolist()) for r in results}) == 3
