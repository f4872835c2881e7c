"""The model repository: `<root>/<name>/model.json` plus integer version folders, checked at start.

Requests never touch the file system: a model name from a request is only ever a key into the
table built here, so it cannot name a path.
"""

from __future__ import annotations

import hashlib
import logging
import re
from dataclasses import dataclass
from pathlib import Path

from pydantic import ValidationError

from app.spec import (
    GRAPH_FILENAME,
    MODEL_NAME_PATTERN,
    ROLLOUT_GRAPH_FILENAME,
    SPEC_FILENAME,
    GraphFiles,
    ModelSpec,
)

log = logging.getLogger(__name__)

_NAME = re.compile(MODEL_NAME_PATTERN)


class RepositoryError(RuntimeError):
    """The model repository cannot be served as it is (the service refuses to start)."""


class UnknownModelError(LookupError):
    """A request named a model or version that is not served."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


@dataclass(frozen=True)
class ModelVersion:
    spec: ModelSpec
    version: int
    graph_path: Path
    rollout_path: Path | None = None  # the same weights with the rollout output, when exported

    @property
    def name(self) -> str:
        return self.spec.name


@dataclass(frozen=True)
class ModelEntry:
    spec: ModelSpec
    versions: dict[int, ModelVersion]

    @property
    def default_version(self) -> int:
        return max(self.versions)


@dataclass(frozen=True)
class Repository:
    models: dict[str, ModelEntry]
    default_model: str

    def resolve(self, name: str | None, version: int | None) -> ModelVersion:
        """The version a request asks for; UnknownModelError (a 404) when it is not served."""
        name = self.default_model if name is None else name
        entry = self.models.get(name)
        if entry is None:
            shown = name if _NAME.fullmatch(name) and len(name) <= 100 else "(invalid name)"
            raise UnknownModelError(
                f"unknown model '{shown}'; served models: {', '.join(sorted(self.models))}"
            )
        if version is None:
            version = entry.default_version
        found = entry.versions.get(version)
        if found is None:
            served = ", ".join(str(v) for v in sorted(entry.versions))
            raise UnknownModelError(
                f"model '{name}' has no version {version}; served versions: {served}"
            )
        return found

    def all_versions(self) -> list[ModelVersion]:
        return [v for entry in self.models.values() for v in entry.versions.values()]


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def check_sha256(path: Path, expected: str) -> None:
    actual = sha256_of(path)
    if actual != expected:
        raise RepositoryError(
            f"{path} has sha256 {actual} but {SPEC_FILENAME} says {expected}: "
            "the graph was changed or corrupted after export"
        )


def _within(path: Path, root: Path) -> bool:
    # A symlinked folder may live elsewhere on purpose, but never outside the repository root.
    return path.resolve().is_relative_to(root.resolve())


def _rollout_graph(folder: Path, files: GraphFiles) -> Path | None:
    """The version's rollout graph, checked, or None when it was not exported."""
    path = folder / ROLLOUT_GRAPH_FILENAME
    if files.rollout is None or not path.is_file():
        if files.rollout is not None or path.exists():
            log.warning("%s: rollout graph or its sha256 missing; serving logits only", folder)
        return None
    check_sha256(path, files.rollout)
    return path


def load_model(folder: Path, root: Path) -> ModelEntry:
    """Read one model folder: its spec and every integer version whose graph matches its sha256."""
    try:
        spec = ModelSpec.load(folder / SPEC_FILENAME)
    except (OSError, ValueError, ValidationError) as exc:
        raise RepositoryError(f"{folder / SPEC_FILENAME}: {exc}") from exc
    if spec.name != folder.name:
        raise RepositoryError(
            f"{folder / SPEC_FILENAME} names the model '{spec.name}' but its folder is "
            f"'{folder.name}'"
        )
    versions: dict[int, ModelVersion] = {}
    for child in sorted(folder.iterdir()):
        # Canonical ASCII integers only: "01", "+1" or "１" would be second names for a version.
        if not child.is_dir() or not re.fullmatch(r"0|[1-9][0-9]*", child.name):
            continue
        version = int(child.name)
        graph = child / GRAPH_FILENAME
        if not graph.is_file():
            log.warning("skipping %s: no %s in it", child, GRAPH_FILENAME)
            continue
        if not _within(graph, root):
            raise RepositoryError(f"{graph} resolves outside the model repository {root}")
        files = spec.versions.get(version)
        if files is None:
            raise RepositoryError(
                f"{graph} has no sha256 in {folder / SPEC_FILENAME} (versions: "
                f"{sorted(spec.versions)}): re-export it"
            )
        check_sha256(graph, files.model)
        versions[version] = ModelVersion(
            spec=spec, version=version, graph_path=graph, rollout_path=_rollout_graph(child, files)
        )
    for missing in sorted(set(spec.versions) - set(versions)):
        log.warning("model %s: version %d is listed in %s but absent", spec.name, missing, folder)
    if not versions:
        raise RepositoryError(f"{folder} has no integer version folder with a {GRAPH_FILENAME}")
    return ModelEntry(spec=spec, versions=versions)


def scan_repository(root: Path, default_model: str | None = None) -> Repository:
    """Load every model under `root`; RepositoryError when nothing valid can be served."""
    if not root.is_dir():
        raise RepositoryError(f"model repository {root} is not a folder")
    models: dict[str, ModelEntry] = {}
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
            raise RepositoryError(f"{folder} resolves outside the model repository {root}")
        models[folder.name] = load_model(folder, root)
    if not models:
        raise RepositoryError(f"no models in {root} (expected <name>/{SPEC_FILENAME})")
    if default_model is None:
        default_model = min(models)
    elif default_model not in models:
        raise RepositoryError(
            f"default model '{default_model}' is not in {root}; found: {', '.join(sorted(models))}"
        )
    for entry in models.values():
        log.info(
            "model %s: versions %s (default %d)",
            entry.spec.name,
            sorted(entry.versions),
            entry.default_version,
        )
    return Repository(models=models, default_model=default_model)
