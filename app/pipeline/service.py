"""The classify service: the request path from uploaded bytes to labelled answers; no HTTP.

`ClassifyService.classify` resolves the model version in the model table, preprocesses in a
bounded thread pool, queues the patch grids on the batcher and turns logits into top-k answers,
all under one deadline per request. `ClassifyService.infer` does the same for the Open Inference
Protocol's front doors, which send encoded images or ready patch grids and want the raw tensors
back (logits, rollout maps). It also admits requests (`admission`): one place each, from before
the body is read until the answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
from numpy.typing import NDArray

from app.core import records
from app.core.errors import (
    BusyError,
    InvalidInputError,
    InvalidParameterError,
    RolloutUnavailableError,
    TooManyImagesError,
    UnsupportedMediaTypeError,
)
from app.core.priority import lower_this_thread
from app.core.settings import Settings
from app.models.repository import ModelVersion
from app.models.spec import ROLLOUT_GRAPH_FILENAME, ModelSpec, RolloutParams
from app.models.table import ModelTable
from app.pipeline.batches import BatchKey, DeadlineExceededError, OverloadedError
from app.pipeline.batching import Batcher
from app.pipeline.imaging import (
    FORMATS_HINT,
    ImageDecodeError,
    PreparedImage,
    ResizePolicy,
    prepare,
    resize_plan,
)
from app.pipeline.postprocess import Prediction, predictions
from app.pipeline.rollout import RolloutMap, RolloutResult, heatmap_png, normalise

log = logging.getLogger(__name__)

T = TypeVar("T")

BUSY_MESSAGE = "the server is overloaded (every request place is taken); retry shortly"


@dataclass(frozen=True)
class Upload:
    data: bytes
    name: str  # how messages name it: "'cat.jpg'" or "(request body)"
    content_type: str | None = None  # as the client declared it


@dataclass(frozen=True)
class ImageResult:
    predictions: list[Prediction]
    image_size: tuple[int, int]  # (width, height) after EXIF orientation
    grid: tuple[int, int]  # (grid_h, grid_w)
    resize: ResizePolicy
    rollout: RolloutResult | None = None  # when the request asked for it


@dataclass(frozen=True)
class Timing:
    preprocess_ms: float
    inference_ms: float  # queueing + running, until the last image's logits
    total_ms: float


@dataclass(frozen=True)
class Classification:
    model: str
    version: int
    results: list[ImageResult]
    timing: Timing


@dataclass(frozen=True)
class Inference:
    """A request's raw outputs (`ClassifyService.infer`), in the order of its images."""

    model: str
    version: int
    logits: NDArray[np.float32]  # (N, num_classes)
    grids: list[tuple[int, int]]  # (grid_h, grid_w) per image
    rollouts: list[RolloutMap] | None  # per image, scaled to a peak of 1; when asked for
    timing: Timing


def _declares_image(content_type: str | None) -> bool:
    # Clients often send images as octet-stream or with no type at all: try those too.
    if not content_type:
        return True
    mime = content_type.split(";")[0].strip().lower()
    return mime.startswith("image/") or mime == "application/octet-stream"


def _rollout_of(rollout: RolloutMap | None) -> RolloutMap:
    if rollout is None:  # the batcher answers every rollout key with a map
        raise RuntimeError("a rollout request was answered without a rollout map")
    return normalise(rollout)


class ClassifyService:
    def __init__(self, settings: Settings, models: ModelTable) -> None:
        self.settings = settings
        self.models = models
        self.batcher = Batcher(
            models.lanes(),
            rollout_backends=models.rollout_backends(),
            max_batch_size=settings.max_batch_size,
            max_batch_tokens=settings.batch_tokens(gpu=models.on_gpu),
            max_queue_images=settings.max_queue_images,
            max_queue_delay_ms=settings.max_queue_delay_ms,
            thread_initializer=functools.partial(lower_this_thread, settings.worker_nice),
        )
        models.bind(self.batcher)
        self._pool = ThreadPoolExecutor(
            max_workers=settings.preprocess_threads,
            thread_name_prefix="vit-serve-preprocess",
            initializer=lower_this_thread,
            initargs=(settings.worker_nice,),
        )
        self._preprocessing = 0  # images handed to the pool and not yet back
        self._admitted = 0  # requests between admission and answer
        self._ready = False

    @property
    def ready(self) -> bool:
        return self._ready

    @property
    def serving(self) -> bool:
        """At least one model version can answer."""
        return self.models.serving

    def start(self) -> None:
        self.batcher.start()
        self.models.start()
        self._ready = True

    async def stop(self) -> None:
        self._ready = False
        await self.models.stop()
        await self.batcher.stop(self.settings.drain_timeout_s)
        self._pool.shutdown(wait=False, cancel_futures=True)

    @property
    def busy(self) -> bool:
        """Every request place is taken: a new request would be refused (see `admission`)."""
        return self._admitted >= self.settings.request_places()

    @contextlib.contextmanager
    def admission(self) -> Iterator[None]:
        """Hold a request place from before the body is read until the answer; refused at once
        (BusyError) when none is free.

        There are as many places as images can wait in the queue plus run in batches: each
        request has at least one image, so more requests than that could not all be served. A
        refusal here costs no body read, decode or queueing: under overload the event loop
        spends its CPU on refusing quickly, not on reading bodies it would refuse later.
        """
        if self.busy:
            raise BusyError(BUSY_MESSAGE)
        self._admitted += 1
        try:
            yield
        finally:
            self._admitted -= 1

    def fit_max_tokens(self, spec: ModelSpec) -> int:
        return self.settings.fit_max_tokens or 2 * spec.architecture.native_tokens

    async def classify(
        self,
        uploads: Sequence[Upload],
        *,
        model: str | None = None,
        version: int | None = None,
        top_k: int | None = None,
        resize: ResizePolicy = "crop",
        rollout: RolloutParams | None = None,
        heatmap: bool = False,
        timeout_ms: float | None = None,
        arrived: float | None = None,
    ) -> Classification:
        """`rollout`: run the rollout graph and add each image's map; `heatmap`: and draw it.

        `timeout_ms`: the client's own deadline; it can only lower the server's. `arrived`: when
        the request came in, on the event loop's clock (default: now); the deadline counts from
        it, so the time its body took to arrive is part of it.
        """
        deadline = self._deadline(timeout_ms, arrived)
        started = time.perf_counter()
        target = self.models.repository.resolve(model, version)
        records.note_model(target.name)
        # Held until the answer is made: a reload releases a version's sessions only after.
        with self.models.holding(target.key):
            return await self._classify(
                target, uploads, top_k, resize, rollout, heatmap, deadline, started
            )

    def _deadline(self, timeout_ms: float | None, arrived: float | None) -> float:
        timeout_s = self.settings.request_timeout_s
        if timeout_ms is not None:
            timeout_s = min(timeout_s, timeout_ms / 1e3)
        # Deadlines run on the loop's clock; timings on perf_counter (uvloop's clock ticks in ms).
        loop = asyncio.get_running_loop()
        return (loop.time() if arrived is None else arrived) + timeout_s

    async def infer(
        self,
        images: Sequence[Upload] | NDArray[np.uint8],
        *,
        model: str | None = None,
        version: int | None = None,
        resize: ResizePolicy = "crop",
        rollout: RolloutParams | None = None,
        timeout_ms: float | None = None,
        arrived: float | None = None,
    ) -> Inference:
        """Encoded images (preprocessed as `classify` does them, with `resize`), or patch grids
        already made, uint8 (N, grid_h, grid_w, P*P*C) as the graph takes them, through the same
        queue, batcher and deadline as `classify`; the raw logits (and rollout maps) back.

        The caller holds a place from `admission`, as for `classify`.
        """
        deadline = self._deadline(timeout_ms, arrived)
        started = time.perf_counter()
        target = self.models.repository.resolve(model, version)
        records.note_model(target.name)
        with self.models.holding(target.key):
            if rollout is not None:
                self._check_rollout(target, rollout)
            if isinstance(images, np.ndarray):
                grids = self._check_patches(images, target)
                patches: Sequence[NDArray[np.uint8]] = list(images)
                record = records.current_request()
                if record is not None:
                    record.images = len(patches)
            else:
                self._check_count(len(images))
                if not images:
                    raise InvalidInputError("the request holds no image")
                prepared = await self._prepare_all(images, target.spec, resize, deadline)
                records.note_preprocessed(len(prepared), time.perf_counter() - started)
                grids = [p.grid for p in prepared]
                patches = [p.patches for p in prepared]
            preprocessed = time.perf_counter()
            outputs = await self.batcher.infer(
                [
                    (BatchKey(target.name, target.version, grid, rollout), p)
                    for grid, p in zip(grids, patches, strict=True)
                ],
                deadline,
            )
            inferred = time.perf_counter()
            return Inference(
                model=target.name,
                version=target.version,
                logits=np.stack([output.logits for output in outputs]).astype(np.float32),
                grids=grids,
                rollouts=(
                    None if rollout is None else [_rollout_of(output.rollout) for output in outputs]
                ),
                timing=Timing(
                    preprocess_ms=round((preprocessed - started) * 1e3, 3),
                    inference_ms=round((inferred - preprocessed) * 1e3, 3),
                    total_ms=round((inferred - started) * 1e3, 3),
                ),
            )

    def _check_count(self, images: int) -> None:
        if images > self.settings.images_per_request_max:
            raise TooManyImagesError(
                f"{images} images in one request; the limit is "
                f"{self.settings.images_per_request_max}: split them over several requests"
            )

    def _check_patches(
        self, patches: NDArray[np.uint8], target: ModelVersion
    ) -> list[tuple[int, int]]:
        """The grid of each image of a patches tensor, or why the model cannot take it."""
        arch = target.spec.architecture
        expected = f"[N, grid_h, grid_w, {arch.patch_dim}]"
        shape = list(patches.shape)
        if patches.dtype != np.uint8 or patches.ndim != 4:
            raise InvalidInputError(
                f"patches must be uint8 {expected} for model '{target.name}', got shape {shape}"
            )
        count, grid_h, grid_w, dim = patches.shape
        if dim != arch.patch_dim:
            raise InvalidInputError(
                f"patches of shape {shape}: model '{target.name}' takes {expected}, each patch "
                f"{arch.patch_size}x{arch.patch_size} pixels of {arch.channels} channels "
                f"({arch.patch_dim} values)"
            )
        if count == 0 or grid_h == 0 or grid_w == 0:
            raise InvalidInputError(f"patches of shape {shape} hold no image")
        self._check_count(count)
        limit = self.fit_max_tokens(target.spec)
        if grid_h * grid_w > limit:
            raise InvalidInputError(
                f"a grid of {grid_h}x{grid_w} patches is over model '{target.name}''s limit of "
                f"{limit} patches per image (native {arch.grid[0]}x{arch.grid[1]})"
            )
        return [(grid_h, grid_w)] * count

    async def _classify(
        self,
        target: ModelVersion,
        uploads: Sequence[Upload],
        top_k: int | None,
        resize: ResizePolicy,
        rollout: RolloutParams | None,
        heatmap: bool,
        deadline: float,
        started: float,
    ) -> Classification:
        k = self._top_k(top_k, target.spec)
        if rollout is not None:
            self._check_rollout(target, rollout)
        if len(uploads) > self.settings.images_per_request_max:
            raise TooManyImagesError(
                f"{len(uploads)} images in one request; the limit is "
                f"{self.settings.images_per_request_max}: split them over several requests"
            )
        prepared = await self._prepare_all(uploads, target.spec, resize, deadline)
        preprocessed = time.perf_counter()
        records.note_preprocessed(len(prepared), preprocessed - started)
        outputs = await self.batcher.infer(
            [(BatchKey(target.name, target.version, p.grid, rollout), p.patches) for p in prepared],
            deadline,
        )
        inferred = time.perf_counter()
        rollouts: Sequence[RolloutResult | None] = [None] * len(prepared)
        if rollout is not None:
            maps = [_rollout_of(output.rollout) for output in outputs]
            pngs: Sequence[str | None] = [None] * len(prepared)
            if heatmap:
                pngs = await self._draw_heatmaps(
                    uploads, prepared, maps, target.spec, resize, deadline
                )
            rollouts = [
                RolloutResult(heat.tolist(), rollout.head_fusion, rollout.discard_ratio, png)
                for heat, png in zip(maps, pngs, strict=True)
            ]
        results = [
            ImageResult(
                predictions=predictions(output.logits, k, target.spec.labels),
                image_size=p.image_size,
                grid=p.grid,
                resize=resize,
                rollout=rollout_result,
            )
            for p, output, rollout_result in zip(prepared, outputs, rollouts, strict=True)
        ]
        done = time.perf_counter()
        return Classification(
            model=target.name,
            version=target.version,
            results=results,
            timing=Timing(
                preprocess_ms=round((preprocessed - started) * 1e3, 3),
                inference_ms=round((inferred - preprocessed) * 1e3, 3),
                total_ms=round((done - started) * 1e3, 3),
            ),
        )

    def _check_rollout(self, target: ModelVersion, params: RolloutParams) -> None:
        if not self.models.has_rollout(target.key):
            raise RolloutUnavailableError(
                f"model '{target.name}' version {target.version} has no rollout graph "
                f"({ROLLOUT_GRAPH_FILENAME}), so it cannot give rollout maps: re-export it with "
                "`python -m export` (which writes both graphs), or ask without rollout"
            )
        contract = target.spec.rollout
        if contract is not None and params.head_fusion not in contract.head_fusions:
            raise InvalidParameterError(
                f"head_fusion '{params.head_fusion}' is not in the rollout graph of model "
                f"'{target.name}'; it takes: {', '.join(contract.head_fusions)}"
            )

    async def _draw_heatmaps(
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

    def _top_k(self, top_k: int | None, spec: ModelSpec) -> int:
        k = self.settings.top_k_default if top_k is None else top_k
        if not 1 <= k <= self.settings.top_k_max:
            raise InvalidParameterError(
                f"top_k must be between 1 and {self.settings.top_k_max}, got {k}"
            )
        return min(k, spec.architecture.num_classes)  # asking for more than exist is no error

    async def _prepare_all(
        self, uploads: Sequence[Upload], spec: ModelSpec, resize: ResizePolicy, deadline: float
    ) -> list[PreparedImage]:
        # The pool's own queue is unbounded, so bound what waits for it here.
        if self._preprocessing + len(uploads) > self.settings.max_queue_images:
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
        jobs = [loop.run_in_executor(self._pool, call) for call in calls]
        self._preprocessing += len(jobs)
        try:
            outcomes = await asyncio.wait_for(
                asyncio.gather(*jobs, return_exceptions=True), timeout=deadline - loop.time()
            )
        except TimeoutError:
            raise DeadlineExceededError(late) from None
        finally:
            self._preprocessing -= len(jobs)
        results: list[T] = []
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                raise outcome
            results.append(outcome)
        return results

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
            if _declares_image(upload.content_type):
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
