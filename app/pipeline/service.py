"""The classify service: a front door's request path from uploaded bytes to labelled answers.

`ClassifyService.classify` takes the model version the request's permit holds, preprocesses in
a bounded thread pool (app/pipeline/workers.py), hands the patch grids to the engine and turns
their probabilities into top-k answers, all under one deadline per request.
`ClassifyService.infer` does the same for the Open Inference Protocol's front doors, which send
encoded images or ready patch grids and want the raw tensors back (logits, rollout maps). It
knows no HTTP, and of the engine only its client protocol (app/engine).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from numpy.typing import NDArray

from app.core import records
from app.core.errors import (
    InvalidInputError,
    InvalidParameterError,
    TooManyImagesError,
)
from app.core.settings import Settings
from app.engine import (
    EngineClient,
    EngineResult,
    Job,
    Output,
    Permit,
    Refused,
    RolloutMap,
    ServedVersion,
    check_rollout,
)
from app.models.spec import ModelSpec, RolloutParams
from app.pipeline.postprocess import Prediction
from app.pipeline.postprocess import top_k as top_k_of
from app.pipeline.preprocess import PreparedImage, ResizePolicy
from app.pipeline.rollout import RolloutResult, normalise
from app.pipeline.routing import DecodeRouter, Route
from app.pipeline.workers import Preprocessor, Upload
from app.runtime.devicedecode import EncodedImage

log = logging.getLogger(__name__)


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
    spec: ModelSpec  # what the outputs were made with (its labels among it)
    logits: NDArray[np.float32]  # (N, num_classes)
    probs: NDArray[np.float64]  # (N, num_classes): softmax(logits), from the inference thread
    grids: list[tuple[int, int]]  # (grid_h, grid_w) per image
    rollouts: list[RolloutMap] | None  # per image, scaled to a peak of 1; when asked for
    timing: Timing


@dataclass
class _Images:
    """A request's images on their way: each one's route, and the CPU path's results so far
    (by index); the device path's images are decoded in the engine."""

    uploads: Sequence[Upload]
    routes: list[Route]
    prepared: dict[int, PreparedImage] = field(default_factory=dict)
    paths: list[tuple[str, str]] = field(default_factory=list)  # (path, reason), counted

    def size_and_grid(self, i: int) -> tuple[tuple[int, int], tuple[int, int]]:
        if i in self.prepared:
            return self.prepared[i].image_size, self.prepared[i].grid
        encoded = self.routes[i].encoded
        assert encoded is not None  # an image is prepared here or encoded for the device
        return encoded.image_size, encoded.grid

    @property
    def grids(self) -> list[tuple[int, int]]:
        return [self.size_and_grid(i)[1] for i in range(len(self.routes))]

    def in_order(self) -> list[PreparedImage]:
        """Every image's CPU result (a rollout request's images all take the CPU path)."""
        return [self.prepared[i] for i in range(len(self.routes))]


class ClassifyService:
    def __init__(self, settings: Settings, engine: EngineClient) -> None:
        self.settings = settings
        self.engine = engine
        self.preprocessor = Preprocessor(settings)
        self.router = DecodeRouter(settings)

    def stop(self) -> None:
        self.preprocessor.shutdown()

    def _deadline(self, timeout_ms: float | None, arrived: float | None) -> float:
        """The request's deadline on time.monotonic(), counted from `arrived` (the same clock;
        default: now), so the time its body took to arrive is part of it."""
        timeout_s = self.settings.request_timeout_s
        if timeout_ms is not None:
            timeout_s = min(timeout_s, timeout_ms / 1e3)
        return (time.monotonic() if arrived is None else arrived) + timeout_s

    async def classify(
        self,
        permit: Permit,
        uploads: Sequence[Upload],
        *,
        top_k: int | None = None,
        resize: ResizePolicy = "crop",
        rollout: RolloutParams | None = None,
        heatmap: bool = False,
        timeout_ms: float | None = None,
        arrived: float | None = None,
    ) -> Classification:
        """`rollout`: run the rollout graph and add each image's map; `heatmap`: and draw it.

        `timeout_ms`: the client's own deadline; it can only lower the server's. `arrived`: when
        the request came in, on time.monotonic().
        """
        deadline = self._deadline(timeout_ms, arrived)
        started = time.perf_counter()
        # Held under the permit until the answer is made: a reload releases it only after.
        target = permit.served
        records.note_model(target.name)
        if rollout is not None:
            check_rollout(target, rollout)
        k = self._top_k(top_k, target.spec)
        self._check_count(len(uploads))
        images = await self._prepare(permit, uploads, resize, rollout, deadline)
        preprocessed = time.perf_counter()
        records.note_preprocessed(len(uploads), preprocessed - started)
        result, outputs = await self._infer(permit, images, resize, rollout, deadline)
        inferred = time.perf_counter()
        rollouts: Sequence[RolloutResult | None] = [None] * len(uploads)
        if rollout is not None:
            maps = _rollouts_of(result)
            pngs: Sequence[str | None] = [None] * len(uploads)
            if heatmap:
                pngs = await self.preprocessor.draw_heatmaps(
                    uploads, images.in_order(), maps, result.spec, resize, _loop_deadline(deadline)
                )
            rollouts = [
                RolloutResult(heat.tolist(), rollout.head_fusion, rollout.discard_ratio, png)
                for heat, png in zip(maps, pngs, strict=True)
            ]
        shapes = [images.size_and_grid(i) for i in range(len(uploads))]
        results = [
            ImageResult(
                predictions=top_k_of(output.probs, k, result.spec.labels),
                image_size=size,
                grid=grid,
                resize=resize,
                rollout=rollout_result,
            )
            for (size, grid), output, rollout_result in zip(shapes, outputs, rollouts, strict=True)
        ]
        done = time.perf_counter()
        return Classification(
            model=result.name,
            version=result.version,
            results=results,
            timing=Timing(
                preprocess_ms=round((preprocessed - started) * 1e3, 3),
                inference_ms=round((inferred - preprocessed) * 1e3, 3),
                total_ms=round((done - started) * 1e3, 3),
            ),
        )

    async def infer(
        self,
        permit: Permit,
        images: Sequence[Upload] | NDArray[np.uint8],
        *,
        resize: ResizePolicy = "crop",
        rollout: RolloutParams | None = None,
        one_grid: bool = False,
        timeout_ms: float | None = None,
        arrived: float | None = None,
    ) -> Inference:
        """Encoded images (preprocessed as `classify` does them, with `resize`), or patch grids
        already made, uint8 (N, grid_h, grid_w, P*P*C) as the graph takes them, through the same
        queue, batcher and deadline as `classify`; the raw logits (and rollout maps) back.

        `one_grid`: the answer must stack every image's rollout map into one tensor, so images
        of different grids are refused, before inference (InvalidInputError).
        """
        deadline = self._deadline(timeout_ms, arrived)
        started = time.perf_counter()
        target = permit.served
        records.note_model(target.name)
        if rollout is not None:
            check_rollout(target, rollout)
        prepared: _Images | None = None
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
            prepared = await self._prepare(permit, images, resize, rollout, deadline)
            records.note_preprocessed(len(images), time.perf_counter() - started)
            grids = prepared.grids
        if one_grid and len(set(grids)) > 1:
            raise InvalidInputError(
                "the images of this request have different grids ("
                + ", ".join(f"{h}x{w}" for h, w in grids)
                + "), so their rollout maps make no single tensor: send them in separate "
                "requests, or with resize=crop"
            )
        preprocessed = time.perf_counter()
        if prepared is None:
            result = await self.engine.infer(permit, Job(patches, rollout, deadline))
            outputs = list(result.outputs)
            records.note_queued([output.queued_s for output in outputs])
        else:
            result, outputs = await self._infer(permit, prepared, resize, rollout, deadline)
        inferred = time.perf_counter()
        return Inference(
            model=result.name,
            version=result.version,
            spec=result.spec,
            logits=np.stack([output.logits for output in outputs]).astype(np.float32),
            probs=np.stack([output.probs for output in outputs]),
            grids=grids,
            rollouts=None if rollout is None else _rollouts_of(result),
            timing=Timing(
                preprocess_ms=round((preprocessed - started) * 1e3, 3),
                inference_ms=round((inferred - preprocessed) * 1e3, 3),
                total_ms=round((inferred - started) * 1e3, 3),
            ),
        )

    async def _prepare(
        self,
        permit: Permit,
        uploads: Sequence[Upload],
        resize: ResizePolicy,
        rollout: RolloutParams | None,
        deadline: float,
    ) -> _Images:
        """Route each image (app/pipeline/routing.py) and decode the CPU path's here; the
        device path's travel to the engine as their bytes."""
        target = permit.served
        routes = [self.router.route(u, target, resize, rollout is not None) for u in uploads]
        images = _Images(uploads, routes, paths=[(r.path, r.reason) for r in routes])
        try:
            cpu = [i for i, route in enumerate(routes) if route.path == "cpu"]
            if cpu:
                done = await self.preprocessor.prepare_all(
                    [uploads[i] for i in cpu], target.spec, resize, _loop_deadline(deadline)
                )
                images.prepared.update(zip(cpu, done, strict=True))
        except BaseException:
            _count(images)
            raise
        return images

    async def _infer(
        self,
        permit: Permit,
        images: _Images,
        resize: ResizePolicy,
        rollout: RolloutParams | None,
        deadline: float,
    ) -> tuple[EngineResult, list[Output]]:
        """The engine's outputs in the images' order. What the device decoder refused is
        decoded here and sent again, under the same permit and deadline: a broken JPEG then
        gets the CPU path's 400, a JPEG the device does not take its answer."""
        try:
            cpu = sorted(images.prepared)
            gpu = [i for i in range(len(images.routes)) if i not in images.prepared]
            encoded: list[EncodedImage] = []
            for i in gpu:
                image = images.routes[i].encoded
                assert image is not None
                encoded.append(image)
            job = Job([images.prepared[i].patches for i in cpu], rollout, deadline, encoded)
            result = await self.engine.infer(permit, job)
            outputs: dict[int, Output] = dict(zip(cpu, result.outputs, strict=True))
            refused = []
            for i, outcome in zip(gpu, result.decoded, strict=True):
                if isinstance(outcome, Refused):
                    log.debug(
                        "%s: the device decoder refused it: %s",
                        images.uploads[i].name,
                        outcome.reason,
                    )
                    refused.append(i)
                    images.paths[i] = ("cpu", "refused")
                else:
                    outputs[i] = outcome
            if refused:
                done = await self.preprocessor.prepare_all(
                    [images.uploads[i] for i in refused],
                    permit.served.spec,
                    resize,
                    _loop_deadline(deadline),
                )
                images.prepared.update(zip(refused, done, strict=True))
                again = await self.engine.infer(
                    permit, Job([p.patches for p in done], rollout, deadline)
                )
                outputs.update(zip(refused, again.outputs, strict=True))
        finally:
            _count(images)
        ordered = [outputs[i] for i in range(len(images.routes))]
        records.note_queued([output.queued_s for output in ordered])
        return result, ordered

    def _check_count(self, images: int) -> None:
        if images > self.settings.images_per_request_max:
            raise TooManyImagesError(
                f"{images} images in one request; the limit is "
                f"{self.settings.images_per_request_max}: split them over several requests"
            )

    def _check_patches(
        self, patches: NDArray[np.uint8], target: ServedVersion
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
        limit = target.max_tokens
        if grid_h * grid_w > limit:
            raise InvalidInputError(
                f"a grid of {grid_h}x{grid_w} patches is over model '{target.name}''s limit of "
                f"{limit} patches per image (native {arch.grid[0]}x{arch.grid[1]})"
            )
        return [(grid_h, grid_w)] * count

    def _top_k(self, top_k: int | None, spec: ModelSpec) -> int:
        k = self.settings.top_k_default if top_k is None else top_k
        if not 1 <= k <= self.settings.top_k_max:
            raise InvalidParameterError(
                f"top_k must be between 1 and {self.settings.top_k_max}, got {k}"
            )
        return min(k, spec.architecture.num_classes)  # asking for more than exist is no error


def _count(images: _Images) -> None:
    """Each image once, under the path that decoded it (or was to) and why."""
    for path, reason in images.paths:
        records.note_decoded(path, reason)


def _loop_deadline(deadline: float) -> float:
    """A time.monotonic() deadline on the running event loop's clock (the preprocessing pool's
    waits run on it; uvloop's clock is not time.monotonic())."""
    return asyncio.get_running_loop().time() + (deadline - time.monotonic())


def _rollouts_of(result: EngineResult) -> list[RolloutMap]:
    maps = []
    for output in result.outputs:
        if output.rollout is None:  # the engine answers every rollout job with maps
            raise RuntimeError("a rollout request was answered without a rollout map")
        maps.append(normalise(output.rollout))
    return maps
