"""What one request learned on its way (its model, its preprocessing time, its error's kind).

A context variable carries the record: the request middleware opens it, and the classify
service and the error handlers fill it without knowing about HTTP or Prometheus. Imports
nothing of the app, so every layer may use it.
"""

from __future__ import annotations

import contextvars
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field


@dataclass
class RequestRecord:
    """What one request learned on its way, for the middleware to report when it ends."""

    request_id: str
    model: str = ""  # the model it resolved to; "" before (or without) resolution
    images: int = 0
    preprocess_s: float | None = None
    queue_waits_s: Sequence[float] = ()  # each image's wait for its batch, from the engine
    error_reason: str | None = None
    # Images by (decode path, reason): "gpu"/"cpu" and why (app/pipeline/routing.py).
    decodes: dict[tuple[str, str], int] = field(default_factory=dict)


_current: contextvars.ContextVar[RequestRecord | None] = contextvars.ContextVar(
    "vit_serve_request", default=None
)


@contextmanager
def request_scope(record: RequestRecord) -> Iterator[RequestRecord]:
    """Make `record` the current request's for the code this block runs (and its tasks)."""
    token = _current.set(record)
    try:
        yield record
    finally:
        _current.reset(token)


def current_request() -> RequestRecord | None:
    return _current.get()


def note_model(name: str) -> None:
    """The current request is for model `name` (a resolved name: bounded label values)."""
    record = _current.get()
    if record is not None:
        record.model = name


def note_queued(waits_s: Sequence[float]) -> None:
    """The current request's images waited this long in the engine's queue."""
    record = _current.get()
    if record is not None:
        record.queue_waits_s = waits_s


def note_preprocessed(images: int, seconds: float) -> None:
    """The current request's images are decoded, resized and patchified."""
    record = _current.get()
    if record is not None:
        record.images = images
        record.preprocess_s = seconds


def note_decoded(path: str, reason: str, images: int = 1) -> None:
    """The current request had `images` decoded on `path` ("gpu" or "cpu") for `reason`."""
    record = _current.get()
    if record is not None:
        key = (path, reason)
        record.decodes[key] = record.decodes.get(key, 0) + images
