"""The model repository: `<root>/<name>/model.json` plus integer version folders.

Scanning never fails because of one model: a model or version whose files cannot be served
(a broken model.json, a missing graph, a graph whose sha256 differs from model.json) is left out
and listed as unavailable with the reason, and the others are served. Requests never touch the
file system: a model name from a request is only ever a key into the table built here, so it
cannot name a path.
"""

from __future__ import annotations

import hashlib
import logging
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TypeAlias

from pydantic import ValidationError

from app.core.errors import ErrorKind, ServiceError
from app.models.spec import (
    GRAPH_FILENAME,
    MODEL_NAME_PATTERN,
    ROLLOUT_GRAPH_FILENAME,
    SPEC_FILENAME,
    GraphFiles,
    ModelSpec,
)

log = logging.getLogger(__name__)

# A served model version: (model name, version). Batches, sessions and reloads are keyed by it.
VersionKey: TypeAlias = tuple[str, int]

_NAME = re.compile(MODEL_NAME_PATTERN)
_VERSION = re.compile(r"0|[1-9][0-9]*")  # canonical only: "01", "+1" or "１" would alias a version


class RepositoryError(ServiceError, RuntimeError):
    """The repository as configured cannot be used at all (the service refuses to start)."""

    kind = ErrorKind.CONFLICT


class UnknownModelError(ServiceError, LookupError):
    """A request named a model or version that is not in the repository (a 404)."""

    kind = ErrorKind.NOT_FOUND


class ModelNotReadyError(ServiceError, RuntimeError):
    """A request named a model or version that is in the repository but cannot serve (a 503)."""

    kind = ErrorKind.UNAVAILABLE


@dataclass(frozen=True)
class ModelVersion:
    spec: ModelSpec
    version: int
    graph_path: Path
    rollout_path: Path | None = None  # the same weights with the rollout output, when exported
    # What a reload compares: the graphs' sha256 and the spec (less its list of versions, so
    # that adding version 3 does not reload versions 1 and 2).
    fingerprint: str = ""

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def key(self) -> VersionKey:
        return (self.spec.name, self.version)


@dataclass(frozen=True)
class ModelEntry:
    spec: ModelSpec
    versions: dict[int, ModelVersion]

    @property
    def default_version(self) -> int:
        return max(self.versions)


@dataclass(frozen=True)
class Unavailable:
    """A model (version None: all of it) or one version that is not served, and why."""

    model: str
    version: int | None
    reason: str

    @property
    def shown(self) -> str:
        return f"model '{self.model}'" + (
            "" if self.version is None else f" version {self.version}"
        )


@dataclass(frozen=True)
class Repository:
    models: dict[str, ModelEntry]
    default_model: str | None  # None only when nothing at all is in the repository
    unavailable: dict[tuple[str, int | None], Unavailable] = field(default_factory=dict)
    configured_default: str | None = None  # the setting; else the first served model by name

    def resolve(self, name: str | None, version: int | None) -> ModelVersion:
        """The version a request asks for: UnknownModelError (404) when it is not in the
        repository, ModelNotReadyError (503) when it is but cannot serve."""
        if name is None:
            if self.default_model is None:
                raise ModelNotReadyError("no model is being served: the model repository is empty")
            name = self.default_model
        entry = self.models.get(name)
        whole = self.unavailable.get((name, None))
        if entry is None and whole is not None:
            raise ModelNotReadyError(f"{whole.shown} is not ready: {whole.reason}")
        failed = self.unavailable.get((name, version)) if version is not None else None
        if failed is not None:
            raise ModelNotReadyError(f"{failed.shown} is not ready: {failed.reason}")
        if entry is None:
            broken = [u for u in self.unavailable.values() if u.model == name]
            if broken:  # every version of it failed
                raise ModelNotReadyError(f"{broken[0].shown} is not ready: {broken[0].reason}")
            shown = name if _NAME.fullmatch(name) and len(name) <= 100 else "(invalid name)"
            served = ", ".join(sorted(self.models)) or "none"
            raise UnknownModelError(f"unknown model '{shown}'; served models: {served}")
        if version is None:
            version = entry.default_version
        found = entry.versions.get(version)
        if found is None:
            served = ", ".join(str(v) for v in sorted(entry.versions))
            raise UnknownModelError(
                f"model '{name}' has no version {version}; served versions: {served}"
            )
        return found

    @classmethod
    def of(
        cls,
        versions: list[ModelVersion],
        unavailable: dict[tuple[str, int | None], Unavailable],
        configured_default: str | None,
    ) -> Repository:
        """A repository serving exactly `versions` (each model's spec from its highest)."""
        by_name: dict[str, dict[int, ModelVersion]] = {}
        for mv in versions:
            by_name.setdefault(mv.name, {})[mv.version] = mv
        models = {
            name: ModelEntry(found[max(found)].spec, dict(sorted(found.items())))
            for name, found in sorted(by_name.items())
        }
        default = _default(models, unavailable, configured_default)
        return cls(models, default, unavailable, configured_default)

    def all_versions(self) -> list[ModelVersion]:
        return [v for entry in self.models.values() for v in entry.versions.values()]

    def without(self, failed: dict[VersionKey, str]) -> Repository:
        """This repository less the versions in `failed` (key -> reason), which become
        unavailable: a version whose sessions could not be made, or that keeps failing."""
        models: dict[str, ModelEntry] = {}
        unavailable = dict(self.unavailable)
        for name, entry in self.models.items():
            kept = {v: mv for v, mv in entry.versions.items() if (name, v) not in failed}
            if kept:
                models[name] = replace(entry, versions=kept)
        for (name, version), reason in failed.items():
            unavailable[(name, version)] = Unavailable(name, version, reason)
        default = _default(models, unavailable, self.configured_default)
        return Repository(models, default, unavailable, self.configured_default)


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


class _UnservableError(Exception):
    """A model folder or version that cannot be served; the message is the reason."""


def _check_sha256(path: Path, expected: str) -> None:
    actual = sha256_of(path)
    if actual != expected:
        raise _UnservableError(
            f"{path} has sha256 {actual} but {SPEC_FILENAME} says {expected}: "
            "the graph was changed or corrupted after export; re-export it"
        )


def _within(path: Path, root: Path) -> bool:
    # A symlinked folder may live elsewhere on purpose, but never outside the repository root.
    return path.resolve().is_relative_to(root.resolve())


def _fingerprint(spec: ModelSpec, files: GraphFiles) -> str:
    text = spec.model_dump_json(exclude={"versions"}) + files.model + (files.rollout or "")
    return hashlib.sha256(text.encode()).hexdigest()


def _load_version(folder: Path, root: Path, spec: ModelSpec, version: int) -> ModelVersion:
    graph = folder / GRAPH_FILENAME
    files = spec.versions.get(version)
    if files is None:
        raise _UnservableError(
            f"{folder} has no sha256 in {SPEC_FILENAME} (versions: {sorted(spec.versions)}): "
            "re-export it"
        )
    if not graph.is_file():
        raise _UnservableError(f"{graph} is missing")
    if not _within(graph, root):
        raise _UnservableError(f"{graph} resolves outside the model repository {root}")
    _check_sha256(graph, files.model)
    rollout: Path | None = folder / ROLLOUT_GRAPH_FILENAME
    assert rollout is not None
    if files.rollout is None or not rollout.is_file():
        if files.rollout is not None or rollout.exists():
            log.warning("%s: rollout graph or its sha256 missing; serving logits only", folder)
        rollout = None
    else:
        _check_sha256(rollout, files.rollout)
    return ModelVersion(spec, version, graph, rollout, _fingerprint(spec, files))


def _problem(exc: Exception) -> str:
    """One line for /models: pydantic's own message spans lines and repeats the input."""
    if isinstance(exc, ValidationError):
        return "; ".join(
            ".".join(str(part) for part in error["loc"]) + ": " + error["msg"]
            if error["loc"]
            else error["msg"]
            for error in exc.errors()
        )
    return str(exc)


def _scan_model(folder: Path, root: Path) -> tuple[ModelEntry | None, list[Unavailable]]:
    """One model folder: its servable versions, and what cannot be served and why."""
    name = folder.name
    try:
        spec = ModelSpec.load(folder / SPEC_FILENAME)
    except (OSError, ValueError, ValidationError) as exc:
        reason = f"{folder / SPEC_FILENAME} is invalid: {_problem(exc)}"
        return None, [Unavailable(name, None, reason)]
    if spec.name != name:
        reason = (
            f"{folder / SPEC_FILENAME} names the model '{spec.name}' but its folder is '{name}'"
        )
        return None, [Unavailable(name, None, reason)]
    versions: dict[int, ModelVersion] = {}
    unavailable: list[Unavailable] = []
    folders = {
        int(c.name): c for c in folder.iterdir() if c.is_dir() and _VERSION.fullmatch(c.name)
    }
    for version in sorted(set(folders) | set(spec.versions)):
        child = folders.get(version)
        if child is None:
            log.warning("model %s: version %d is listed in %s but absent", name, version, folder)
            continue
        try:
            versions[version] = _load_version(child, root, spec, version)
        except (_UnservableError, OSError) as exc:
            unavailable.append(Unavailable(name, version, str(exc)))
    if not versions and not unavailable:
        reason = f"{folder} has no integer version folder with a {GRAPH_FILENAME}"
        unavailable.append(Unavailable(name, None, reason))
    return (ModelEntry(spec, versions) if versions else None), unavailable


def _default(
    models: dict[str, ModelEntry],
    unavailable: dict[tuple[str, int | None], Unavailable],
    configured: str | None,
) -> str | None:
    if configured is not None:
        return configured
    names = set(models) or {u.model for u in unavailable.values()}
    return min(names) if names else None


def scan_repository(root: Path, default_model: str | None = None) -> Repository:
    """Every model under `root`, served or unavailable with its reason.

    RepositoryError only when `root` is not a folder or the configured default model is not in
    it: mistakes in the configuration, not in a model.
    """
    if not root.is_dir():
        raise RepositoryError(f"model repository {root} is not a folder")
    models: dict[str, ModelEntry] = {}
    unavailable: dict[tuple[str, int | None], Unavailable] = {}
    for folder in sorted(root.iterdir()):
        if not folder.is_dir() or folder.name.startswith("."):
            continue
        if not _NAME.fullmatch(folder.name):
            log.warning("skipping %s: a model name must match %s", folder, MODEL_NAME_PATTERN)
            continue
        if not (folder / SPEC_FILENAME).is_file():
            log.warning("skipping %s: no %s", folder, SPEC_FILENAME)
            continue
        if not _within(folder, root):
            reason = f"{folder} resolves outside the model repository {root}"
            unavailable[(folder.name, None)] = Unavailable(folder.name, None, reason)
            continue
        entry, failures = _scan_model(folder, root)
        if entry is not None:
            models[folder.name] = entry
        for failure in failures:
            unavailable[(failure.model, failure.version)] = failure
    known = set(models) | {u.model for u in unavailable.values()}
    if default_model is not None and default_model not in known:
        raise RepositoryError(
            f"default model '{default_model}' is not in {root}; found: {', '.join(sorted(known))}"
        )
    for entry in models.values():
        log.info(
            "model %s: versions %s (default %d)",
            entry.spec.name,
            sorted(entry.versions),
            entry.default_version,
        )
    for failure in unavailable.values():
        log.error("%s is not ready: %s", failure.shown, failure.reason)
    if not models:
        log.error("no model in %s can be served", root)
    return Repository(
        models, _default(models, unavailable, default_model), unavailable, default_model
    )


def signature(root: Path) -> tuple[tuple[str, int, int], ...]:
    """(path, size, mtime) of every model.json and graph under `root`: cheap to poll, and it
    changes whenever a model or version is added, removed or rewritten."""
    found: list[tuple[str, int, int]] = []
    for pattern in (f"*/{SPEC_FILENAME}", "*/*/*.onnx"):
        for path in root.glob(pattern):
            try:
                stat = path.stat()
            except OSError:  # removed while we looked: the next poll sees it gone
                continue
            found.append((str(path.relative_to(root)), stat.st_size, stat.st_mtime_ns))
    return tuple(sorted(found))
