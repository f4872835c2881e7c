"""Continuous batching of patch grids onto backends; knows nothing of HTTP or of ONNX.

Items wait in queues keyed by (model, version, grid): only equal grids stack into one tensor.
One scheduler task takes a batch the moment the inference thread is free, so an idle server
runs a lone request at once and a busy one runs whatever piled up meanwhile, bounded by a batch
size and a token budget. The key whose oldest item has waited longest goes first, so no grid
starves. Every admitted item is answered exactly once: a logits row or an exception.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import functools
import itertools
import logging
from collections import deque
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
from numpy.typing import NDArray

from app.runtime import Backend

log = logging.getLogger(__name__)

Logits = NDArray[np.float32]


class BatchingError(Exception):
    """An item could not be answered with logits; `message` says why, for a person."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class OverloadedError(BatchingError):
    """The queue is full: refused at once rather than queued past any useful deadline."""


class DeadlineExceededError(BatchingError):
    """Still waiting for the inference thread when the request's deadline came."""


class ShuttingDownError(BatchingError):
    """The batcher is stopping and takes no new work."""


class InferenceError(BatchingError):
    """The backend failed on the batch this item was in."""


@dataclass(frozen=True)
class BatchKey:
    model: str
    version: int
    grid: tuple[int, int]  # (grid_h, grid_w)

    @property
    def tokens(self) -> int:
        return self.grid[0] * self.grid[1]


class _State(enum.Enum):
    QUEUED = enum.auto()
    RUNNING = enum.auto()
    GONE = enum.auto()  # answered or cancelled while queued


@dataclass(eq=False)
class _Item:
    key: BatchKey
    patches: NDArray[np.uint8]  # (grid_h, grid_w, P*P*C)
    future: asyncio.Future[Logits]
    seq: int  # admission order: the oldest waiting key goes first
    state: _State = _State.QUEUED
    timer: asyncio.TimerHandle | None = field(default=None, repr=False)


def _answer(item: _Item, result: Logits | BaseException) -> None:
    if item.future.done():
        return
    if isinstance(result, BaseException):
        item.future.set_exception(result)
    else:
        item.future.set_result(result)


def _run_backend(backend: Backend, patches: list[NDArray[np.uint8]]) -> Logits:
    # Stacking copies megabytes: it belongs in the inference thread, not on the event loop.
    return backend.run(np.stack(patches))  # (B, grid_h, grid_w, P*P*C) -> (B, classes)


class Batcher:
    def __init__(
        self,
        backends: Mapping[tuple[str, int], Backend],
        *,
        max_batch_size: int,
        max_batch_tokens: int,
        max_queue_images: int,
    ) -> None:
        self._backends = backends
        self.max_batch_size = max_batch_size
        self.max_batch_tokens = max_batch_tokens
        self.max_queue_images = max_queue_images
        self._queues: dict[BatchKey, deque[_Item]] = {}
        self._queued = 0
        self._seq = itertools.count()
        self._wakeup = asyncio.Event()
        self._accepting = False
        self._task: asyncio.Task[None] | None = None
        # One thread: a batch leaves when the previous one returns (the "runtime is free" rule).
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vit-serve-infer")

    @property
    def queued(self) -> int:
        """Items admitted and not yet taken into a batch."""
        return self._queued

    @property
    def accepting(self) -> bool:
        """Started and not stopping: `submit` takes work."""
        return self._accepting

    def start(self) -> None:
        if self._task is not None:
            raise RuntimeError("batcher already started")
        self._accepting = True
        self._task = asyncio.get_running_loop().create_task(self._schedule(), name="batcher")

    def submit(
        self, requests: Sequence[tuple[BatchKey, NDArray[np.uint8]]], deadline: float
    ) -> list[asyncio.Future[Logits]]:
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
            if (key.model, key.version) not in self._backends:
                raise KeyError(f"no backend for {key.model} version {key.version}")
            if patches.shape[:2] != key.grid:
                raise ValueError(f"patches of grid {patches.shape[:2]} under key {key}")
        futures: list[asyncio.Future[Logits]] = []
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
        self, requests: Sequence[tuple[BatchKey, NDArray[np.uint8]]], deadline: float
    ) -> list[Logits]:
        """Submit and wait for every image's logits; raises the first image's error."""
        futures = self.submit(requests, deadline)
        # return_exceptions: every future's outcome is retrieved, none logged as "never
        # retrieved"; cancelling this call cancels the futures, which frees their queue slots.
        outcomes = await asyncio.gather(*futures, return_exceptions=True)
        results: list[Logits] = []
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                raise outcome
            results.append(outcome)
        return results

    async def stop(self, drain_timeout_s: float = 0.0) -> None:
        """Refuse new work, finish queued work for up to `drain_timeout_s`, answer the rest."""
        self._accepting = False
        self._wakeup.set()
        task, self._task = self._task, None
        if task is not None:
            try:
                await asyncio.wait_for(asyncio.shield(task), timeout=drain_timeout_s)
            except TimeoutError:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        for queue in self._queues.values():
            for item in queue:
                if item.state is _State.QUEUED:
                    _answer(item, ShuttingDownError("the server shut down before inference"))
        self._queues.clear()
        # A batch may still be running in the thread after a timeout: do not block on it.
        self._executor.shutdown(wait=False, cancel_futures=True)

    def _on_done(self, item: _Item, _: asyncio.Future[Logits]) -> None:
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

    def _take_batch(self) -> tuple[BatchKey, list[_Item]] | None:
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

    async def _schedule(self) -> None:
        while True:
            taken = self._take_batch()
            if taken is None:
                if not self._accepting:
                    return  # stopped and drained
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            key, batch = taken
            if batch:
                await self._run(key, batch)

    async def _run(self, key: BatchKey, batch: list[_Item]) -> None:
        backend = self._backends[(key.model, key.version)]
        loop = asyncio.get_running_loop()
        try:
            logits = await loop.run_in_executor(
                self._executor, _run_backend, backend, [item.patches for item in batch]
            )
            if logits.shape[0] != len(batch):
                raise ValueError(f"backend returned {logits.shape[0]} rows for {len(batch)} items")
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
            for item, row in zip(batch, logits, strict=True):
                _answer(item, row)
