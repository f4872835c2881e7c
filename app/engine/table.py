"""The model table: what is served now, and what keeps it current.

It holds the repository snapshot that requests resolve against, each served version's sessions,
and how many requests hold each version; reloads (asked for, or by the poller) and versions that
keep failing change it. It is the one place that says what is served: the batcher reads each
version's backends through `lanes()` and `rollout_backends()`, live views of the table's own
sessions, so nothing is kept in step by hand. It knows nothing of batching or HTTP.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

from app.core.settings import Settings
from app.engine.reload import plan_reload
from app.models.repository import (
    ModelEntry,
    ModelVersion,
    Repository,
    RepositoryError,
    Unavailable,
    VersionKey,
    scan_repository,
    signature,
)
from app.runtime.backends import Backend, RolloutBackend
from app.runtime.providers import GPU_PROVIDERS, Placement
from app.runtime.sessions import (
    BackendFactory,
    GpuRequiredError,
    RolloutBackendFactory,
    SessionLoader,
    Sessions,
    load_failure,
    onnx_backends,
    onnx_rollout_backends,
)

log = logging.getLogger(__name__)


class _LaneView(Mapping[VersionKey, Backend]):
    """One runtime instance's plain backend of every served version, read from the table."""

    def __init__(self, sessions: dict[VersionKey, Sessions], lane: int) -> None:
        self._sessions = sessions
        self._lane = lane

    def __getitem__(self, key: VersionKey) -> Backend:
        return self._sessions[key].lanes[self._lane]

    def __iter__(self) -> Iterator[VersionKey]:
        return iter(self._sessions)

    def __len__(self) -> int:
        return len(self._sessions)


class _RolloutView(Mapping[VersionKey, RolloutBackend]):
    """The rollout backend of every served version that has one, read from the table."""

    def __init__(self, sessions: dict[VersionKey, Sessions]) -> None:
        self._sessions = sessions

    def __getitem__(self, key: VersionKey) -> RolloutBackend:
        rollout = self._sessions[key].rollout
        if rollout is None:
            raise KeyError(key)
        return rollout

    def __iter__(self) -> Iterator[VersionKey]:
        return (k for k, s in self._sessions.items() if s.rollout is not None)

    def __len__(self) -> int:
        return sum(1 for s in self._sessions.values() if s.rollout is not None)


@dataclass(frozen=True)
class ReloadReport:
    loaded: list[str]  # "name/version", new or changed
    unloaded: list[str]  # gone from the repository, drained and released
    unchanged: list[str]
    failed: list[Unavailable]  # cannot be served as on disk (one that served before still does)


def _shown(key: VersionKey) -> str:
    return f"{key[0]}/{key[1]}"


class ModelTable:
    def __init__(
        self,
        settings: Settings,
        repository: Repository,
        sessions: Mapping[VersionKey, Sessions],
        loader: SessionLoader | None = None,
        gpu_missing: Mapping[VersionKey, str] | None = None,
    ) -> None:
        """`sessions`: every version's, one plain backend per runtime instance; `loader` makes
        them for versions that a reload finds (None: reloads cannot load anything);
        `gpu_missing`: versions refused because `require_gpu` is set and their sessions landed
        on the CPU, with why (they keep the replica not ready)."""
        self.settings = settings
        self.gpu_missing: dict[VersionKey, str] = dict(gpu_missing or {})
        self.repository = repository  # replaced whole, never mutated: a request sees one
        self._sessions = dict(sessions)  # changed in place, never replaced: the views read it
        self._loader = loader
        self._in_use: Counter[VersionKey] = Counter()  # requests holding each version
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
    ) -> ModelTable:
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
        sessions: dict[VersionKey, Sessions] = {}
        failed: dict[VersionKey, str] = {}
        gpu_missing: dict[VersionKey, str] = {}
        for version in repository.all_versions():
            try:
                sessions[version.key] = loader.load(version)
            except GpuRequiredError as exc:  # logged where it was found, with its reason
                failed[version.key] = gpu_missing[version.key] = load_failure(exc)
            except Exception as exc:
                failed[version.key] = load_failure(exc)
                log.exception("model %s version %d cannot be loaded", *version.key)
        return cls(settings, repository.without(failed), sessions, loader, gpu_missing)

    # --- what is served ----------------------------------------------------------------------

    def lanes(self) -> list[Mapping[VersionKey, Backend]]:
        """Every served version's plain backends, one live mapping per runtime instance."""
        return [_LaneView(self._sessions, i) for i in range(self.settings.runtime_instances)]

    def rollout_backends(self) -> Mapping[VersionKey, RolloutBackend]:
        """Every served version's rollout backend, where it has one, live."""
        return _RolloutView(self._sessions)

    @property
    def on_gpu(self) -> bool:
        """Some version's sessions run on a GPU provider."""
        return any(s.provider in GPU_PROVIDERS for s in self._sessions.values())

    @property
    def serving(self) -> bool:
        """At least one model version can answer."""
        return bool(self.repository.models)

    def provider(self, entry: ModelEntry) -> str:
        return self._sessions[(entry.spec.name, entry.default_version)].provider

    def placement(self, entry: ModelEntry) -> Placement:
        """Where a model's default version's plain graph runs."""
        return self._sessions[(entry.spec.name, entry.default_version)].placement

    def versions_served(self) -> list[tuple[ModelVersion, str]]:
        """Each served version with its provider."""
        return [(v, self._sessions[v.key].provider) for v in self.repository.all_versions()]

    def placements_served(self) -> list[tuple[ModelVersion, Placement]]:
        """Each served version with where its plain graph runs."""
        return [(v, self._sessions[v.key].placement) for v in self.repository.all_versions()]

    @property
    def not_ready_reason(self) -> str | None:
        """Why the replica must not take traffic although models serve: `require_gpu` is set
        and some version's sessions landed on the CPU (that version is not served). None when
        nothing keeps it out."""
        if not self.gpu_missing:
            return None
        shown = "; ".join(f"{_shown(k)}: {why}" for k, why in sorted(self.gpu_missing.items()))
        return f"sessions that should run on a GPU landed on the CPU: {shown}"

    def rollout_versions(self, entry: ModelEntry) -> list[int]:
        """The versions of a model that can answer rollout requests."""
        name = entry.spec.name
        return sorted(v for v in entry.versions if self._sessions[(name, v)].rollout is not None)

    def has_rollout(self, key: VersionKey) -> bool:
        return self._sessions[key].rollout is not None

    def hold(self, key: VersionKey) -> None:
        """Count a request as using `key` until `release`: a reload releases a version's
        sessions only after its last request."""
        self._in_use[key] += 1

    def release(self, key: VersionKey) -> None:
        self._in_use[key] -= 1

    def placement_of(self, key: VersionKey) -> Placement:
        """Where a served version's plain graph runs."""
        return self._sessions[key].placement

    # --- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        if self.settings.model_repo_poll_s > 0:
            self._poller = self._loop.create_task(self._poll(), name="model-repo-poll")

    async def stop(self) -> None:
        if self._poller is not None:
            self._poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._poller

    # --- faults and reloads ------------------------------------------------------------------

    def _broken(self, key: VersionKey, reason: str) -> None:
        """From an inference thread: the version keeps failing; take it out on the loop."""
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._mark_not_ready, key, reason)

    def _mark_not_ready(self, key: VersionKey, reason: str) -> None:
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
            made: dict[VersionKey, Sessions] = {}
            failed: list[Unavailable] = list(scanned.unavailable.values())
            unavailable = {
                k: u for k, u in scanned.unavailable.items() if u not in plan.kept_despite
            }
            serving = {mv.key: mv for mv in plan.keep}
            current = {mv.key: mv for mv in self.repository.all_versions()}
            for version in plan.load:
                try:
                    made[version.key] = await asyncio.to_thread(self._load_one, version)
                    self.gpu_missing.pop(version.key, None)
                except Exception as exc:
                    if isinstance(exc, GpuRequiredError):
                        self.gpu_missing[version.key] = load_failure(exc)
                    else:
                        log.exception("model %s version %d cannot be loaded", *version.key)
                    failure = Unavailable(version.name, version.version, load_failure(exc))
                    failed.append(failure)
                    if version.key in current:  # the old one goes on serving
                        serving[version.key] = current[version.key]
                    else:
                        unavailable[version.key] = failure
            for key, sessions in made.items():
                # The next batch of `key` takes these; one already running keeps its own.
                self._sessions[key] = sessions
                serving[key] = sessions.version
            self.repository = Repository.of(
                list(serving.values()), unavailable, self.settings.default_model
            )
            self._changed()
            for key in plan.unload:
                self.gpu_missing.pop(key, None)
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
            raise RuntimeError("this model table was made without a session loader")
        return self._loader.load(version)

    async def _drain(self, key: VersionKey) -> None:
        """Wait for the last request holding `key` (each ends by its deadline), then release."""
        limit = asyncio.get_running_loop().time() + self.settings.request_timeout_s + 1.0
        while self._in_use[key] > 0 and asyncio.get_running_loop().time() < limit:
            await asyncio.sleep(0.01)
        # An item of `key` still queued (none, normally) is answered NotServedError.
        self._sessions.pop(key, None)
        self._in_use.pop(key, None)
