"""Uploads to patch grids in a bounded thread pool, under each request's deadline.

Decoding, resizing and patchifying run off the event loop in `preprocess_threads` threads at a
lower priority (`worker_nice`); what waits for them is bounded by `max_queue_images`. Rollout
heatmaps are drawn in the same pool, after inference.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

from app.core.errors import UnsupportedMediaTypeError
from app.core.priority import start_worker
from app.core.settings import Settings
from app.core.threads import PREPROCESS
from app.engine import DeadlineExceededError, OverloadedError, RolloutMap, first_error_or_all
from app.models.spec import ModelSpec
from app.pipeline.preprocess import (
    FORMATS_HINT,
    ImageDecodeError,
    PreparedImage,
    ResizePolicy,
    prepare,
    resize_plan,
)
from app.pipeline.rollout import heatmap_png

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(frozen=True)
class Upload:
    data: bytes
    name: str  # how messages name it: "'cat.jpg'" or "(request body)"
    content_type: str | None = None  # as the client declared it


def declares_image(content_type: str | None) -> bool:
    # Clients often send images as octet-stream or with no type at all: try those too.
    if not content_type:
        return True
    mime = content_type.split(";")[0].strip().lower()
    return mime.startswith("image/") or mime == "application/octet-stream"


class Preprocessor:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._pool = ThreadPoolExecutor(
            max_workers=settings.preprocess_threads,
            thread_name_prefix=PREPROCESS,
            initializer=start_worker,
            initargs=(PREPROCESS, settings.worker_nice),
        )
        self._backlog = 0  # images handed to the pool and not yet back

    def fit_max_tokens(self, spec: ModelSpec) -> int:
        return self.settings.fit_max_tokens or 2 * spec.architecture.native_tokens

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    async def draw_heatmaps(
        self,
        uploads: Sequence[Upload],
        prepared: Sequence[PreparedImage],
        maps: Sequence[RolloutMap],
        spec: ModelSpec,
        resize: ResizePolicy,
        deadline: float,
    ) -> list[str]:
        """Each map over its image, as a base64 PNG, drawn in the preprocessing pool.

        The image is decoded again rather than kept from preprocessing: a decoded photo held
        through the queue would cost up to `image_max_pixels` * 3 bytes per waiting image, and
        preprocessing may have decoded a JPEG at reduced scale.
        """
        fit_max_tokens = self.fit_max_tokens(spec)
        calls = [
            functools.partial(
                heatmap_png,
                upload.data,
                upload.name,
                self.settings.image_max_pixels,
                heat,
                # The plan that preprocessing used: it maps the grid back onto the image.
                resize_plan(*image.image_size, spec, resize, fit_max_tokens),
            )
            for upload, image, heat in zip(uploads, prepared, maps, strict=True)
        ]
        # Admitted work already ran inference, so it is not refused now; counting it lets new
        # requests see the pool's backlog.
        return await self._in_pool(
            calls,
            deadline,
            "the request timed out while its heatmaps were being drawn; ask for rollout=true "
            "(the grid without the picture) or send smaller images",
        )

    async def prepare_all(
        self, uploads: Sequence[Upload], spec: ModelSpec, resize: ResizePolicy, deadline: float
    ) -> list[PreparedImage]:
        # The pool's own queue is unbounded, so bound what waits for it here.
        if self._backlog + len(uploads) > self.settings.max_queue_images:
            raise OverloadedError(
                f"the server is overloaded (decode queue full at {self.settings.max_queue_images} "
                "images); retry shortly"
            )
        calls = [functools.partial(self._prepare, u, spec, resize) for u in uploads]
        return await self._in_pool(
            calls, deadline, "the request timed out while its images were being decoded"
        )

    async def _in_pool(
        self, calls: Sequence[Callable[[], T]], deadline: float, late: str
    ) -> list[T]:
        """Each call in the preprocessing pool, counted in its backlog while it waits or runs;
        DeadlineExceededError(`late`) at the deadline. The first failure in the calls' order is
        raised, so a request's answer does not depend on which thread finished first."""
        loop = asyncio.get_running_loop()
        # Not run_in_executor: it first asks whether each partial wraps a coroutine function
        # (inspect unwraps it), which costs more than the hand-off itself.
        jobs = [asyncio.wrap_future(self._pool.submit(call), loop=loop) for call in calls]
        self._backlog += len(jobs)
        # A timeout on the awaiting task rather than wait_for (a task of its own, a waiter, a
        # timer), and one image awaited as it is, without gather's future: either way the jobs
        # are cancelled at the deadline, and this runs once per request on the event loop.
        timeout = asyncio.timeout_at(deadline)
        try:
            async with timeout:
                if len(jobs) == 1:
                    return [await jobs[0]]
                outcomes = await asyncio.gather(*jobs, return_exceptions=True)
        except TimeoutError:
            if not timeout.expired():
                raise  # a call's own, not the deadline
            raise DeadlineExceededError(late) from None
        finally:
            self._backlog -= len(jobs)
        return first_error_or_all(outcomes)

    def _prepare(self, upload: Upload, spec: ModelSpec, resize: ResizePolicy) -> PreparedImage:
        """Runs in the preprocessing pool."""
        started = time.perf_counter()
        try:
            prepared = prepare(
                upload.data,
                spec,
                resize,
                name=upload.name,
                max_pixels=self.settings.image_max_pixels,
                fit_max_tokens=self.fit_max_tokens(spec),
                jpeg_draft=self.settings.jpeg_draft,
            )
        except ImageDecodeError as exc:
            if declares_image(upload.content_type):
                raise
            raise UnsupportedMediaTypeError(
                f"part {upload.name} is declared as '{upload.content_type}' and is not an "
                f"image; {FORMATS_HINT}"
            ) from exc
        if log.isEnabledFor(logging.DEBUG):
            stages = prepared.stages_ms
            log.debug(
                "prepared %s in %.2f ms (decode %.2f, resize %.2f, patchify %.2f)",
                upload.name,
                (time.perf_counter() - started) * 1e3,
                stages.decode_ms,
                stages.resize_ms,
                stages.patchify_ms,
            )
        return prepared
