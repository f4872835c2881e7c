"""Fake inference backends, shared by the batcher's and the API's tests.

A fake answers each image with its id: the value its patches are filled with (`image` makes
such images; for a real image it is the first byte of its first patch). Logits (B, num_classes)
are the id, then zeros; `ident` reads it back.
"""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
from numpy.typing import NDArray

from app.engine.batches import BatchKey, Output
from app.models.repository import ModelVersion
from app.models.spec import RolloutParams

D = 8 * 8 * 3  # one patch of the fake model: 8x8 pixels, RGB
MODEL = ("m", 1)
SQUARE = BatchKey("m", 1, (8, 8))  # 64 tokens
WIDE = BatchKey("m", 1, (4, 16))  # 64 tokens, another grid


def image(key: BatchKey, ident: int) -> tuple[BatchKey, NDArray[np.uint8]]:
    """An image for the batcher, its patches filled with `ident`."""
    return key, np.full((*key.grid, D), ident, dtype=np.uint8)


def ident(output: Output) -> int:
    return int(output.logits[0])


def deadline_in(seconds: float) -> float:
    return asyncio.get_running_loop().time() + seconds


def _ids(patches: NDArray[np.uint8]) -> NDArray[np.float32]:
    return patches.reshape(len(patches), -1)[:, 0].astype(np.float32)


def _logits(ids: NDArray[np.float32], num_classes: int) -> NDArray[np.float32]:
    logits = np.zeros((len(ids), num_classes), dtype=np.float32)
    logits[:, 0] = ids
    return logits  # (B, num_classes)


class GatedBackend:
    """Answers each image with its id; records each batch's shape.

    While `gate` is clear, a batch blocks inside the inference thread, as a long batch would;
    `started` is set when a batch reaches it. Every batch fails while `fail` is set, and so do
    the calls numbered in `fail_on_calls` (from 0).
    """

    provider = "fake"

    def __init__(
        self,
        num_classes: int = 2,
        fail: bool = False,
        fail_on_calls: frozenset[int] = frozenset(),
    ) -> None:
        self.num_classes = num_classes
        self.fail = fail
        self.fail_on_calls = fail_on_calls
        self.shapes: list[tuple[int, ...]] = []
        self.gate = threading.Event()
        self.gate.set()
        self.started = threading.Event()

    def run(self, patches: NDArray[np.uint8]) -> NDArray[np.float32]:
        call = len(self.shapes)
        self.shapes.append(patches.shape)
        self.started.set()
        self.gate.wait(timeout=10)  # never hang the suite, whatever a test forgets
        if self.fail or call in self.fail_on_calls:
            raise RuntimeError("session exploded")
        return _logits(_ids(patches), self.num_classes)

    @property
    def batch_sizes(self) -> list[int]:
        return [shape[0] for shape in self.shapes]

    async def hold(self) -> None:
        """Clear the gate; the next batch blocks."""
        self.gate.clear()
        self.started.clear()

    async def wait_started(self) -> None:
        assert await asyncio.to_thread(self.started.wait, 10)


class FakeBackends:
    """A backend factory for the service that keeps what it made (a GatedBackend for each model
    version), so a test can hold or break them."""

    def __init__(self, fail: bool = False) -> None:
        self.fail = fail
        self.made: dict[tuple[str, int], GatedBackend] = {}

    def __call__(self, version: ModelVersion) -> GatedBackend:
        backend = GatedBackend(version.spec.architecture.num_classes, self.fail)
        self.made[(version.name, version.version)] = backend
        return backend


class FaultyBackend:
    """Slow on every 4th batch from the first, fails on the next, answers the rest with each
    image's id. Slow first: with every instance busy at once at the start, the first requests'
    short deadlines pass while they are queued, however many instances there are."""

    provider = "fake"

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.batches = 0

    def run(self, patches: NDArray[np.uint8]) -> NDArray[np.float32]:
        ids = _ids(patches)
        with self._lock:
            fate = self.batches % 4
            self.batches += 1
        if fate == 0:
            time.sleep(0.02)  # slow: later requests pile up and some reach their deadlines
        if fate == 1:
            raise RuntimeError("session exploded")
        return _logits(ids, 2)


class Calls:
    """What a plain and a rollout backend ran, in order, across both graphs; the first call can
    be held (while `gate` is clear)."""

    def __init__(self) -> None:
        self.log: list[tuple[str, RolloutParams | None, list[int]]] = []
        self.gate = threading.Event()
        self.gate.set()
        self.started = threading.Event()

    def record(self, graph: str, params: RolloutParams | None, patches: NDArray[np.uint8]) -> None:
        ids = patches.reshape(len(patches), -1)[:, 0].tolist()
        self.log.append((graph, params, ids))
        self.started.set()
        self.gate.wait(timeout=10)


class LoggedBackend:
    """A plain backend that logs its calls in `calls` and answers each image with its id."""

    provider = "fake"

    def __init__(self, calls: Calls) -> None:
        self.calls = calls

    def run(self, patches: NDArray[np.uint8]) -> NDArray[np.float32]:
        self.calls.record("plain", None, patches)
        return _logits(_ids(patches), 2)


class LoggedRolloutBackend:
    """A rollout backend that logs its calls in `calls`: logits like LoggedBackend's, and each
    map filled with its image's id."""

    provider = "fake"

    def __init__(self, calls: Calls, fail: bool = False) -> None:
        self.calls = calls
        self.fail = fail

    def run(
        self, patches: NDArray[np.uint8], params: RolloutParams
    ) -> tuple[NDArray[np.float32], NDArray[np.float32]]:
        self.calls.record("rollout", params, patches)
        if self.fail:
            raise RuntimeError("rollout session exploded")
        ids = _ids(patches)
        maps = np.broadcast_to(ids[:, None, None], (len(patches), *patches.shape[1:3]))
        return _logits(ids, 2), np.ascontiguousarray(maps)
