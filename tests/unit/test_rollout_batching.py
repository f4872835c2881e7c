"""Rollout items in the batcher: their own graph, batched only with equal rollout inputs."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import numpy as np
import pytest
from numpy.typing import NDArray

from app.engine.batcher import Batcher
from app.engine.batches import (
    BatchKey,
    DeadlineExceededError,
    InferenceError,
    NotServedError,
    Output,
)
from app.models.spec import RolloutParams
from tests.fakes import Calls, D, LoggedBackend, LoggedRolloutBackend, deadline_in

pytestmark = pytest.mark.anyio

GRID = (8, 8)
MEAN = RolloutParams("mean", 0.0)
MAX = RolloutParams("max", 0.0)
MEAN_HALF = RolloutParams("mean", 0.5)


def image(ident: int, rollout: RolloutParams | None = None) -> tuple[BatchKey, NDArray[np.uint8]]:
    return BatchKey("m", 1, GRID, rollout), np.full((*GRID, D), ident, dtype=np.uint8)


@contextlib.asynccontextmanager
async def batcher_with(calls: Calls, fail: bool = False) -> AsyncIterator[Batcher]:
    batcher = Batcher(
        [{("m", 1): LoggedBackend(calls)}],
        rollout_backends={("m", 1): LoggedRolloutBackend(calls, fail)},
        max_batch_size=32,
        max_batch_tokens=8192,
        max_queue_images=256,
    )
    batcher.start()
    try:
        yield batcher
    finally:
        calls.gate.set()
        await batcher.stop(drain_timeout_s=5)


async def held_first(calls: Calls, batcher: Batcher) -> asyncio.Task[list[Output]]:
    """A plain request that is running and held, so what comes next piles up in the queues."""
    calls.gate.clear()
    task = asyncio.get_running_loop().create_task(batcher.infer([image(100)], deadline_in(10)))
    assert await asyncio.to_thread(calls.started.wait, 10)
    return task


async def test_rollout_items_batch_only_with_equal_rollout_inputs_and_never_with_plain() -> None:
    calls = Calls()
    async with batcher_with(calls) as batcher:
        first = await held_first(calls, batcher)
        requests = [
            image(1),
            image(2, MEAN),
            image(3, MAX),
            image(4, MEAN),
            image(5),
            image(6, MEAN_HALF),
            image(7, MAX),
        ]
        tasks = [
            asyncio.get_running_loop().create_task(batcher.infer([r], deadline_in(10)))
            for r in requests
        ]
        await asyncio.sleep(0)
        calls.gate.set()
        await first
        outputs = [(await task)[0] for task in tasks]
    # Every item got its own answer, with a map exactly when it asked for one.
    assert [int(o.logits[0]) for o in outputs] == [1, 2, 3, 4, 5, 6, 7]
    for (key, _), output in zip(requests, outputs, strict=True):
        if key.rollout is None:
            assert output.rollout is None
        else:
            assert output.rollout is not None
            assert output.rollout.shape == GRID
            assert np.all(output.rollout == output.logits[0])
    # One batch per (graph, head fusion, discard ratio), oldest waiting first.
    assert calls.log == [
        ("plain", None, [100]),
        ("plain", None, [1, 5]),
        ("rollout", MEAN, [2, 4]),
        ("rollout", MAX, [3, 7]),
        ("rollout", MEAN_HALF, [6]),
    ]


async def test_a_rollout_key_for_a_version_without_a_rollout_graph_is_refused() -> None:
    calls = Calls()
    async with batcher_with(calls) as batcher:
        with pytest.raises(
            NotServedError,
            match=r"model 'm' version 2 is not served \(a reload removed it\); retry",
        ):
            batcher.submit([(BatchKey("m", 2, GRID, MEAN), image(1)[1])], deadline_in(10))
        assert batcher.queued == 0


async def test_a_failing_rollout_graph_fails_its_batch_only() -> None:
    calls = Calls()
    async with batcher_with(calls, fail=True) as batcher:
        first = await held_first(calls, batcher)
        rollout = asyncio.get_running_loop().create_task(
            batcher.infer([image(1, MEAN)], deadline_in(10))
        )
        plain = asyncio.get_running_loop().create_task(batcher.infer([image(2)], deadline_in(10)))
        await asyncio.sleep(0)
        calls.gate.set()
        await first
        with pytest.raises(InferenceError) as info:
            await rollout
        assert info.value.message == (
            "inference failed for model 'm' version 1 (RuntimeError); "
            "the error is logged on the server"
        )
        assert int((await plain)[0].logits[0]) == 2


async def test_a_queued_rollout_item_times_out_like_a_plain_one() -> None:
    calls = Calls()
    async with batcher_with(calls) as batcher:
        first = await held_first(calls, batcher)
        late = asyncio.get_running_loop().create_task(
            batcher.infer([image(1, MEAN)], deadline_in(0.05))
        )
        with pytest.raises(DeadlineExceededError) as info:
            await late
        assert info.value.message == "the request timed out waiting for inference"
        assert batcher.queued == 0
        calls.gate.set()
        await first
    assert [graph for graph, _, _ in calls.log] == ["plain"]
