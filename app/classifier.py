"""The classification service: models, preprocessing pool and batcher behind one call; no HTTP.

`classify` takes uploaded bytes and returns labelled predictions: it preprocesses in a bounded
thread pool, queues the patch grids on the batcher and turns logits into top-k answers, all under
one deadline per request.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from app import metrics
from app.batching import Batcher, BatchKey, DeadlineExceededError, OverloadedError
from app.errors import (
    InvalidParameterError,
    RolloutUnavailableError,
    TooManyImagesError,
    UnsupportedMediaTypeError,
)
from app.imaging import (
    FORMATS_HINT,
    ImageDecodeError,
    PreparedImage,
    ResizePolicy,
    prepare,
    resize_plan,
)
from app.postprocess import Prediction, classify
from app.repository import ModelEntry, ModelVersion, Repository, scan_repository
from app.rollout import RolloutMap, RolloutParams, RolloutResult, heatmap_png, normalise
from app.runtime import (
    Backend,
    OnnxBackend,
    OnnxRolloutBackend,
    RolloutBackend,
    candidate_providers,
)
from app.settings import Settings
from app.spec import ROLLOUT_GRAPH_FILENAME, ModelSpec

log = logging.getLogger(__name__)

BackendFactory = Callable[[ModelVersion], Backend]
# None: the version has no rollout graph, and rollout requests for it get a 400.
RolloutBackendFactory = Callable[[ModelVersion], RolloutBackend | None]


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


def _declares_image(content_type: str | None) -> bool:
    # Clients often send images as octet-stream or with no type at all: try those too.
    if not content_type:
        return True
    mime = content_type.split(";")[0].strip().lower()
    return mime.startswith("image/") or mime == "application/octet-stream"


def onnx_backends(settings: Settings) -> BackendFactory:
    """The production factory: an ONNX Runtime session per model version, warmed up."""
    providers = candidate_providers(settings.providers)

    def load(version: ModelVersion) -> Backend:
        backend = OnnxBackend(
            version.graph_path,
            version.spec,
            providers,
            settings.intra_op_threads,
            settings.intra_op_spinning,
        )
        if settings.warmup:
            backend.warm_up()
        log.info("model %s version %d on %s", version.name, version.version, backend.provider)
        return backend

    return load


def onnx_rollout_backends(settings: Settings) -> RolloutBackendFactory:
    """A session per version's rollout graph, where it has one, created and warmed at start."""
    providers = candidate_providers(settings.providers)

    def load(version: ModelVersion) -> RolloutBackend | None:
        if version.rollout_path is None or version.spec.rollout is None:
            log.info("model %s version %d: no rollout graph", version.name, version.version)
            return None
        backend = OnnxRolloutBackend(
            version.rollout_path,
            version.spec,
            providers,
            settings.intra_op_threads,
            settings.intra_op_spinning,
        )
        if settings.warmup:
            backend.warm_up()
        log.info(
            "model %s version %d rollout graph on %s",
            version.name,
            version.version,
            backend.provider,
        )
        return backend

    return load


def _rollout_of(rollout: RolloutMap | None) -> RolloutMap:
    if rollout is None:  # the batcher answers every rollout key with a map
        raise RuntimeError("a rollout request was answered without a rollout map")
    return normalise(rollout)


class Classifier:
    def __init__(
        self,
        settings: Settings,
        repository: Repository,
        backends: dict[tuple[str, int], Backend],
        rollout_backends: dict[tuple[str, int], RolloutBackend] | None = None,
        more_instances: Sequence[dict[tuple[str, int], Backend]] = (),
    ) -> None:
        """`more_instances`: the sessions of runtime instances beyond the first (a lane each)."""
        self.settings = settings
        self.repository = repository
        self.backends = backends
        self.rollout_backends = rollout_backends or {}
        self.batcher = Batcher(
            backends,
            rollout_backends=self.rollout_backends,
            max_batch_size=settings.max_batch_size,
            max_batch_tokens=settings.max_batch_tokens,
            max_queue_images=settings.max_queue_images,
            max_queue_delay_ms=settings.max_queue_delay_ms,
            more_instances=more_instances,
        )
        self._pool = ThreadPoolExecutor(
            max_workers=settings.preprocess_threads, thread_name_prefix="vit-serve-preprocess"
        )
        self._preprocessing = 0  # images handed to the pool and not yet back
        self._ready = False

    @classmethod
    def load(
        cls,
        settings: Settings,
        backend_factory: BackendFactory | None = None,
        rollout_factory: RolloutBackendFactory | None = None,
    ) -> Classifier:
        """Scan the repository and load (and warm up) every version's graphs; blocking.

        Rollout graphs load here too, not on first use: the first rollout request then costs
        what the next one does, and a broken rollout graph stops the start instead of failing
        requests later. The price is a second session's memory per version.
        """
        repository = scan_repository(settings.model_repo, settings.default_model)
        factory = backend_factory or onnx_backends(settings)
        rollout = rollout_factory or onnx_rollout_backends(settings)
        backends = {(v.name, v.version): factory(v) for v in repository.all_versions()}
        more_instances = [
            {(v.name, v.version): factory(v) for v in repository.all_versions()}
            for _ in range(settings.runtime_instances - 1)
        ]
        rollout_backends: dict[tuple[str, int], RolloutBackend] = {}
        for v in repository.all_versions():
            made = rollout(v)
            if made is not None:
                rollout_backends[(v.name, v.version)] = made
        return cls(settings, repository, backends, rollout_backends, more_instances)

    @property
    def ready(self) -> bool:
        return self._ready

    def start(self) -> None:
        self.batcher.start()
        self._ready = True

    async def stop(self) -> None:
        self._ready = False
        await self.batcher.stop(self.settings.drain_timeout_s)
        self._pool.shutdown(wait=False, cancel_futures=True)

    def fit_max_tokens(self, spec: ModelSpec) -> int:
        return self.settings.fit_max_tokens or 2 * spec.architecture.native_tokens

    def provider(self, entry: ModelEntry) -> str:
        return self.backends[(entry.spec.name, entry.default_version)].provider

    def rollout_versions(self, entry: ModelEntry) -> list[int]:
        """The versions of a model that can answer rollout requests."""
        return sorted(v for v in entry.versions if (entry.spec.name, v) in self.rollout_backends)

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
    ) -> Classification:
        """`rollout`: run the rollout graph and add each image's map; `heatmap`: and draw it.

        `timeout_ms`: the client's own deadline; it can only lower the server's.
        """
        timeout_s = self.settings.request_timeout_s
        if timeout_ms is not None:
            timeout_s = min(timeout_s, timeout_ms / 1e3)
        # Deadlines run on the loop's clock; timings on perf_counter (uvloop's clock ticks in ms).
        deadline = asyncio.get_running_loop().time() + timeout_s
        started = time.perf_counter()
        target = self.repository.resolve(model, version)
        metrics.note_model(target.name)
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
        metrics.note_preprocessed(len(prepared), preprocessed - started)
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
                predictions=classify(output.logits, k, target.spec.labels),
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
        if (target.name, target.version) not in self.rollout_backends:
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
        loop = asyncio.get_running_loop()
        fit_max_tokens = self.fit_max_tokens(spec)
        jobs = [
            loop.run_in_executor(
                self._pool,
                functools.partial(
                    heatmap_png,
                    upload.data,
                    upload.name,
                    self.settings.image_max_pixels,
                    heat,
                    # The plan that preprocessing used: it maps the grid back onto the image.
                    resize_plan(*image.image_size, spec, resize, fit_max_tokens),
                ),
            )
            for upload, image, heat in zip(uploads, prepared, maps, strict=True)
        ]
        # Admitted work already ran inference, so it is not refused now; counting it lets new
        # requests see the pool's backlog.
        self._preprocessing += len(jobs)
        try:
            outcomes = await asyncio.wait_for(
                asyncio.gather(*jobs, return_exceptions=True), timeout=deadline - loop.time()
            )
        except TimeoutError:
            raise DeadlineExceededError(
                "the request timed out while its heatmaps were being drawn; ask for rollout=true "
                "(the grid without the picture) or send smaller images"
            ) from None
        finally:
            self._preprocessing -= len(jobs)
        pngs: list[str] = []
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                raise outcome
            pngs.append(outcome)
        return pngs

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
        loop = asyncio.get_running_loop()
        jobs = [
            loop.run_in_executor(self._pool, functools.partial(self._prepare, u, spec, resize))
            for u in uploads
        ]
        self._preprocessing += len(uploads)
        try:
            outcomes = await asyncio.wait_for(
                asyncio.gather(*jobs, return_exceptions=True), timeout=deadline - loop.time()
            )
        except TimeoutError:
            raise DeadlineExceededError(
                "the request timed out while its images were being decoded"
            ) from None
        finally:
            self._preprocessing -= len(uploads)
        prepared: list[PreparedImage] = []
        for outcome in outcomes:
            # The first bad image in request order decides the answer: deterministic messages.
            if isinstance(outcome, BaseException):
                raise outcome
            prepared.append(outcome)
        return prepared

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
