"""ONNX Runtime sessions: one per graph of each model version, on the best provider that works."""

from __future__ import annotations

import ctypes
import logging
from pathlib import Path
from typing import Protocol

import numpy as np
import onnxruntime as ort
from numpy.typing import NDArray

from app.rollout import RolloutParams
from app.spec import ModelSpec

log = logging.getLogger(__name__)

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
TENSORRT = "TensorrtExecutionProvider"


class Backend(Protocol):
    """What the batcher runs: a batch of patch grids in, a batch of logits out."""

    @property
    def provider(self) -> str: ...

    def run(self, patches: NDArray[np.uint8]) -> NDArray[np.float32]:
        """(B, grid_h, grid_w, P*P*C) uint8 -> (B, num_classes) float32 logits."""
        ...


class RolloutBackend(Protocol):
    """The rollout graph: logits and the class token's rolled-out attention over the grid."""

    @property
    def provider(self) -> str: ...

    def run(
        self, patches: NDArray[np.uint8], params: RolloutParams
    ) -> tuple[NDArray[np.float32], NDArray[np.float32]]:
        """(B, grid_h, grid_w, P*P*C) uint8 -> (B, num_classes) logits, (B, grid_h, grid_w)."""
        ...


class RuntimeLoadError(RuntimeError):
    """A graph could not be loaded into ONNX Runtime."""


def _cuda_driver_present() -> bool:
    # onnxruntime-gpu lists the CUDA and TensorRT providers on every machine and, without a
    # driver, prints a page of errors before falling back; a missing libcuda settles it quietly.
    try:
        ctypes.CDLL("libcuda.so.1")
    except OSError:
        return False
    return True


def candidate_providers(requested: list[str] | None) -> list[str]:
    """The providers to try, best first; CPU is always the last resort.

    Without an explicit list: CUDA when a driver is present, then CPU. TensorRT is opt-in
    (name it in the list): it builds an engine per input shape range, and the `fit` policy sends
    many grids, so each new grid could stall a request for the length of an engine build.
    """
    available = ort.get_available_providers()
    if requested is not None:
        unknown = [p for p in requested if p not in available]
        if unknown:
            log.warning("providers %s are not in this ONNX Runtime build (%s)", unknown, available)
        chosen = [p for p in requested if p in available]
    else:
        chosen = [CUDA] if CUDA in available and _cuda_driver_present() else []
    if CPU not in chosen:
        chosen.append(CPU)
    return chosen


def open_session(
    graph: Path, providers: list[str], intra_op_threads: int = 0, spinning: bool = False
) -> tuple[ort.InferenceSession, str]:
    """A session on the first of `providers` that really works, and that provider's name.

    `spinning`: let ORT's intra-op threads spin-wait for work after each run. A benchmark of
    one session alone gains a little from it; a server loses more, because the spinning threads
    burn the cores that decoding and the event loop need between batches.
    """
    options = ort.SessionOptions()
    options.intra_op_num_threads = intra_op_threads
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    try:
        session = ort.InferenceSession(str(graph), options, providers=providers)
    except Exception as exc:  # ORT raises its own untyped errors (Fail, InvalidGraph, ...)
        raise RuntimeLoadError(f"could not load {graph}: {exc}") from exc
    # ORT silently drops a provider whose libraries fail to load: ask what it really uses.
    provider = str(session.get_providers()[0])
    if providers[0] != provider:
        log.warning("%s: wanted %s, running on %s", graph, providers[0], provider)
    return session, provider


class OnnxBackend:
    """One InferenceSession for one model version's graph."""

    def __init__(
        self,
        graph: Path,
        spec: ModelSpec,
        providers: list[str],
        intra_op_threads: int = 0,
        spinning: bool = False,
    ) -> None:
        self.spec = spec
        self._session, self._provider = open_session(graph, providers, intra_op_threads, spinning)
        self._input = spec.input_name
        self._output = spec.outputs[0].name

    @property
    def provider(self) -> str:
        return self._provider

    def run(self, patches: NDArray[np.uint8]) -> NDArray[np.float32]:
        (logits,) = self._session.run([self._output], {self._input: patches})
        return np.asarray(logits, dtype=np.float32)

    def warm_up(self, grid: tuple[int, int] | None = None, batch: int = 1) -> None:
        """Run once so the first request does not pay for allocations and kernel selection."""
        gh, gw = grid or self.spec.architecture.grid
        patches = np.zeros((batch, gh, gw, self.spec.architecture.patch_dim), dtype=np.uint8)
        logits = self.run(patches)
        expected = (batch, self.spec.architecture.num_classes)
        if logits.shape != expected:
            raise RuntimeLoadError(
                f"model {self.spec.name}: the graph returns logits of shape {logits.shape}, "
                f"model.json promises {expected}"
            )


class OnnxRolloutBackend:
    """One InferenceSession for one model version's rollout graph (`model.rollout.onnx`)."""

    def __init__(
        self,
        graph: Path,
        spec: ModelSpec,
        providers: list[str],
        intra_op_threads: int = 0,
        spinning: bool = False,
    ) -> None:
        if spec.rollout is None:
            raise RuntimeLoadError(f"{graph}: model.json of {spec.name} has no rollout contract")
        self.spec = spec
        contract = spec.rollout
        # The contract's order: inputs (patches, head_fusion, discard_ratio), outputs (logits,
        # rollout); `app.spec.rollout_contract` writes them so.
        self._patches, self._fusion, self._ratio = (t.name for t in contract.inputs)
        self._outputs = [t.name for t in contract.outputs]
        self._fusion_index = {name: i for i, name in enumerate(contract.head_fusions)}
        self._session, self._provider = open_session(graph, providers, intra_op_threads, spinning)

    @property
    def provider(self) -> str:
        return self._provider

    def run(
        self, patches: NDArray[np.uint8], params: RolloutParams
    ) -> tuple[NDArray[np.float32], NDArray[np.float32]]:
        feeds = {
            self._patches: patches,
            self._fusion: np.array(self._fusion_index[params.head_fusion], dtype=np.int64),
            self._ratio: np.array(params.discard_ratio, dtype=np.float32),
        }
        logits, rollout = self._session.run(self._outputs, feeds)
        return np.asarray(logits, dtype=np.float32), np.asarray(rollout, dtype=np.float32)

    def warm_up(self, grid: tuple[int, int] | None = None, batch: int = 1) -> None:
        """Run once, as the plain graph is, and check both outputs' shapes."""
        gh, gw = grid or self.spec.architecture.grid
        patches = np.zeros((batch, gh, gw, self.spec.architecture.patch_dim), dtype=np.uint8)
        logits, rollout = self.run(patches, RolloutParams())
        expected = [(batch, self.spec.architecture.num_classes), (batch, gh, gw)]
        got = [logits.shape, rollout.shape]
        if got != expected:
            raise RuntimeLoadError(
                f"model {self.spec.name}: the rollout graph returns outputs of shapes {got}, "
                f"model.json promises {expected}"
            )
