"""The batcher under faults and concurrency, several runtime instances, and the queue delay."""

from __future__ import annotations

import asyncio
import random

import pytest

from app.engine.batcher import Batcher
from app.engine.batches import (
    BatchingError,
    DeadlineExceededError,
    InferenceError,
    Output,
    OverloadedError,
    ShuttingDownError,
)
from tests.fakes import (
    MODEL,
    SQUARE,
    WIDE,
    D,
    FaultyBackend,
    GatedBackend,
    deadline_in,
    ident,
    image,
)

pytestmark = pytest.mark.anyio


@pytest.mark.parametrize("instances", [1, 3])
async def test_every_accepted_request_gets_exactly_one_answer_whatever_fails(
    instances: int,
) -> None:
    backends = [FaultyBackend() for _ in range(instances)]
    batcher = Batcher(
        [{MODEL: b} for b in backends],
        max_batch_size=4,
        max_batch_tokens=8192,
        max_queue_images=24,
    )
    batcher.start()
    rng = random.Random(7)
    answers: dict[int, list[list[Output | BaseException]]] = {}
    refused = 0
    futures: list[asyncio.Future[Output]] = []

    async def client(request: int) -> None:
        nonlocal refused
        await asyncio.sleep(rng.random() * 0.05)
        images = [
            image(rng.choice((SQUARE, WIDE)), request % 250) for _ in range(rng.randint(1, 3))
        ]
        # Some deadlines pass while queued; some clients give up early (cancel).
        timeout = rng.choice((0.005, 0.05, 5.0))
        try:
            submitted = batcher.submit(images, deadline_in(timeout))
        except OverloadedError:
            refused += 1
            return
        futures.extend(submitted)
        if rng.random() < 0.15:
            await asyncio.sleep(0.001)
            for future in submitted:
                future.cancel()
        outcomes = await asyncio.gather(*submitted, return_exceptions=True)
        answers.setdefault(request, []).append(outcomes)

    await asyncio.wait_for(asyncio.gather(*(client(r) for r in range(300))), timeout=60)
    await batcher.stop(drain_timeout_s=5)

    assert refused > 0  # the queue did fill: backpressure was part of the run
    assert not [f for f in futures if not f.done()]  # no future left pending
    kinds: set[str] = set()
    for outcome_lists in answers.values():
        assert len(outcome_lists) == 1  # one answer per accepted request
        for outcome in outcome_lists[0]:
            if isinstance(outcome, Output):
                kinds.add("ok")
            elif isinstance(outcome, asyncio.CancelledError):
                kinds.add("cancelled")
            else:
                assert isinstance(outcome, BatchingError), outcome
                kinds.add(type(outcome).__name__)
    assert len(answers) + refused == 300
    assert {"ok", "cancelled", InferenceError.__name__, DeadlineExceededError.__name__} <= kinds
    assert batcher.queued == 0
    assert sum(b.batches for b in backends) > 0


async def test_each_runtime_instance_runs_batches_in_its_own_thread() -> None:
    first, second = GatedBackend(), GatedBackend()
    batcher = Batcher(
        [{MODEL: first}, {MODEL: second}],
        max_batch_size=32,
        max_batch_tokens=8192,
        max_queue_images=64,
    )
    batcher.start()
    try:
        await first.hold()
        held = asyncio.ensure_future(batcher.infer([image(SQUARE, 1)], deadline_in(10)))
        await first.wait_started()
        # The first instance is busy: the next request runs at once on the second.
        (output,) = await batcher.infer([image(SQUARE, 2)], deadline_in(10))
        assert ident(output) == 2 and second.batch_sizes == [1]
        first.gate.set()
        assert [ident(o) for o in await held] == [1]
    finally:
        first.gate.set()
        await batcher.stop(drain_timeout_s=5)


def test_every_instance_must_serve_the_same_versions() -> None:
    with pytest.raises(ValueError, match="same model versions"):
        Batcher(
            [{MODEL: GatedBackend()}, {}],
            max_batch_size=1,
            max_batch_tokens=64,
            max_queue_images=1,
        )


async def test_a_queue_delay_holds_a_batch_until_it_is_full() -> None:
    backend = GatedBackend()
    batcher = Batcher(
        [{MODEL: backend}],
        max_batch_size=4,
        max_batch_tokens=8192,
        max_queue_images=64,
        max_queue_delay_ms=60_000,  # far longer than the test: only a full batch leaves
    )
    batcher.start()
    try:
        tasks = []
        for i in range(4):
            tasks.append(asyncio.ensure_future(batcher.infer([image(SQUARE, i)], deadline_in(30))))
            await asyncio.sleep(0.01)  # separate arrivals, each a chance to leave early
        outputs = await asyncio.gather(*tasks)
        assert backend.batch_sizes == [4]
        assert [ident(o) for (o,) in outputs] == [0, 1, 2, 3]
    finally:
        await batcher.stop(drain_timeout_s=5)


async def test_stop_runs_a_held_batch_rather_than_waiting_out_the_delay() -> None:
    backend = GatedBackend()
    batcher = Batcher(
        [{MODEL: backend}],
        max_batch_size=4,
        max_batch_tokens=8192,
        max_queue_images=64,
        max_queue_delay_ms=60_000,
    )
    batcher.start()
    task = asyncio.ensure_future(batcher.infer([image(SQUARE, 9)], deadline_in(30)))
    await asyncio.sleep(0.01)
    assert backend.batch_sizes == []  # held for a fuller batch
    await batcher.stop(drain_timeout_s=5)
    assert [ident(o) for o in await task] == [9]
    with pytest.raises(ShuttingDownError):
        batcher.submit([image(SQUARE, 1)], deadline_in(1))


def test_patch_dim_matches_the_shared_fixture() -> None:
    assert D == 8 * 8 * 3
