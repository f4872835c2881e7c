"""The engine: the one owner of what is served, behind the protocol every front door uses.

`Engine` holds the model table (repository snapshot, sessions, reload, drain, in-use counts,
broken versions) and the batcher that runs them, and admits requests. The doors see only
`EngineClient`: `admit(model, version)` takes a request place and holds the model version it
names (a reload releases it only after), and gives a `Permit`, the value `infer` requires,
released once when the answer is made; `infer` takes patch grids and gives back each image's
logits, probabilities and rollout map with the spec and labels they were made with;
`readiness()` is the one answer every door gives; `describe()` is what /models, the V2
metadata and the metrics show. Every argument and result is plain data (arrays, frozen
dataclasses, pydantic models): nothing here knows HTTP, and the calls that may wait are
coroutines, so the engine can as well be in another process (app/engine/remote.py).
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import numpy as np
from numpy.typing import NDArray

from app.core.errors import (
    BusyError,
    InvalidInputError,
    InvalidParameterError,
    NotReadyError,
    RolloutUnavailableError,
)
from app.core.settings import Settings
from app.engine.batcher import Batcher, BatchObserver, outputs_of
from app.engine.batches import (
    BatchKey,
    DecodeRefusedError,
    Output,
    Refused,
    first_error_or_all,
)
from app.engine.introspection import Introspection, parse_grid
from app.engine.table import ModelTable, ReloadReport
from app.models.repository import Unavailable, VersionKey
from app.models.spec import ROLLOUT_GRAPH_FILENAME, ModelSpec, OptimizationLevel, RolloutParams
from app.runtime.devicedecode import DeviceDecoder, EncodedImage
from app.runtime.providers import Placement, graph_form

BUSY_MESSAGE = "the server is overloaded (every request place is taken); retry shortly"
LOADING_MESSAGE = "the models are not loaded yet or the server is stopping; retry"


@dataclass(frozen=True)
class Readiness:
    """Whether this replica should take traffic, and why not (the 503's message)."""

    ready: bool
    reason: str | None = None
    loaded: bool = True  # the models are loaded and the engine started (it may still be unready)


@dataclass(frozen=True)
class ServedVersion:
    """The model version a request resolved to, held under its permit."""

    name: str
    version: int
    spec: ModelSpec
    rollout: bool  # it has a rollout graph
    max_tokens: int  # patches per image it takes (the `fit` policy's cap)
    device_decode: bool = False  # the engine decodes its JPEGs on the device (Job.encoded)

    @property
    def key(self) -> VersionKey:
        return (self.name, self.version)


@dataclass(frozen=True)
class VersionDescription:
    version: int
    spec: ModelSpec
    placement: Placement  # where its plain graph runs
    rollout: bool
    form: OptimizationLevel  # model.onnx's form: none, fused, fp16, int8
    decode: Literal["gpu", "cpu"] = "cpu"  # where its JPEGs are decoded (VIT_SERVE_DECODE)


@dataclass(frozen=True)
class ModelDescription:
    name: str
    default_version: int
    versions: tuple[VersionDescription, ...]  # by version
    max_tokens: int

    @property
    def default(self) -> VersionDescription:
        return next(v for v in self.versions if v.version == self.default_version)


@dataclass(frozen=True)
class Description:
    """What is served now: the models (by name), what cannot serve and why."""

    default_model: str | None
    models: tuple[ModelDescription, ...]
    not_ready: tuple[Unavailable, ...]
    replica_not_ready: str | None  # VIT_SERVE_REQUIRE_GPU unmet: why the replica is out
    decoder: str = "VIT_SERVE_DECODE=cpu"  # what decodes on the device, or why nothing does

    def model(self, name: str) -> ModelDescription | None:
        return next((m for m in self.models if m.name == name), None)


@dataclass(frozen=True)
class Job:
    """A request's images as the graph takes them, under one deadline (time.monotonic(), the
    system-wide clock, so a deadline means the same on either side of a process boundary)."""

    patches: Sequence[NDArray[np.uint8]]  # each (grid_h, grid_w, P*P*C)
    rollout: RolloutParams | None
    deadline: float
    # Images for the device decoder (a version with `device_decode`), after the patches;
    # their outcomes are `EngineResult.decoded`.
    encoded: Sequence[EncodedImage] = ()


@dataclass(frozen=True)
class EngineResult:
    """A job's outputs, in the order of its images, with the spec they were made with."""

    name: str
    version: int
    spec: ModelSpec
    outputs: Sequence[Output]  # the job's patches'
    decoded: Sequence[Output | Refused] = ()  # the job's encoded images': refused go the CPU path


class Permit:
    """One request place and the model version it holds: from `admit()` until `release()`,
    which frees both (once; later calls do nothing). `infer` takes nothing else."""

    __slots__ = ("_release", "number", "released", "served")

    def __init__(
        self, number: int, served: ServedVersion, release: Callable[[Permit], None]
    ) -> None:
        self.number = number  # the engine's name for it (across a process boundary too)
        self.served = served
        self.released = False
        self._release = release

    def release(self) -> None:
        if not self.released:
            self.released = True
            self._release(self)


class EngineClient(Protocol):
    """All a front door may ask of the engine."""

    @property
    def busy(self) -> bool:
        """Every request place is taken (as last known): `admit()` would refuse."""
        ...

    async def admit(self, model: str | None, version: int | None) -> Permit: ...

    async def lookup(self, model: str | None, version: int | None) -> ServedVersion: ...

    async def infer(self, permit: Permit, job: Job) -> EngineResult: ...

    def readiness(self) -> Readiness: ...

    def describe(self) -> Description: ...

    async def reload(self) -> ReloadReport: ...

    async def stats(self) -> tuple[int, int]:
        """(images queued, the queue's capacity) now."""
        ...

    async def introspect(self, model: str, version: int | None, grid: str | None) -> dict[str, Any]:
        """What a version has learned (Fig. 7's three panels, `grid`: "HxW" or None), JSON."""
        ...

    async def attention_distance(
        self, permit: Permit, patches: NDArray[np.uint8], image_size: tuple[int, int]
    ) -> dict[str, Any]:
        """One image's mean attention distance per head and depth, on the permit's version."""
        ...


class Engine:
    def __init__(
        self,
        settings: Settings,
        table: ModelTable,
        decoder: DeviceDecoder | None = None,
        decoder_note: str = "VIT_SERVE_DECODE=cpu",
    ) -> None:
        """`decoder`: decodes the JPEGs of the versions it serves (`device_decode`) in their
        batches; `decoder_note`: what it is, or why there is none (`open_decoder`)."""
        self.settings = settings
        self.table = table
        self.decoder = decoder
        self.decoder_note = decoder_note
        self.batcher = Batcher(
            table.lanes(),
            rollout_backends=table.rollout_backends(),
            max_batch_size=settings.max_batch_size,
            max_batch_tokens=settings.batch_tokens(gpu=table.on_gpu),
            max_queue_images=settings.max_queue_images,
            max_queue_delay_ms=settings.max_queue_delay_ms,
            worker_nice=settings.worker_nice,
        )
        self.batcher.decoder = decoder
        self._admitted = 0  # permits not yet released
        self._numbers = itertools.count(1)
        # Fig. 7 at serve time, on CPU sessions of its own beside the batcher.
        self.introspection = Introspection()
        self._started = False

    # --- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        self.batcher.start()
        self.table.start()
        self._started = True

    async def stop(self) -> None:
        self._started = False
        await self.table.stop()
        await self.batcher.stop(self.settings.drain_timeout_s)

    def observe(self, observer: BatchObserver) -> None:
        """Told of every batch that ran (the metrics)."""
        self.batcher.observer = observer

    @property
    def queued(self) -> int:
        return self.batcher.queued

    @property
    def queue_capacity(self) -> int:
        return self.batcher.max_queue_images

    # --- admission ---------------------------------------------------------------------------

    @property
    def busy(self) -> bool:
        return self._admitted >= self.settings.request_places()

    async def admit(self, model: str | None, version: int | None) -> Permit:
        """A request place, from before its body is read until its answer, holding the version
        the request names: BusyError at once when no place is free; UnknownModelError (404),
        ModelNotReadyError (503) for what is not served.

        There are as many places as images can wait in the queue plus run in batches: each
        request has at least one image, so more requests than that could not all be served. A
        refusal here costs no body read, decode or queueing: under overload the event loop
        spends its CPU on refusing quickly, not on reading bodies it would refuse later.
        """
        return self.admit_now(model, version)

    def admit_now(self, model: str | None, version: int | None) -> Permit:
        """`admit`, for a caller on the event loop that cannot await (the engine's host)."""
        if not self._started:
            raise NotReadyError(LOADING_MESSAGE)
        if self.busy:
            raise BusyError(BUSY_MESSAGE)
        served = self.lookup_now(model, version)
        self.table.hold(served.key)
        self._admitted += 1
        return Permit(next(self._numbers), served, self._release)

    def _release(self, permit: Permit) -> None:
        self._admitted -= 1
        self.table.release(permit.served.key)

    def max_tokens(self, spec: ModelSpec) -> int:
        return self.settings.fit_max_tokens or 2 * spec.architecture.native_tokens

    async def lookup(self, model: str | None, version: int | None) -> ServedVersion:
        return self.lookup_now(model, version)

    def lookup_now(self, model: str | None, version: int | None) -> ServedVersion:
        """The version a name and number mean now, held by nothing (metadata, probes):
        UnknownModelError (404), ModelNotReadyError (503)."""
        target = self.table.repository.resolve(model, version)
        return ServedVersion(
            name=target.name,
            version=target.version,
            spec=target.spec,
            rollout=self.table.has_rollout(target.key),
            max_tokens=self.max_tokens(target.spec),
            device_decode=self.device_decode(target.key),
        )

    def device_decode(self, key: VersionKey) -> bool:
        """Whether the decoder serves this version: its patches can feed the version's
        sessions (a GPU decoder's, sessions on CUDA or TensorRT)."""
        if self.decoder is None or not self.batcher.serves(key):
            return False
        return self.decoder.serves(self.table.placement_of(key).provider)

    async def infer(self, permit: Permit, job: Job) -> EngineResult:
        """Run a job on the version `permit` holds, through the queue and the batcher."""
        served = permit.served
        if not job.encoded:
            outputs = await outputs_of(self.submit(permit, job))
            return EngineResult(served.name, served.version, served.spec, outputs)
        plain, deadline = self._requests(permit, job)
        return await self._infer_encoded(served, job, plain, deadline)

    def submit(self, permit: Permit, job: Job) -> list[asyncio.Future[Output]]:
        """`infer` without the wait, for a job of patches only: its images queued, each one's
        future in order (the engine's host answers from their callbacks, with no task a job).
        Cancelling a future frees its queue place."""
        if job.encoded:
            raise ValueError("a job with encoded images goes through `infer`")
        plain, deadline = self._requests(permit, job)
        return self.batcher.submit(plain, deadline)

    def _requests(
        self, permit: Permit, job: Job
    ) -> tuple[list[tuple[BatchKey, NDArray[np.uint8]]], float]:
        """A job's patches checked and keyed for the batcher, and its deadline on the loop's
        clock."""
        if permit.released:
            raise RuntimeError("this permit was released: admit the request again")
        served = permit.served
        if job.rollout is not None:
            check_rollout(served, job.rollout)
        patch_dim = served.spec.architecture.patch_dim
        for patches in job.patches:
            if patches.ndim != 3 or patches.shape[2] != patch_dim or patches.dtype != np.uint8:
                raise InvalidInputError(
                    f"patches of shape {list(patches.shape)} ({patches.dtype}): model "
                    f"'{served.name}' takes uint8 [grid_h, grid_w, {patch_dim}] per image"
                )
        loop = asyncio.get_running_loop()
        deadline = loop.time() + (job.deadline - time.monotonic())
        plain = [
            (BatchKey(served.name, served.version, (p.shape[0], p.shape[1]), job.rollout), p)
            for p in job.patches
        ]
        return plain, deadline

    async def _infer_encoded(
        self,
        served: ServedVersion,
        job: Job,
        plain: list[tuple[BatchKey, NDArray[np.uint8]]],
        deadline: float,
    ) -> EngineResult:
        """A job with images for the device decoder: each refused one comes back `Refused`
        (a reload may have moved the version off the GPU meanwhile: then all of them)."""
        if job.rollout is not None or not self.device_decode(served.key):
            refused = Refused("this model version is not decoded on the device now")
            outputs = await self.batcher.infer(plain, deadline) if plain else []
            return EngineResult(
                served.name, served.version, served.spec, outputs, [refused] * len(job.encoded)
            )
        requests: list[tuple[BatchKey, NDArray[np.uint8] | EncodedImage]] = list(plain)
        requests.extend(
            (BatchKey(served.name, served.version, image.grid, None, encoded=True), image)
            for image in job.encoded
        )
        futures = self.batcher.submit(requests, deadline)
        # Cancelling this call cancels the futures, which frees their queue slots.
        outcomes = await asyncio.gather(*futures, return_exceptions=True)
        # The first error in the job's order is the answer; a refusal is no error.
        answered = first_error_or_all(
            [o for o in outcomes if not isinstance(o, DecodeRefusedError)]
        )
        outputs, decoded_outputs = answered[: len(plain)], iter(answered[len(plain) :])
        decoded: list[Output | Refused] = [
            Refused(o.reason) if isinstance(o, DecodeRefusedError) else next(decoded_outputs)
            for o in outcomes[len(plain) :]
        ]
        return EngineResult(served.name, served.version, served.spec, outputs, decoded)

    # --- what is served ----------------------------------------------------------------------

    def readiness(self) -> Readiness:
        """Loaded and warmed up, at least one model version serving, and, with
        VIT_SERVE_REQUIRE_GPU, every version's sessions on a GPU.

        A model that cannot serve does not take the replica out of its load balancer: the
        others still serve, and `describe()` says what is not ready and why.
        """
        if not self._started:
            return Readiness(False, LOADING_MESSAGE, loaded=False)
        reason = self.table.not_ready_reason
        if reason is not None:
            return Readiness(False, f"VIT_SERVE_REQUIRE_GPU is set and {reason}")
        if not self.table.serving:
            return Readiness(
                False,
                "no model can be served; GET /models lists each one's reason"
                if self.table.repository.unavailable
                else "the model repository is empty: add a model and reload",
            )
        return Readiness(True)

    def describe(self) -> Description:
        repository = self.table.repository
        models = []
        for name, entry in sorted(repository.models.items()):
            rollout = set(self.table.rollout_versions(entry))
            versions = tuple(
                VersionDescription(
                    version=number,
                    spec=mv.spec,
                    placement=self.table.placement_of(mv.key),
                    rollout=number in rollout,
                    form=graph_form(mv.spec, number),
                    decode="gpu" if self.device_decode(mv.key) else "cpu",
                )
                for number, mv in sorted(entry.versions.items())
            )
            models.append(
                ModelDescription(name, entry.default_version, versions, self.max_tokens(entry.spec))
            )
        not_ready = tuple(
            u
            for _, u in sorted(
                repository.unavailable.items(), key=lambda kv: (kv[0][0], kv[0][1] or 0)
            )
        )
        return Description(
            repository.default_model,
            tuple(models),
            not_ready,
            self.table.not_ready_reason,
            self.decoder_note,
        )

    async def reload(self) -> ReloadReport:
        return await self.table.reload()

    async def stats(self) -> tuple[int, int]:
        return self.queued, self.queue_capacity

    async def introspect(self, model: str, version: int | None, grid: str | None) -> dict[str, Any]:
        target = self.table.repository.resolve(model, version)
        wanted = parse_grid(grid, target.spec)  # InvalidParameterError (422) says why not
        return await asyncio.to_thread(self.introspection.describe, target, wanted)

    async def attention_distance(
        self, permit: Permit, patches: NDArray[np.uint8], image_size: tuple[int, int]
    ) -> dict[str, Any]:
        served = permit.served
        target = self.table.repository.resolve(served.name, served.version)
        return await asyncio.to_thread(self.introspection.for_image, target, patches, image_size)


def check_rollout(served: ServedVersion, params: RolloutParams) -> None:
    """Why `served` cannot give these rollout maps (before anything is decoded), if it cannot."""
    if not served.rollout:
        raise RolloutUnavailableError(
            f"model '{served.name}' version {served.version} has no rollout graph "
            f"({ROLLOUT_GRAPH_FILENAME}), so it cannot give rollout maps: re-export it with "
            "`python -m export` (which writes both graphs), or ask without rollout"
        )
    contract = served.spec.rollout
    if contract is not None and params.head_fusion not in contract.head_fusions:
        raise InvalidParameterError(
            f"head_fusion '{params.head_fusion}' is not in the rollout graph of model "
            f"'{served.name}'; it takes: {', '.join(contract.head_fusions)}"
        )
