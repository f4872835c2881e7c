"""What a reload changes: the pure plan from what is served and what a fresh scan found.

A version is loaded when it is new, when its graphs or spec changed (its fingerprint), or when
it was taken out for failing; kept when nothing changed; unloaded when its folder is gone. A
version that serves now and whose new files cannot be served (a half-copied graph, a broken
model.json) keeps serving from memory: a bad push never takes down a working version.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from app.models.repository import ModelVersion, Repository, Unavailable, VersionKey


@dataclass(frozen=True)
class ReloadPlan:
    load: list[ModelVersion] = field(default_factory=list)  # new or changed: make sessions
    keep: list[ModelVersion] = field(default_factory=list)  # served as they are
    unload: list[VersionKey] = field(
        default_factory=list
    )  # gone from the repository: drain, release
    # Served now, broken on disk: kept serving from memory, and reported.
    kept_despite: list[Unavailable] = field(default_factory=list)


def plan_reload(
    served: Repository, loaded: dict[VersionKey, str], scanned: Repository
) -> ReloadPlan:
    """`served`: what requests resolve now; `loaded`: fingerprints of every version that has
    sessions (including versions marked not ready); `scanned`: the repository on disk now."""
    now = {mv.key: mv for mv in served.all_versions()}
    plan = ReloadPlan()
    on_disk: set[VersionKey] = set()
    for mv in scanned.all_versions():
        on_disk.add(mv.key)
        current = now.get(mv.key)
        if current is not None and current.fingerprint == mv.fingerprint:
            plan.keep.append(current)
        else:
            plan.load.append(mv)
    for failure in scanned.unavailable.values():
        # A failure names one version, or (version None) a whole model whose model.json broke.
        hits = [
            current
            for key, current in now.items()
            if key not in on_disk and key[0] == failure.model and failure.version in (None, key[1])
        ]
        for current in hits:
            on_disk.add(current.key)
            plan.keep.append(current)
        if hits:
            plan.kept_despite.append(failure)
    plan.unload.extend(key for key in loaded if key not in on_disk)
    return plan
