"""The classification service: models, preprocessing pool and batcher behind one call; no HTTP.

`classify` takes uploaded bytes and returns labelled predictions: it preprocesses in a bounded
thread pool, queues the patch grids on the batcher and turns logits into top-k answers, all under
one deadline per request.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

from app import metrics
from app.batching import Batcher, BatchKey, DeadlineExceededError, OverloadedError
from app.errors import (
    BusyError,
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
from app.priority import lower_this_thread
from app.providers import GPU_PROVIDERS
from app.reload import plan_reload
from app.repository import (
    ModelEntry,
    ModelVersion,
    Repository,
    RepositoryError,
    Unavailable,
    scan_repository,
    signature,
)
from app.rollout import RolloutMap, RolloutParams, RolloutResult, heatmap_png, normalise
from app.sessions import (
    BackendFactory,
    RolloutBackendFactory,
    SessionLoader,
    Sessions,
    load_failure,
    onnx_backends,
    onnx_rollout_backends,
)
from app.settings import Settings
from app.spec import ROLLOUT_GRAPH_FILENAME, ModelSpec

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


def _declares_image(content_type: str | None) -> bool:
    # Clients often send images as octet-stream or with no type at all: try those too.
    if not content_type:
        return True
    mime = content_type.split(";")[0].strip().lower()
    return mime.startswith("image/") or mime == "application/octet-stream"


def _shown(key: tuple[str, int]) -> str:
    return f"{key[0]}/{key[1]}"


def _rollout_of(rollout: RolloutMap | None) -> RolloutMap:
    if rollout is None:  # the batcher answers every rollout key with a map
        raise RuntimeError("a rollout request was answered without a rollout map")
    return normalise(rollout)


@dataclass(frozen=True)
class ReloadReport:
    loaded: list[str]  # "name/version", new or changed
    unloaded: list[str]  # gone from the repository, drained and released
    unchanged: list[str]
    failed: list[Unavailable]  # cannot be served as on disk (one that served before still does)


class Classifier:
    def __init__(
        self,
        settings: Settings,
        repository: Repository,
        sessions: Mapping[tuple[str, int], Sessions],
        loader: SessionLoader | None = None,
    ) -> None:
        """`sessions`: every version's, one plain backend per runtime instance; `loader` makes
        them for versions that a reload finds (None: reloads cannot load anything)."""
        self.settings = settings
        self.repository = repository  # replaced whole, never mutated: a request sees one
        self._sessions = dict(sessions)
        self._loader = loader
        lanes = [
            {key: s.lanes[i] for key, s in self._sessions.items()}
            for i in range(settings.runtime_instances)
        ]
        self.batcher = Batcher(
            lanes[0],
            rollout_backends={
                k: s.rollout for k, s in self._sessions.items() if s.rollout is not None
            },
            max_batch_size=settings.max_batch_size,
            max_batch_tokens=settings.batch_tokens(
                gpu=any(s.provider in GPU_PROVIDERS for s in self._sessions.values())
            ),
            max_queue_images=settings.max_queue_images,
            max_queue_delay_ms=settings.max_queue_delay_ms,
            more_instances=lanes[1:],
            thread_initializer=functools.partial(lower_this_thread, settings.worker_nice),
        )
        self._pool = ThreadPoolExecutor(
            max_workers=settings.preprocess_threads,
            thread_name_prefix="vit-serve-preprocess",
            initializer=lower_this_thread,
            initargs=(settings.worker_nice,),
        )
        self._preprocessing = 0  # images handed to the pool and not yet back
        self._admitted = 0  # requests between admission and answer
        self._in_use: Counter[tuple[str, int]] = Counter()  # requests holding each version
        self._ready = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._reloading = asyncio.Lock()
        self._poller: asyncio.Task[None] | None = None
        self._signature = signature(settings.model_repo)
        self.on_change: Callable[[], None] | None = None  # what is served changed (metrics)
        if loader is not None:
            loader.on_broken = self._broken

    @classmethod
    def load(
        cls,
        settings: Settings,
        backend_factory: BackendFactory | None = None,
        rollout_factory: RolloutBackendFactory | None = None,
    ) -> Classifier:
        """Scan the repository and load (and warm up) every version's graphs; blocking.

        Rollout graphs load here too, not on first use: the first rollout request then costs
        what the next one does. The price is a second session's memory per version. A version
        whose sessions cannot be made is served by nobody and listed as not ready, with why.
        """
        repository = scan_repository(settings.model_repo, settings.default_model)
        loader = SessionLoader(
            settings,
            backend_factory or onnx_backends(settings),
            rollout_factory or onnx_rollout_backends(settings),
        )
        sessions: dict[tuple[str, int], Sessions] = {}
        failed: dict[tuple[str, int], str] = {}
        for version in repository.all_versions():
            try:
                sessions[version.key] = loader.load(version)
            except Exception as exc:
                failed[version.key] = load_failure(exc)
                log.exception("model %s version %d cannot be loaded", *version.key)
        return cls(settings, repository.without(failed), sessions, loader)

    @property
    def ready(self) -> bool:
        return self._ready

    @property
    def serving(self) -> bool:
        """At least one model version can answer."""
        return bool(self.repository.models)

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self.batcher.start()
        self._ready = True
        if self.settings.model_repo_poll_s > 0:
            self._poller = self._loop.create_task(self._poll(), name="model-repo-poll")

    async def stop(self) -> None:
        self._ready = False
        if self._poller is not None:
            self._poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._poller
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

    def provider(self, entry: ModelEntry) -> str:
        return self._sessions[(entry.spec.name, entry.default_version)].provider

    def versions_served(self) -> list[tuple[ModelVersion, str]]:
        """Each served version with its provider."""
        return [(v, self._sessions[v.key].provider) for v in self.repository.all_versions()]

    def rollout_versions(self, entry: ModelEntry) -> list[int]:
        """The versions of a model that can answer rollout requests."""
        name = entry.spec.name
        return sorted(v for v in entry.versions if self._sessions[(name, v)].rollout is not None)

    # --- faults and reloads ------------------------------------------------------------------

    def _broken(self, key: tuple[str, int], reason: str) -> None:
        """From an inference thread: the version keeps failing; take it out on the loop."""
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._mark_not_ready, key, reason)

    def _mark_not_ready(self, key: tuple[str, int], reason: str) -> None:
        if key not in {v.key for v in self.repository.all_versions()}:
            return
        log.error("model %s version %d is not ready: %s", *key, reason)
        self.repository = self.repository.without({key: reason})
        self._changed()

    def _changed(self) -> None:
        if self.on_change is not None:
            self.on_change()

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self.settings.model_repo_poll_s)
            try:
                found = await asyncio.to_thread(signature, self.settings.model_repo)
                if found != self._signature:
                    await self.reload()
            except Exception:  # the poller outlives any one failed reload
                log.exception("reloading the model repository failed")

    async def reload(self) -> ReloadReport:
        """Scan the repository again and serve what it holds now, with no failed request.

        New and changed versions are loaded and warmed up off the event loop while the old ones
        serve, then swapped in at once; a version whose folder is gone leaves the table at once
        (no new request resolves to it) and is released when its last request has finished.
        """
        async with self._reloading:
            found = await asyncio.to_thread(signature, self.settings.model_repo)
            try:
                scanned = await asyncio.to_thread(
                    scan_repository, self.settings.model_repo, self.settings.default_model
                )
            except RepositoryError as exc:
                raise RepositoryError(f"{exc}; nothing was reloaded") from exc
            self._signature = found  # the poller looks again only when the files change again
            loaded = {key: s.version.fingerprint for key, s in self._sessions.items()}
            plan = plan_reload(self.repository, loaded, scanned)
            made: dict[tuple[str, int], Sessions] = {}
            failed: list[Unavailable] = list(scanned.unavailable.values())
            unavailable = {
                k: u for k, u in scanned.unavailable.items() if u not in plan.kept_despite
            }
            serving = {mv.key: mv for mv in plan.keep}
            current = {mv.key: mv for mv in self.repository.all_versions()}
            for version in plan.load:
                try:
                    made[version.key] = await asyncio.to_thread(self._load_one, version)
                except Exception as exc:
                    log.exception("model %s version %d cannot be loaded", *version.key)
                    failure = Unavailable(version.name, version.version, load_failure(exc))
                    failed.append(failure)
                    if version.key in current:  # the old one goes on serving
                        serving[version.key] = current[version.key]
                    else:
                        unavailable[version.key] = failure
            for key, sessions in made.items():
                self.batcher.install(key, sessions.lanes, sessions.rollout)
                self._sessions[key] = sessions
                serving[key] = sessions.version
            self.repository = Repository.of(
                list(serving.values()), unavailable, self.settings.default_model
            )
            self._changed()
            for key in plan.unload:
                await self._drain(key)
            report = ReloadReport(
                loaded=[_shown(key) for key in made],
                unloaded=[_shown(key) for key in plan.unload],
                unchanged=[_shown(mv.key) for mv in plan.keep if mv.key not in made],
                failed=failed,
            )
            log.info(
                "reloaded %s: loaded %s, unloaded %s, failed %s",
                self.settings.model_repo,
                report.loaded,
                report.unloaded,
                [f"{f.shown}: {f.reason}" for f in report.failed],
            )
            return report

    def _load_one(self, version: ModelVersion) -> Sessions:
        if self._loader is None:
            raise RuntimeError("this classifier was made without a session loader")
        return self._loader.load(version)

    async def _drain(self, key: tuple[str, int]) -> None:
        """Wait for the last request holding `key` (each ends by its deadline), then release."""
        limit = asyncio.get_running_loop().time() + self.settings.request_timeout_s + 1.0
        while self._in_use[key] > 0 and asyncio.get_running_loop().time() < limit:
            await asyncio.sleep(0.01)
        self.batcher.uninstall(key)
        self._sessions.pop(key, None)
        self._in_use.pop(key, None)

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
        timeout_s = self.settings.request_timeout_s
        if timeout_ms is not None:
            timeout_s = min(timeout_s, timeout_ms / 1e3)
        # Deadlines run on the loop's clock; timings on perf_counter (uvloop's clock ticks in ms).
        loop = asyncio.get_running_loop()
        deadline = (loop.time() if arrived is None else arrived) + timeout_s
        started = time.perf_counter()
        target = self.repository.resolve(model, version)
        metrics.note_model(target.name)
        # Held until the answer is made: a reload releases a version's sessions only after.
        self._in_use[target.key] += 1
        try:
            return await self._classify(
                target, uploads, top_k, resize, rollout, heatmap, deadline, started
            )
        finally:
            self._in_use[target.key] -= 1

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
        if self._sessions[target.key].rollout is None:
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
