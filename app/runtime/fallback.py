"""The service's own provider fallback: TensorRT -> CUDA -> CPU, each step logged with why.

ONNX Runtime's fallback is off (`open_placed_session`); here a graph that fails on one provider
is opened on the next, and its placement says what it wanted and why it runs elsewhere.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from app.runtime import native
from app.runtime import providers as prov
from app.runtime.backends import OnnxBackend, OnnxRolloutBackend, RuntimeLoadError
from app.runtime.placement import ExecutionPlan
from app.runtime.providers import CPU, Placement

log = logging.getLogger(__name__)

B = TypeVar("B", OnnxBackend, OnnxRolloutBackend)


@dataclass(frozen=True)
class Fallback:
    """One step down the provider chain for one graph."""

    provider: str  # the provider tried
    reason: str
    next: list[str]  # what is tried next


def open_on_best(
    make: Callable[[list[str]], B], plan: ExecutionPlan, graph: str
) -> tuple[B, list[Fallback]]:
    """`make(providers)` (a backend, warmed up) on the plan's providers, and on failure down
    `fallback_chain` (TensorRT -> CUDA -> CPU); each step logged as a JSON line with its reason
    (`provider_fallback`). The backend's placement is then marked with the provider the graph
    wanted and, where it runs elsewhere, why: the steps', or the plan's reason for a provider it
    could not offer, or ONNX Runtime having assigned it nothing. Raises the CPU's error when even
    the CPU cannot run the graph.
    """
    steps: list[Fallback] = []
    chain = prov.fallback_chain(plan.providers)
    for i, providers in enumerate(chain):
        try:
            backend = make(providers)
        except RuntimeLoadError as exc:
            if i == len(chain) - 1:
                raise
            error = _first_line(str(exc))
            known = plan.problems.get(providers[0])
            step = Fallback(providers[0], f"{known}; {error}" if known else error, chain[i + 1])
            steps.append(step)
            log.warning(
                "%s: %s failed, trying %s: %s",
                graph,
                step.provider,
                step.next,
                step.reason,
                extra={
                    "event": "provider_fallback",
                    "graph": graph,
                    "provider": step.provider,
                    "next": step.next,
                    "reason": step.reason,
                },
            )
            continue
        # Besides the steps: a provider ONNX Runtime dropped without an error (its libraries
        # did not load), or the wanted one never offered (no driver, no libraries).
        silent = None
        if backend.placement.provider != providers[0]:
            silent = f"{providers[0]}: {plan.problems.get(providers[0], _NOTHING_ASSIGNED)}"
        elif plan.wanted not in providers and not steps:
            silent = f"{plan.wanted}: {plan.problems.get(plan.wanted, 'not offered to it')}"
        reasons = [f"{s.provider}: {s.reason}" for s in steps] + ([silent] if silent else [])
        backend.placement = backend.placement.with_fallback(plan.wanted, "; ".join(reasons) or None)
        if silent is not None and backend.placement.fallback is not None:
            # On a machine without a driver (onnxruntime-gpu on a CPU) this is expected: info.
            log.log(
                logging.WARNING if native.driver_present() else logging.INFO,
                "%s: wanted %s, running on %s: %s",
                graph,
                plan.wanted,
                backend.placement.provider,
                silent,
                extra={
                    "event": "provider_fallback",
                    "graph": graph,
                    "provider": plan.wanted,
                    "running_on": backend.placement.provider,
                    "reason": silent,
                },
            )
        return backend, steps
    raise AssertionError("the fallback chain ends on the CPU")  # pragma: no cover


_NOTHING_ASSIGNED = "ONNX Runtime assigned it none of the graph's arithmetic"


def _first_line(text: str) -> str:
    line = text.strip().splitlines()[0] if text.strip() else text
    return line[:500]


def placement_of(backend: object) -> Placement:
    """Where a backend's graph runs: its recorded placement, or (a backend that keeps none, as
    a test's fake) the provider it reports."""
    placement = getattr(backend, "placement", None)
    if isinstance(placement, Placement):
        return placement
    inner = getattr(backend, "inner", None)
    if inner is not None:
        return placement_of(inner)
    return Placement(str(getattr(backend, "provider", CPU)))


def placements_of(backend: object) -> list[Placement]:
    """Every session of a backend (TensorRT's and the CUDA one beside it)."""
    found = getattr(backend, "placements", None)
    if isinstance(found, list) and all(isinstance(p, Placement) for p in found):
        return list(found)
    inner = getattr(backend, "inner", None)
    if inner is not None:
        return placements_of(inner)
    return [placement_of(backend)]
