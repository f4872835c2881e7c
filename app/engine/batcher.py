"""Continuous batching of patch grids onto backends; knows nothing of HTTP or of ONNX.

Items wait in queues keyed by (model, version, grid, graph): only equal grids stack into one
tensor, and rollout items (the second graph, whose head fusion and discard ratio are per-batch
inputs) stack only with items asking for the same rollout, so plain items never touch it.
One scheduler task takes a batch the moment the inference thread is free, so an idle server
runs a lone request at once and a busy one runs whatever piled up meanwhile, bounded by a batch
size and a token budget. The key whose oldest item has waited longest goes first, so no grid
starves. Every admitted item is answered exactly once: an `Output` or an exception.

Each runtime instance is a lane: its own backends (sessions), its own thread and its own
scheduling coroutine; a batch leaves on whichever lane is free first. `max_queue_delay_ms`
(0 by default) lets a free lane hold a batch that is not yet full for up to that long after its
oldest item arrived, for hardware where a fuller batch costs little more than a small one.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import functools
import itertools
import logging
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Protocol, cast

import numpy as np
from numpy.typing import NDArray

from app.core.priority import start_worker
from app.core.threads import INFERENCE
from app.engine.batches import (
    BatchKey,
    DeadlineExceededError,
    DecodeRefusedError,
    InferenceError,
    NotServedError,
    Output,
    OverloadedError,
    Refused,
    ShuttingDownError,
    Stacker,
    first_error_or_all,
    not_served,
    run_decoded,
    run_plain,
    run_rollout,
)
from app.models.repository import VersionKey
from app.runtime.backends import Backend, RolloutBackend
from app.runtime.devicedecode import DeviceDecoder, EncodedImage

log = logging.getLogger(__name__)


class _State(enum.Enum):
    QUEUED = enum.auto()
    RUNNING = enum.auto()
    GONE = enum.auto()  # answered or cancelled while queued


@dataclass(eq=False)
class _Item:
    key: BatchKey
    patches: NDArray[np.uint8] | EncodedImage  # (grid_h, grid_w, P*P*C), or for the device
    future: asyncio.Future[Output]
    seq: int  # admission order: the oldest waiting key goes first
    state: _State = _State.QUEUED
    timer: asyncio.TimerHandle | None = field(default=None, repr=False)
    enqueued_at: float = field(default_factory=time.perf_counter)  # for the queue-wait metric


def grid_of(image: NDArray[np.uint8] | EncodedImage) -> tuple[int, int]:
    if isinstance(image, EncodedImage):
        return image.grid
    return (int(image.shape[0]), int(image.shape[1]))


def _answer(item: _Item, result: Output | BaseException) -> None:
    if item.future.done():
        return
    if isinstance(result, BaseException):
        item.future.set_exception(result)
    else:
        item.future.set_result(result)


async def outputs_of(futures: Sequence[asyncio.Future[Output]]) -> list[Output]:
    """Every image's output of a submitted request, in order; raises the first image's error.
    Cancelling the wait cancels the futures, which frees their queue places."""
    if len(futures) == 1:  # the usual request: awaited as it is, no gathering future
        return [await futures[0]]
    # return_exceptions: every future's outcome is retrieved, none logged as "never retrieved".
    return first_error_or_all(await asyncio.gather(*futures, return_exceptions=True))


class BatchObserver(Protocol):
    """Told of each batch that ran (the service's metrics); must not raise. (Each image's
    queue wait goes back with its output: `Output.queued_s`.)"""

    def batch_done(self, key: BatchKey, images: int, run_s: float) -> None: ...


class Batcher:
    def __init__(
        self,
        lanes: Sequence[Mapping[VersionKey, Backend]],
        *,
        rollout_backends: Mapping[VersionKey, RolloutBackend] | None = None,
        max_batch_size: int,
        max_batch_tokens: int,
        max_queue_images: int,
        max_queue_delay_ms: float = 0.0,
        worker_nice: int = 0,
    ) -> None:
        """`lanes`: one mapping of backends per runtime instance, each serving the same
        versions; each lane's inference thread runs `worker_nice` nicer than its creator.

        Rollout backends are shared by every lane: ONNX Runtime sessions take concurrent runs.
        """
        if not lanes:
            raise ValueError("a batcher needs at least one runtime instance")
        # Not copies: the model table's live views, so what it serves is what runs (a reload
        # changes them in place; each batch reads its backend as it starts).
        self._lanes: list[Mapping[VersionKey, Backend]] = list(lanes)
        self._backends = self._lanes[0]
        if any(lane.keys() != self._backends.keys() for lane in self._lanes):
            raise ValueError("every runtime instance must serve the same model versions")
        self.max_queue_delay_s = max_queue_delay_ms / 1e3
        self._rollout_backends: Mapping[VersionKey, RolloutBackend] = rollout_backends or {}
        self.max_batch_size = max_batch_size
        self.max_batch_tokens = max_batch_tokens
        self.max_queue_images = max_queue_images
        self._queues: dict[BatchKey, deque[_Item]] = {}
        self._queued = 0
        self._seq = itertools.count()
        self._wakeup = asyncio.Event()
        self._accepting = False
        self._tasks: list[asyncio.Task[None]] = []
        # One thread per lane: a lane takes its next batch when its previous one returns (the
        # "runtime is free" rule).
        self._executors = [
            ThreadPoolExecutor(
                max_workers=1,
                thread_name_prefix=f"{INFERENCE}-{i}",
                initializer=start_worker,
                initargs=(f"{INFERENCE}-{i}", worker_nice),
            )
            for i in range(len(self._lanes))
        ]
        self.observer: BatchObserver | None = None
        self._stackers = [Stacker() for _ in self._lanes]  # each lane's batch buffer
        # Decodes the encoded items' batches (the engine's, where VIT_SERVE_DECODE serves).
        self.decoder: DeviceDecoder | None = None

    @property
    def queued(self) -> int:
        """Items admitted and not yet taken into a batch."""
        return self._queued

    @property
    def accepting(self) -> bool:
        """Started and not stopping: `submit` takes work."""
        return self._accepting

    @property
    def instances(self) -> int:
        """Runtime instances (lanes), each with its own thread."""
        return len(self._lanes)

    def serves(self, version: VersionKey) -> bool:
        return version in self._backends

    def backend(self, version: VersionKey) -> Backend:
        """The first runtime instance's backend of `version` (KeyError when not served)."""
        return self._backends[version]

    def start(self) -> None:
        if self._tasks:
            raise RuntimeError("batcher already started")
        self._accepting = True
        loop = asyncio.get_running_loop()
        self._tasks = [
            loop.create_task(self._schedule(lane), name=f"batcher-{lane}")
            for lane in range(len(self._lanes))
        ]

    def submit(
        self,
        requests: Sequence[tuple[BatchKey, NDArray[np.uint8] | EncodedImage]],
        deadline: float,
    ) -> list[asyncio.Future[Output]]:
        """Admit all of a request's images or none; `deadline` is in the event loop's clock."""
        if not self._accepting:
            raise ShuttingDownError("the server is shutting down; retry on another replica")
        if self._queued + len(requests) > self.max_queue_images:
            raise OverloadedError(
                f"the server is overloaded (inference queue full at {self.max_queue_images} "
                "images); retry shortly"
            )
        loop = asyncio.get_running_loop()
        if deadline <= loop.time():
            raise DeadlineExceededError("the request's deadline passed before inference")
        for key, patches in requests:
            served = self._backends if key.rollout is None else self._rollout_backends
            if (key.model, key.version) not in served:
                if key.rollout is None or (key.model, key.version) not in self._backends:
                    raise not_served(key)
                raise NotServedError(
                    f"model '{key.model}' version {key.version} has no rollout graph"
                )
            if key.encoded:
                if not isinstance(patches, EncodedImage) or patches.grid != key.grid:
                    raise ValueError(f"an image of grid {grid_of(patches)} under key {key}")
                if self.decoder is None or key.rollout is not None:
                    raise ValueError(f"encoded images under key {key}, and no device decoder")
            elif isinstance(patches, EncodedImage) or patches.shape[:2] != key.grid:
                raise ValueError(f"an image of grid {grid_of(patches)} under key {key}")
        futures: list[asyncio.Future[Output]] = []
        for key, patches in requests:
            item = _Item(key=key, patches=patches, future=loop.create_future(), seq=next(self._seq))
            item.timer = loop.call_at(deadline, self._expire, item)
            item.future.add_done_callback(functools.partial(self._on_done, item))
            self._queues.setdefault(key, deque()).append(item)
            self._queued += 1
            futures.append(item.future)
        self._wakeup.set()
        return futures

    async def infer(
        self,
        requests: Sequence[tuple[BatchKey, NDArray[np.uint8] | EncodedImage]],
        deadline: float,
    ) -> list[Output]:
        """Submit and wait for every image's output; raises the first image's error."""
        return await outputs_of(self.submit(requests, deadline))

    async def stop(self, drain_timeout_s: float = 0.0) -> None:
        """Refuse new work, finish queued work for up to `drain_timeout_s`, answer the rest."""
        self._accepting = False
        self._wakeup.set()
        tasks, self._tasks = self._tasks, []
        if tasks:
            every = asyncio.gather(*tasks)
            try:
                await asyncio.wait_for(asyncio.shield(every), timeout=drain_timeout_s)
            except TimeoutError:
                for task in tasks:
                    task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await every
        for queue in self._queues.values():
            for item in queue:
                if item.state is _State.QUEUED:
                    _answer(item, ShuttingDownError("the server shut down before inference"))
        self._queues.clear()
        # A batch may still be running in a thread after a timeout: do not block on it.
        for executor in self._executors:
            executor.shutdown(wait=False, cancel_futures=True)

    def _on_done(self, item: _Item, _: asyncio.Future[Output]) -> None:
        self._leave_queue(item)

    def _leave_queue(self, item: _Item) -> None:
        # Runs when an item's future is done: answered by a deadline, or cancelled by a client
        # that went away while it waited. Either way its queue slot is free.
        if item.state is _State.QUEUED:
            item.state = _State.GONE
            self._queued -= 1
        if item.timer is not None:
            item.timer.cancel()

    def _expire(self, item: _Item) -> None:
        if item.state is _State.QUEUED:
            _answer(item, DeadlineExceededError("the request timed out waiting for inference"))

    def _take_batch(self) -> tuple[BatchKey, list[_Item]] | float | None:
        """The next batch; None when nothing waits; or, under `max_queue_delay_ms`, how many
        seconds to wait for the oldest key's batch to fill."""
        oldest: _Item | None = None
        for key in list(self._queues):
            queue = self._queues[key]
            while queue and (queue[0].state is not _State.QUEUED or queue[0].future.done()):
                self._leave_queue(queue.popleft())
            if not queue:
                del self._queues[key]
            elif oldest is None or queue[0].seq < oldest.seq:
                oldest = queue[0]
        if oldest is None:
            return None
        key = oldest.key
        queue = self._queues[key]
        if self.max_queue_delay_s > 0 and self._accepting:
            hold_s = oldest.enqueued_at + self.max_queue_delay_s - time.perf_counter()
            full = min(self.max_batch_size, max(1, self.max_batch_tokens // key.tokens))
            if hold_s > 0 and len(queue) < full:
                return hold_s
        batch: list[_Item] = []
        tokens = 0
        while queue and len(batch) < self.max_batch_size:
            item = queue[0]
            if item.state is not _State.QUEUED or item.future.done():
                self._leave_queue(queue.popleft())
                continue
            # The first item always goes, even if its grid alone is over the token budget.
            if batch and tokens + key.tokens > self.max_batch_tokens:
                break
            queue.popleft()
            item.state = _State.RUNNING
            self._queued -= 1
            if item.timer is not None:
                item.timer.cancel()
            batch.append(item)
            tokens += key.tokens
        if not queue:
            del self._queues[key]
        return key, batch

    async def _schedule(self, lane: int) -> None:
        while True:
            taken = self._take_batch()
            if taken is None:
                if not self._accepting:
                    return  # stopped and drained
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            if isinstance(taken, float):
                # Hold for a fuller batch; any new item wakes every lane to look again.
                self._wakeup.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wakeup.wait(), timeout=taken)
                continue
            key, batch = taken
            if batch:
                # Another lane may have a batch to take too: let it look.
                self._wakeup.set()
                await self._run(lane, key, batch)

    async def _run(self, lane: int, key: BatchKey, batch: list[_Item]) -> None:
        version = (key.model, key.version)
        plain = self._lanes[lane].get(version)
        rollout = self._rollout_backends.get(version)
        if plain is None or (key.rollout is not None and rollout is None):
            for item in batch:  # its version left the table while it was queued
                _answer(item, not_served(key))
            return
        started = time.perf_counter()
        waits = [started - item.enqueued_at for item in batch]
        images = [item.patches for item in batch]
        job: Callable[[], Sequence[Output | Refused]]
        if key.encoded:
            assert self.decoder is not None  # `submit` takes encoded images only with one
            encoded = [i for i in images if isinstance(i, EncodedImage)]
            job = functools.partial(run_decoded, plain, self.decoder, encoded, waits)
        else:
            patches = cast(list[NDArray[np.uint8]], images)  # `submit` keyed them so
            if key.rollout is None:
                job = functools.partial(run_plain, plain, patches, waits, self._stackers[lane])
            else:
                assert rollout is not None
                job = functools.partial(
                    run_rollout, rollout, key.rollout, patches, waits, self._stackers[lane]
                )
        loop = asyncio.get_running_loop()
        try:
            outputs: Sequence[Output | Refused] = await loop.run_in_executor(
                self._executors[lane], job
            )
        except asyncio.CancelledError:
            for item in batch:
                _answer(item, ShuttingDownError("the server shut down during inference"))
            raise
        except Exception as exc:
            log.exception("inference failed: %s, batch of %d", key, len(batch))
            for item in batch:
                error = InferenceError(
                    f"inference failed for model '{key.model}' version {key.version} "
                    f"({type(exc).__name__}); the error is logged on the server"
                )
                error.__cause__ = exc
                _answer(item, error)
        else:
            ran = len(batch)
            for item, output in zip(batch, outputs, strict=True):
                if isinstance(output, Refused):  # only a device decoder's batch has these
                    _answer(item, DecodeRefusedError(output.reason))
                    ran -= 1
                else:
                    _answer(item, output)
            if self.observer is not None and ran:
                self.observer.batch_done(key, ran, time.perf_counter() - started)
