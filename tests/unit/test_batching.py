"""Continuous batching (app.engine.batcher) with a fake backend the test holds and releases."""

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
    Output,
    OverloadedError,
    ShuttingDownError,
    Stacker,
)
from tests.fakes import MODEL, SQUARE, WIDE, D, GatedBackend, deadline_in, ident, image

pytestmark = pytest.mark.anyio


class Harness:
    def __init__(self, backend: GatedBackend, batcher: Batcher) -> None:
        self.backend = backend
        self.batcher = batcher

    def submit(
        self, *requests: tuple[BatchKey, NDArray[np.uint8]], timeout: float = 10.0
    ) -> asyncio.Task[list[Output]]:
        """One request (all its images), running as its own task like an HTTP handler."""
        coro = self.batcher.infer(list(requests), deadline_in(timeout))
        return asyncio.get_running_loop().create_task(coro)

    async def start_blocked(self) -> asyncio.Task[list[Output]]:
        """A first request that is running (taken from the queue) and held in the backend."""
        await self.backend.hold()
        task = self.submit(image(SQUARE, 200))
        await self.backend.wait_started()
        return task


@contextlib.asynccontextmanager
async def harness_with(
    fail_on_calls: frozenset[int] = frozenset(),
    max_batch_size: int = 32,
    max_batch_tokens: int = 8192,
    max_queue_images: int = 256,
) -> AsyncIterator[Harness]:
    backend = GatedBackend(fail_on_calls=fail_on_calls)
    batcher = Batcher(
        [{MODEL: backend}],
        max_batch_size=max_batch_size,
        max_batch_tokens=max_batch_tokens,
        max_queue_images=max_queue_images,
    )
    batcher.start()
    try:
        yield Harness(backend, batcher)
    finally:
        backend.gate.set()
        await batcher.stop(drain_timeout_s=5)


@pytest.fixture
async def harness() -> AsyncIterator[Harness]:
    async with harness_with() as h:
        yield h


async def test_a_lone_request_runs_at_once_in_a_batch_of_one(harness: Harness) -> None:
    # No fixed batching window: an idle batcher runs the request as soon as it arrives.
    results = await asyncio.wait_for(harness.submit(image(SQUARE, 7)), timeout=5)
    assert [ident(r) for r in results] == [7]
    assert harness.backend.shapes == [(1, 8, 8, D)]


async def test_batches_grow_while_the_runtime_is_busy(harness: Harness) -> None:
    first = await harness.start_blocked()
    waiting = [harness.submit(image(SQUARE, i)) for i in range(10)]
    await asyncio.sleep(0)
    assert harness.batcher.queued == 10
    harness.backend.gate.set()
    assert [ident(r) for r in await first] == [200]
    assert [ident((await task)[0]) for task in waiting] == list(range(10))
    assert harness.backend.batch_sizes == [1, 10]


async def test_a_multi_image_request_gets_its_answers_in_order(harness: Harness) -> None:
    results = await harness.submit(image(SQUARE, 1), image(WIDE, 2), image(SQUARE, 3))
    assert [ident(r) for r in results] == [1, 2, 3]


async def test_max_batch_size_bounds_every_batch() -> None:
    async with harness_with(max_batch_size=4) as h:
        first = await h.start_blocked()
        waiting = [h.submit(image(SQUARE, i)) for i in range(10)]
        h.backend.gate.set()
        await asyncio.gather(first, *waiting)
        assert h.backend.batch_sizes == [1, 4, 4, 2]


async def test_the_token_budget_bounds_every_batch() -> None:
    async with harness_with(max_batch_tokens=200) as h:  # 3 grids of 64 tokens
        first = await h.start_blocked()
        waiting = [h.submit(image(SQUARE, i)) for i in range(7)]
        h.backend.gate.set()
        await asyncio.gather(first, *waiting)
        assert h.backend.batch_sizes == [1, 3, 3, 1]


async def test_an_image_over_the_token_budget_still_runs_alone() -> None:
    async with harness_with(max_batch_tokens=10) as h:
        first = await h.start_blocked()
        waiting = [h.submit(image(SQUARE, i)) for i in range(3)]
        h.backend.gate.set()
        await asyncio.gather(first, *waiting)
        assert h.backend.batch_sizes == [1, 1, 1, 1]


async def test_grids_are_never_mixed_and_the_oldest_waiting_grid_goes_first(
    harness: Harness,
) -> None:
    first = await harness.start_blocked()
    # WIDE has the oldest waiting item, so it goes before SQUARE even though SQUARE was first
    # to run; each batch holds one grid only.
    order = [image(WIDE, 1), image(SQUARE, 2), image(WIDE, 3), image(SQUARE, 4)]
    waiting = [harness.submit(request) for request in order]
    harness.backend.gate.set()
    await first
    assert [ident((await task)[0]) for task in waiting] == [1, 2, 3, 4]
    assert harness.backend.shapes == [(1, 8, 8, D), (2, 4, 16, D), (2, 8, 8, D)]


async def test_a_full_queue_is_refused_at_once() -> None:
    async with harness_with(max_queue_images=3) as h:
        first = await h.start_blocked()  # running, so no longer queued
        waiting = [h.submit(image(SQUARE, i)) for i in range(3)]
        await asyncio.sleep(0)
        with pytest.raises(OverloadedError) as info:
            h.batcher.submit([image(SQUARE, 9)], deadline_in(10))
        assert info.value.message == (
            "the server is overloaded (inference queue full at 3 images); retry shortly"
        )
        h.backend.gate.set()
        await asyncio.gather(first, *waiting)


async def test_a_request_that_does_not_fit_whole_is_refused_whole() -> None:
    async with harness_with(max_queue_images=3) as h:
        first = await h.start_blocked()
        waiting = h.submit(image(SQUARE, 1), image(SQUARE, 2))
        await asyncio.sleep(0)
        with pytest.raises(OverloadedError):
            h.batcher.submit([image(SQUARE, 3), image(SQUARE, 4)], deadline_in(10))
        assert h.batcher.queued == 2
        h.backend.gate.set()
        await asyncio.gather(first, waiting)


async def test_an_image_still_queued_at_its_deadline_gets_a_timeout(harness: Harness) -> None:
    first = await harness.start_blocked()
    late = harness.submit(image(SQUARE, 1), timeout=0.05)
    with pytest.raises(DeadlineExceededError) as info:
        await asyncio.wait_for(late, timeout=5)
    assert info.value.message == "the request timed out waiting for inference"
    assert harness.batcher.queued == 0
    harness.backend.gate.set()
    assert [ident(r) for r in await first] == [200]
    assert harness.backend.batch_sizes == [1]  # the expired image never ran


async def test_a_running_image_is_answered_even_after_its_deadline(harness: Harness) -> None:
    await harness.backend.hold()
    task = harness.submit(image(SQUARE, 5), timeout=0.05)
    await harness.backend.wait_started()
    await asyncio.sleep(0.1)
    harness.backend.gate.set()
    assert [ident(r) for r in await task] == [5]


async def test_a_backend_error_answers_every_image_of_its_batch_and_later_requests_work() -> None:
    async with harness_with(fail_on_calls=frozenset({1})) as h:
        first = await h.start_blocked()
        doomed = [h.submit(image(SQUARE, i)) for i in range(3)]
        h.backend.gate.set()
        assert [ident(r) for r in await first] == [200]
        for task in doomed:
            with pytest.raises(InferenceError) as info:
                await task
            assert info.value.message == (
                "inference failed for model 'm' version 1 (RuntimeError); "
                "the error is logged on the server"
            )
        assert [ident(r) for r in await h.submit(image(SQUARE, 4))] == [4]
        assert h.backend.batch_sizes == [1, 3, 1]


async def test_stop_answers_running_and_queued_images_and_refuses_new_ones() -> None:
    backend = GatedBackend()
    batcher = Batcher(
        [{MODEL: backend}], max_batch_size=2, max_batch_tokens=8192, max_queue_images=8
    )
    batcher.start()
    h = Harness(backend, batcher)
    running = await h.start_blocked()
    queued = [h.submit(image(SQUARE, i)) for i in range(3)]
    await asyncio.sleep(0)
    await batcher.stop(drain_timeout_s=0.05)
    with pytest.raises(ShuttingDownError, match="shut down during inference"):
        await running
    for task in queued:
        with pytest.raises(ShuttingDownError, match="shut down before inference"):
            await task
    with pytest.raises(ShuttingDownError) as info:
        batcher.submit([image(SQUARE, 9)], deadline_in(10))
    assert info.value.message == "the server is shutting down; retry on another replica"
    backend.gate.set()


async def test_stop_drains_queued_work_when_given_time() -> None:
    backend = GatedBackend()
    batcher = Batcher(
        [{MODEL: backend}], max_batch_size=2, max_batch_tokens=8192, max_queue_images=8
    )
    batcher.start()
    h = Harness(backend, batcher)
    running = await h.start_blocked()
    queued = [h.submit(image(SQUARE, i)) for i in range(3)]
    await asyncio.sleep(0)
    stopping = asyncio.get_running_loop().create_task(batcher.stop(drain_timeout_s=10))
    await asyncio.sleep(0.01)
    backend.gate.set()
    await stopping
    assert [ident(r) for r in await running] == [200]
    assert [ident((await task)[0]) for task in queued] == [0, 1, 2]
    assert backend.batch_sizes == [1, 2, 1]


async def test_a_cancelled_request_frees_its_queue_slot() -> None:
    async with harness_with(max_queue_images=2) as h:
        first = await h.start_blocked()
        gone = h.submit(image(SQUARE, 1), image(SQUARE, 2))
        await asyncio.sleep(0)
        assert h.batcher.queued == 2
        gone.cancel()  # the client went away
        with pytest.raises(asyncio.CancelledError):
            await gone
        assert h.batcher.queued == 0
        kept = h.submit(image(SQUARE, 3))
        h.backend.gate.set()
        await first
        assert [ident(r) for r in await kept] == [3]
        assert h.backend.batch_sizes == [1, 1]  # the cancelled images never ran


def test_a_lanes_batches_are_stacked_into_the_memory_of_the_batch_before() -> None:
    stacker = Stacker()
    rng = np.random.default_rng(3)
    big = [rng.integers(0, 256, (4, 4, 12), dtype=np.uint8) for _ in range(3)]
    first = stacker.stack(big)
    np.testing.assert_array_equal(first, np.stack(big))
    small = [rng.integers(0, 256, (2, 3, 12), dtype=np.uint8) for _ in range(2)]
    second = stacker.stack(small)
    np.testing.assert_array_equal(second, np.stack(small))
    assert np.shares_memory(first, second)  # no new allocation for a batch that fits
    bigger = [rng.integers(0, 256, (8, 8, 12), dtype=np.uint8) for _ in range(4)]
    third = stacker.stack(bigger)
    np.testing.assert_array_equal(third, np.stack(bigger))
    assert not np.shares_memory(second, third)  # grown once, for the larger batch
