"""ONNX Runtime sessions: one per model version, on the best provider that really works."""

from __future__ import annotations

import ctypes
import logging
from pathlib import Path
from typing import Protocol

import numpy as np
import onnxruntime as ort
from numpy.typing import NDArray

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


class OnnxBackend:
    """One InferenceSession for one model version's graph."""

    def __init__(
        self,
        graph: Path,
        spec: ModelSpec,
        providers: list[str],
        intra_op_threads: int = 0,
    ) -> None:
        self.spec = spec
        options = ort.SessionOptions()
        options.intra_op_num_threads = intra_op_threads
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        try:
            self._session = ort.InferenceSession(str(graph), options, providers=providers)
        except Exception as exc:  # ORT raises its own untyped errors (Fail, InvalidGraph, ...)
            raise RuntimeLoadError(f"could not load {graph}: {exc}") from exc
        # ORT silently drops a provider whose libraries fail to load: ask what it really uses.
        in_use = self._session.get_providers()
        self._provider = str(in_use[0])
        if providers[0] != self._provider:
            log.warning("%s: wanted %s, running on %s", graph, providers[0], self._provider)
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
