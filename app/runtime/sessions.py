"""A model version's sessions: one plain backend per runtime instance and an optional rollout
backend, made by the factories, and guarded so a version that keeps failing is taken out.

A session that raises on one batch may have met one bad input; one that raises on
`failure_threshold` batches in a row is broken (a corrupted graph that still parsed, a device
that went away). The guard then reports the version, once, so the model table marks it not ready
with the reason and answers its requests 503 while the other models keep serving.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
from numpy.typing import NDArray

from app.core.priority import in_lowered_thread
from app.core.settings import Settings
from app.models.repository import ModelVersion, VersionKey
from app.models.spec import RolloutParams
from app.runtime.backends import Backend, OnnxBackend, OnnxRolloutBackend, RolloutBackend
from app.runtime.fallback import open_on_best, placement_of, placements_of
from app.runtime.placement import ExecutionPlan, execution_plan
from app.runtime.providers import Placement
from app.runtime.simulated import simulated_backends, simulated_rollout_backends

log = logging.getLogger(__name__)

T = TypeVar("T")

BackendFactory = Callable[[ModelVersion], Backend]
# None: the version has no rollout graph, and rollout requests for it get a 400.
RolloutBackendFactory = Callable[[ModelVersion], RolloutBackend | None]
# Called from an inference thread with the version's key and the reason, once per version.
OnBroken = Callable[[VersionKey, str], None]


class FailureGuard:
    """Consecutive failed batches of one version, across its plain and rollout sessions."""

    def __init__(self, version: VersionKey, threshold: int, on_broken: OnBroken) -> None:
        self.version = version
        self.threshold = threshold
        self.on_broken = on_broken
        self._failures = 0
        self._tripped = False
        self._lock = threading.Lock()  # runtime instances run batches in parallel threads

    def succeeded(self) -> None:
        with self._lock:
            self._failures = 0

    def failed(self, exc: BaseException) -> None:
        with self._lock:
            self._failures += 1
            trip = self._failures >= self.threshold and not self._tripped
            self._tripped = self._tripped or trip
        if trip:
            self.on_broken(
                self.version,
                f"inference failed on {self.threshold} batches in a row "
                f"(last: {type(exc).__name__}: {exc}); reload the model to retry it",
            )

    def watch(self, run: Callable[[], T]) -> T:
        """`run()`, counted: a failure towards the threshold, a success resets the count."""
        try:
            result = run()
        except Exception as exc:
            self.failed(exc)
            raise
        self.succeeded()
        return result


class GuardedBackend:
    def __init__(self, inner: Backend, guard: FailureGuard) -> None:
        self.inner = inner
        self.guard = guard

    @property
    def provider(self) -> str:
        return self.inner.provider

    def run(self, patches: NDArray[np.uint8]) -> NDArray[np.float32]:
        return self.guard.watch(lambda: self.inner.run(patches))


class GuardedRolloutBackend:
    def __init__(self, inner: RolloutBackend, guard: FailureGuard) -> None:
        self.inner = inner
        self.guard = guard

    @property
    def provider(self) -> str:
        return self.inner.provider

    def run(
        self, patches: NDArray[np.uint8], params: RolloutParams
    ) -> tuple[NDArray[np.float32], NDArray[np.float32]]:
        return self.guard.watch(lambda: self.inner.run(patches, params))


@dataclass(frozen=True)
class Sessions:
    """Everything that runs one model version."""

    version: ModelVersion
    lanes: list[Backend]  # one per runtime instance
    rollout: RolloutBackend | None

    @property
    def provider(self) -> str:
        return self.placement.provider

    @property
    def placement(self) -> Placement:
        """Where the plain graph runs (every lane is made alike)."""
        return placement_of(self.lanes[0])

    def placements(self) -> list[tuple[str, Placement]]:
        """Every session's placement, named: `plain`, `plain (outside the profile)`, `rollout`."""
        named = []
        for lane in self.lanes:
            for i, placed in enumerate(placements_of(lane)):
                named.append(("plain" if i == 0 else "plain (outside the profile)", placed))
        if self.rollout is not None:
            named += [("rollout", placed) for placed in placements_of(self.rollout)]
        return named

    def cpu_fallbacks(self) -> list[str]:
        """Why sessions of this version run off the GPU: one line per graph, empty when every
        one runs on a GPU provider (what `require_gpu` asks of all of them)."""
        lines = []
        for name, placed in dict(self.placements()).items():
            if placed.on_gpu:
                continue
            why = placed.fallback or NO_GPU_OFFERED
            lines.append(f"its {name} graph runs on {placed.provider} ({why})")
        return lines


NO_GPU_OFFERED = (
    "no GPU provider was offered to it: VIT_SERVE_PROVIDERS, or a CPU build of ONNX Runtime"
)


class GpuRequiredError(RuntimeError):
    """`require_gpu` is set and a version's sessions landed on the CPU."""


def make_sessions(
    version: ModelVersion,
    instances: int,
    factory: BackendFactory,
    rollout_factory: RolloutBackendFactory,
    threshold: int,
    on_broken: OnBroken,
) -> Sessions:
    """Create (and, by the factories, warm up) a version's sessions; blocking, and raising
    whatever the runtime raises for a graph it cannot load."""
    guard = FailureGuard(version.key, threshold, on_broken)
    lanes: list[Backend] = [GuardedBackend(factory(version), guard) for _ in range(instances)]
    rollout = rollout_factory(version)
    guarded = None if rollout is None else GuardedRolloutBackend(rollout, guard)
    return Sessions(version, lanes, guarded)


def open_backend(
    settings: Settings, version: ModelVersion, warm_up: bool | None = None
) -> tuple[OnnxBackend, ExecutionPlan]:
    """A version's plain graph in a session on the providers and options of its
    `execution_plan`, falling back TensorRT -> CUDA -> CPU where one fails (`open_on_best`),
    warmed up where `warm_up` (default: the `warmup` setting; a TensorRT engine is built or
    loaded from its cache then, so a failed build falls back too); with the plan."""
    plan = execution_plan(settings, version, rollout=False)
    warm = settings.warmup if warm_up is None else warm_up

    def make(providers: list[str]) -> OnnxBackend:
        backend = OnnxBackend(
            version.graph_path,
            version.spec,
            providers,
            settings.intra_op_threads,
            settings.intra_op_spinning,
            options=plan.options,
            profile=plan.profile,
        )
        if warm:
            backend.warm_up()
        return backend

    backend, _ = open_on_best(make, plan, f"{version.name}/{version.version} model.onnx")
    return backend, plan


def _log_placement(
    version: ModelVersion, graph: str, plan: ExecutionPlan, placed: Placement
) -> None:
    """The startup line of one loaded graph: where its nodes run, as JSON fields too."""
    log.info(
        "model %s version %d %s on %s; nodes: %s",
        version.name,
        version.version,
        graph,
        plan.describe(placed.provider),
        placed.shown(),
        extra={
            "event": "placement",
            "model": version.name,
            "version": version.version,
            "graph": graph,
            "provider": placed.provider,
            "wanted": placed.wanted,
            "nodes": placed.node_counts(),
            "fallback": placed.fallback,
            "optimization": plan.optimization,
        },
    )


def onnx_backends(settings: Settings) -> BackendFactory:
    """The production factory: an ONNX Runtime session per model version, on the providers and
    options of its `execution_plan`, warmed up (on TensorRT: the engine is built, or loaded
    from the cache, here, not on a request). With `simulated_curve` set, the simulated
    accelerator's backends instead (benchmarks only)."""
    if settings.simulated_curve is not None:
        return simulated_backends(settings.simulated_curve)

    def load(version: ModelVersion) -> Backend:
        backend, plan = open_backend(settings, version)
        _log_placement(version, "graph", plan, backend.placement)
        if backend.outside_placement is not None:
            _log_placement(version, "graph outside the profile", plan, backend.outside_placement)
        log.debug("model %s version %d: io binding %s", *version.key, backend.io_binding)
        return backend

    return load


def onnx_rollout_backends(settings: Settings) -> RolloutBackendFactory:
    """A session per version's rollout graph, where it has one, created and warmed at start
    (CUDA first on a GPU: see `app.runtime.providers.takes_tensorrt`); the simulated
    accelerator's with `simulated_curve` set."""
    if settings.simulated_curve is not None:
        return simulated_rollout_backends(settings.simulated_curve)

    def load(version: ModelVersion) -> RolloutBackend | None:
        if version.rollout_path is None or version.spec.rollout is None:
            log.info("model %s version %d: no rollout graph", version.name, version.version)
            return None
        plan = execution_plan(settings, version, rollout=True)
        graph = version.rollout_path

        def make(providers: list[str]) -> OnnxRolloutBackend:
            backend = OnnxRolloutBackend(
                graph,
                version.spec,
                providers,
                settings.intra_op_threads,
                settings.intra_op_spinning,
                options=plan.options,
            )
            if settings.warmup:
                backend.warm_up()
            return backend

        label = f"{version.name}/{version.version} model.rollout.onnx"
        backend, _ = open_on_best(make, plan, label)
        _log_placement(version, "rollout graph", plan, backend.placement)
        return backend

    return load


def load_failure(exc: BaseException) -> str:
    """Why a version's sessions could not be made, for /models and the logs."""
    if isinstance(exc, GpuRequiredError):
        return str(exc)
    return f"its graph could not be loaded ({type(exc).__name__}: {exc})"


def gpu_shortfall(sessions: Sessions) -> str | None:
    """With `require_gpu`: why this version may not serve (sessions that should run on a GPU
    landed on the CPU), or None."""
    lines = sessions.cpu_fallbacks()
    if not lines:
        return None
    return (
        f"VIT_SERVE_REQUIRE_GPU is set and {'; '.join(lines)}; fix the GPU setup (driver, "
        "CUDA libraries, TensorRT) and reload or restart"
    )


class SessionLoader:
    """Makes versions' sessions with the service's factories and settings."""

    def __init__(
        self,
        settings: Settings,
        factory: BackendFactory,
        rollout_factory: RolloutBackendFactory,
    ) -> None:
        self.settings = settings
        self.factory = factory
        self.rollout_factory = rollout_factory
        # Set by the model table that owns the sessions: told when a version keeps failing.
        self.on_broken: OnBroken = lambda key, reason: None

    def load(self, version: ModelVersion) -> Sessions:
        """Made in a thread of lowered priority: ONNX Runtime's threads inherit it. With
        `require_gpu`, sessions that landed on the CPU are not kept: GpuRequiredError."""
        sessions = in_lowered_thread(
            self.settings.worker_nice,
            lambda: make_sessions(
                version,
                self.settings.runtime_instances,
                self.factory,
                self.rollout_factory,
                self.settings.model_failure_threshold,
                lambda key, reason: self.on_broken(key, reason),
            ),
        )
        shortfall = gpu_shortfall(sessions) if self.settings.require_gpu else None
        if shortfall is not None:
            log.error(
                "model %s version %d is not ready: %s",
                *version.key,
                shortfall,
                extra={"event": "gpu_required", "model": version.name, "version": version.version},
            )
            raise GpuRequiredError(shortfall)
        return sessions
