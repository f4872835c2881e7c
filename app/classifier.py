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

from app.batching import Batcher, BatchKey, DeadlineExceededError, OverloadedError
from app.errors import InvalidParameterError, TooManyImagesError, UnsupportedMediaTypeError
from app.imaging import (
    FORMATS_HINT,
    ImageDecodeError,
    PreparedImage,
    ResizePolicy,
    prepare,
)
from app.postprocess import Prediction, classify
from app.repository import ModelEntry, ModelVersion, Repository, scan_repository
from app.runtime import Backend, OnnxBackend, candidate_providers
from app.settings import Settings
from app.spec import ModelSpec

log = logging.getLogger(__name__)

BackendFactory = Callable[[ModelVersion], Backend]


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
            version.graph_path, version.spec, providers, settings.intra_op_threads
        )
        if settings.warmup:
            backend.warm_up()
        log.info("model %s version %d on %s", version.name, version.version, backend.provider)
        return backend

    return load


class Classifier:
    def __init__(
        self, settings: Settings, repository: Repository, backends: dict[tuple[str, int], Backend]
    ) -> None:
        self.settings = settings
        self.repository = repository
        self.backends = backends
        self.batcher = Batcher(
            backends,
            max_batch_size=settings.max_batch_size,
            max_batch_tokens=settings.max_batch_tokens,
            max_queue_images=settings.max_queue_images,
        )
        self._pool = ThreadPoolExecutor(
            max_workers=settings.preprocess_threads, thread_name_prefix="vit-serve-preprocess"
        )
        self._preprocessing = 0  # images handed to the pool and not yet back
        self._ready = False

    @classmethod
    def load(cls, settings: Settings, backend_factory: BackendFactory | None = None) -> Classifier:
        """Scan the repository and load (and warm up) every version; blocking."""
        repository = scan_repository(settings.model_repo, settings.default_model)
        factory = backend_factory or onnx_backends(settings)
        backends = {(v.name, v.version): factory(v) for v in repository.all_versions()}
        return cls(settings, repository, backends)

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

    async def classify(
        self,
        uploads: Sequence[Upload],
        *,
        model: str | None = None,
        version: int | None = None,
        top_k: int | None = None,
        resize: ResizePolicy = "crop",
    ) -> Classification:
        # Deadlines run on the loop's clock; timings on perf_counter (uvloop's clock ticks in ms).
        deadline = asyncio.get_running_loop().time() + self.settings.request_timeout_s
        started = time.perf_counter()
        target = self.repository.resolve(model, version)
        k = self._top_k(top_k, target.spec)
        if len(uploads) > self.settings.images_per_request_max:
            raise TooManyImagesError(
                f"{len(uploads)} images in one request; the limit is "
                f"{self.settings.images_per_request_max}: split them over several requests"
            )
        prepared = await self._prepare_all(uploads, target.spec, resize, deadline)
        preprocessed = time.perf_counter()
        logits = await self.batcher.infer(
            [(BatchKey(target.name, target.version, p.grid), p.patches) for p in prepared],
            deadline,
        )
        inferred = time.perf_counter()
        results = [
            ImageResult(
                predictions=classify(row, k, target.spec.labels),
                image_size=p.image_size,
                grid=p.grid,
                resize=resize,
            )
            for p, row in zip(prepared, logits, strict=True)
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
        log.debug("prepared %s in %.1f ms", upload.name, (time.perf_counter() - started) * 1e3)
        return prepared
