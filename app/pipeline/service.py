"""The classify service: the request path from uploaded bytes to labelled answers; no HTTP.

`ClassifyService.classify` resolves the model version in the model table, preprocesses in a
bounded thread pool (app/pipeline/preprocessing.py), queues the patch grids on the batcher and
turns logits into top-k answers, all under one deadline per request. `ClassifyService.infer`
does the same for the Open Inference Protocol's front doors, which send encoded images or ready
patch grids and want the raw tensors back (logits, rollout maps). It also admits requests
(`admission`): one place each, from before the body is read until the answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from app.core import records
from app.core.errors import (
    BusyError,
    InvalidInputError,
    InvalidParameterError,
    RolloutUnavailableError,
    TooManyImagesError,
)
from app.core.settings import Settings
from app.models.repository import ModelVersion
from app.models.spec import ROLLOUT_GRAPH_FILENAME, ModelSpec, RolloutParams
from app.models.table import ModelTable
from app.pipeline.batches import BatchKey
from app.pipeline.batching import Batcher
from app.pipeline.imaging import (
    ResizePolicy,
)
from app.pipeline.postprocess import Prediction
from app.pipeline.postprocess import top_k as top_k_of
from app.pipeline.preprocessing import Preprocessor, Upload
from app.pipeline.rollout import RolloutMap, RolloutResult, normalise

log = logging.getLogger(__name__)

BUSY_MESSAGE = "the server is overloaded (every request place is taken); retry shortly"


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
    probs: NDArray[np.float64]  # (N, num_classes): softmax(logits), from the inference thread
    grids: list[tuple[int, int]]  # (grid_h, grid_w) per image
    rollouts: list[RolloutMap] | None  # per image, scaled to a peak of 1; when asked for
    timing: Timing


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
            worker_nice=settings.worker_nice,
        )
        models.bind(self.batcher)
        self.preprocessor = Preprocessor(settings)
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
        self.preprocessor.shutdown()

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
        return self.preprocessor.fit_max_tokens(spec)

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
                prepared = await self.preprocessor.prepare_all(
                    images, target.spec, resize, deadline
                )
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
                probs=np.stack([output.probs for output in outputs]),
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
        self._check_count(len(uploads))
        prepared = await self.preprocessor.prepare_all(uploads, target.spec, resize, deadline)
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
                pngs = await self.preprocessor.draw_heatmaps(
                    uploads, prepared, maps, target.spec, resize, deadline
                )
            rollouts = [
                RolloutResult(heat.tolist(), rollout.head_fusion, rollout.discard_ratio, png)
                for heat, png in zip(maps, pngs, strict=True)
            ]
        results = [
            ImageResult(
                predictions=top_k_of(output.probs, k, target.spec.labels),
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

    def _top_k(self, top_k: int | None, spec: ModelSpec) -> int:
        k = self.settings.top_k_default if top_k is None else top_k
        if not 1 <= k <= self.settings.top_k_max:
            raise InvalidParameterError(
                f"top_k must be between 1 and {self.settings.top_k_max}, got {k}"
            )
        return min(k, spec.architecture.num_classes)  # asking for more than exist is no error
