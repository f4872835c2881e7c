"""What the batcher takes and gives: batch keys, each image's output, and why an image failed."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, TypeVar

import numpy as np
from numpy.typing import NDArray

from app.core.errors import ErrorKind, ServiceError
from app.models.spec import RolloutParams
from app.runtime.backends import Backend, DeviceInputBackend, RolloutBackend
from app.runtime.devicedecode import DeviceDecoder, EncodedImage

log = logging.getLogger(__name__)

Logits = NDArray[np.float32]
Patches = NDArray[np.uint8]
Probs = NDArray[np.float64]
RolloutMap = NDArray[np.float32]  # (grid_h, grid_w)


def softmax(logits: NDArray[np.floating]) -> NDArray[np.float64]:
    """Softmax over the last axis, in float64 and shifted by the max so exp never overflows.
    Each row of a batch is bit for bit the softmax of that row alone (a test holds it)."""
    x = logits.astype(np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    e = np.exp(x)
    return np.asarray(e / e.sum(axis=-1, keepdims=True), dtype=np.float64)


@dataclass(frozen=True)
class Output:
    """One image's answer from its batch."""

    logits: Logits  # (num_classes,)
    # softmax(logits), made with the batch's in the inference thread: off the event loop, and
    # one vectorised call per batch instead of one per image.
    probs: Probs
    rollout: RolloutMap | None = None  # (grid_h, grid_w), for rollout keys only
    # Seconds it waited in the queue before its batch ran. The front door records it with the
    # request's other figures: per image, in the front end's process, not the engine's.
    queued_s: float = 0.0


@dataclass(frozen=True)
class Refused:
    """An encoded image the device decoder did not take, and why: the front end decodes it
    on the CPU path instead (never an answer to a client by itself)."""

    reason: str


class BatchingError(ServiceError):
    """An item could not be answered with logits; `message` says why, for a person."""

    kind = ErrorKind.UNAVAILABLE


class OverloadedError(BatchingError):
    """The queue is full: refused at once rather than queued past any useful deadline."""

    kind = ErrorKind.SHED


class DeadlineExceededError(BatchingError):
    """Still waiting for the inference thread when the request's deadline came."""

    kind = ErrorKind.DEADLINE


class ShuttingDownError(BatchingError):
    """The batcher is stopping and takes no new work."""

    kind = ErrorKind.SHED


class InferenceError(BatchingError):
    """The backend failed on the batch this item was in (the server's fault, but one a client
    can route around: retry)."""


class DecodeRefusedError(BatchingError):
    """Carries a `Refused` image through the batcher's futures to `Engine.infer`."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class NotServedError(BatchingError):
    """The model version is not (or no longer) served: a reload removed it."""


def not_served(key: BatchKey) -> NotServedError:
    return NotServedError(
        f"model '{key.model}' version {key.version} is not served (a reload removed it); retry"
    )


@dataclass(frozen=True)
class BatchKey:
    model: str
    version: int
    grid: tuple[int, int]  # (grid_h, grid_w)
    rollout: RolloutParams | None = None  # None: the plain graph; else the rollout graph's inputs
    encoded: bool = False  # its items are encoded images, decoded on the device per batch

    @property
    def graph(self) -> Literal["plain", "rollout"]:
        return "plain" if self.rollout is None else "rollout"

    @property
    def tokens(self) -> int:
        return self.grid[0] * self.grid[1]


def _check_rows(what: str, rows: int, items: int) -> None:
    if rows != items:
        raise ValueError(f"backend returned {rows} {what} rows for {items} items")


class Stacker:
    """One lane's batch buffer: a batch's patches are stacked into memory kept from the batch
    before, not into a fresh allocation each time (megabytes, which the allocator maps anew and
    the kernel faults in page by page). One per lane: its thread runs one batch at a time, and
    a backend holds no input past its run."""

    def __init__(self) -> None:
        self._memory = np.empty(0, dtype=np.uint8)

    def stack(self, patches: Sequence[Patches]) -> Patches:
        shape = (len(patches), *patches[0].shape)
        size = int(np.prod(shape))
        if size > self._memory.size:
            self._memory = np.empty(size, dtype=np.uint8)
        out = self._memory[:size].reshape(shape)
        np.stack(patches, out=out)
        return out


# Both run in the inference thread: stacking copies megabytes, not for the event loop; and so
# does the softmax of the whole batch.
def run_plain(
    backend: Backend, patches: list[Patches], waits: list[float], stacker: Stacker
) -> list[Output]:
    """`waits`: each image's seconds in the queue, given back with its output."""
    logits = backend.run(stacker.stack(patches))  # (B, grid_h, grid_w, P*P*C) -> (B, classes)
    _check_rows("logits", logits.shape[0], len(patches))
    rows = zip(logits, softmax(logits), waits, strict=True)
    return [Output(row, p, None, wait) for row, p, wait in rows]


def run_rollout(
    backend: RolloutBackend,
    params: RolloutParams,
    patches: list[Patches],
    waits: list[float],
    stacker: Stacker,
) -> list[Output]:
    logits, maps = backend.run(stacker.stack(patches), params)  # (B, classes), (B, grid_h, grid_w)
    _check_rows("logits", logits.shape[0], len(patches))
    _check_rows("rollout", maps.shape[0], len(patches))
    rows = zip(logits, maps, softmax(logits), waits, strict=True)
    return [Output(row, p, rollout, wait) for row, rollout, p, wait in rows]


def run_decoded(
    backend: Backend, decoder: DeviceDecoder, images: list[EncodedImage], waits: list[float]
) -> list[Output | Refused]:
    """Decode a batch on the device and run the images it took; the others come back
    `Refused`. A decoder that fails outright refuses the whole batch (each image then takes
    the CPU path), where a failing session fails the batch as `run_plain`'s does."""
    try:
        decoded = decoder.decode(images)
    except Exception as exc:
        log.exception("the device decoder failed on a batch of %d", len(images))
        return [Refused(f"the device decoder failed ({type(exc).__name__})")] * len(images)
    outcomes: list[Output | Refused] = [
        Refused(decoded.refused.get(i, "the device decoder gave no answer"))
        for i in range(len(images))
    ]
    if not decoded.accepted:
        return outcomes
    if decoded.device is not None:
        if not isinstance(backend, DeviceInputBackend):
            raise RuntimeError(f"a {type(backend).__name__} takes no patches on the device")
        logits = backend.run_device(decoded.device)
    elif decoded.host is not None:
        logits = backend.run(decoded.host)
    else:
        raise RuntimeError("the device decoder accepted images and gave no patches")
    _check_rows("logits", logits.shape[0], len(decoded.accepted))
    for i, row, p in zip(decoded.accepted, logits, softmax(logits), strict=True):
        outcomes[i] = Output(row, p, None, waits[i])
    return outcomes


T = TypeVar("T")


def first_error_or_all(outcomes: Sequence[T | BaseException]) -> list[T]:
    """`asyncio.gather(..., return_exceptions=True)`'s outcomes, or the first error among them
    in their order (not in time), so an answer does not depend on which thread finished first."""
    results: list[T] = []
    for outcome in outcomes:
        if isinstance(outcome, BaseException):
            raise outcome
        results.append(outcome)
    return results
