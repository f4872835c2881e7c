"""ONNX Runtime sessions: one per graph of each model version, on the best provider that works."""

from __future__ import annotations

import ctypes
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import onnxruntime as ort
from numpy.typing import NDArray

from app.core.settings import Settings
from app.models import providers as prov
from app.models.providers import CPU as CPU  # re-exported: callers name providers from here too
from app.models.providers import CUDA as CUDA
from app.models.providers import GPU_PROVIDERS, Profile, TensorrtConfig
from app.models.providers import TENSORRT as TENSORRT
from app.models.repository import ModelVersion
from app.models.spec import ModelSpec, RolloutParams

log = logging.getLogger(__name__)


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


def _loads(*names: str) -> bool:
    for name in names:
        try:
            ctypes.CDLL(name)
        except OSError:
            continue
        return True
    return False


def _cuda_driver_present() -> bool:
    # onnxruntime-gpu lists the CUDA and TensorRT providers on every machine and, without a
    # driver, prints a page of errors before falling back; a missing libcuda settles it quietly.
    return _loads("libcuda.so.1")


def _tensorrt_libraries_present() -> bool:
    # The same for TensorRT, whose libraries are a separate install (the CUDA image may lack
    # them): without libnvinfer ONNX Runtime logs a failure per session and drops TensorRT.
    return _loads("libnvinfer.so.10", "libnvinfer.so.8")


def candidate_providers(requested: list[str] | None, takes_tensorrt: bool = False) -> list[str]:
    """The providers to try for a graph, best first; CPU is always the last resort.

    Without an explicit list: TensorRT, CUDA, CPU, as far as the driver, the libraries and
    this ONNX Runtime build allow. TensorRT only for a graph that `takes_tensorrt`
    (`app.models.providers.takes_tensorrt`) and whose session is given TensorRT's options
    (`execution_plan`): without explicit profiles it would rebuild its engine per new grid.
    """
    available = ort.get_available_providers()
    if requested is not None:
        unknown = [p for p in requested if p not in available]
        if unknown:
            log.warning("providers %s are not in this ONNX Runtime build (%s)", unknown, available)
    driver = _cuda_driver_present()
    return prov.candidate_providers(
        requested,
        available,
        driver=driver,
        tensorrt_libraries=takes_tensorrt and driver and _tensorrt_libraries_present(),
        takes_tensorrt=takes_tensorrt,
    )


@dataclass(frozen=True)
class ExecutionPlan:
    """How one graph of one version is to be run: providers with their options."""

    providers: list[str]
    options: dict[str, dict[str, str]]
    profile: Profile | None  # TensorRT's, where TensorRT is offered
    optimization: str  # the graph's form, from model.json

    def describe(self, provider: str) -> str:
        """For the log line of a loaded graph: the provider in use and what matters of it."""
        shown = prov.options_shown(provider, self.options)
        return f"{provider} ({shown})" if shown else provider


def execution_plan(settings: Settings, version: ModelVersion, rollout: bool) -> ExecutionPlan:
    """Providers and options for a version's plain (`rollout` False) or rollout graph."""
    spec = version.spec
    files = spec.versions.get(version.version)
    level = prov.graph_form(spec, version.version)
    providers = candidate_providers(settings.providers, prov.takes_tensorrt(level, rollout))
    tensorrt = None
    profile = None
    if TENSORRT in providers and files is not None:
        arch = spec.architecture
        profile = prov.served_profile(
            arch,
            settings.fit_max_tokens or 2 * arch.native_tokens,
            settings.max_batch_size,
            settings.batch_tokens(gpu=True),
        )
        key = prov.tensorrt_options_key(profile, settings.trt_fp16)
        tensorrt = TensorrtConfig(
            input_name=spec.input_name,
            profile=profile,
            fp16=settings.trt_fp16,
            cache_root=settings.trt_cache_dir,
            engine_dir=prov.engine_cache_dir(
                settings.trt_cache_dir, spec.name, version.version, files.model, key
            ),
        )
    return ExecutionPlan(providers, prov.provider_options(providers, tensorrt), profile, level)


def open_session(
    graph: Path,
    providers: list[str],
    intra_op_threads: int = 0,
    spinning: bool = False,
    options: Mapping[str, dict[str, str]] | None = None,
) -> tuple[ort.InferenceSession, str]:
    """A session on the first of `providers` that really works, and that provider's name.

    `spinning`: let ORT's intra-op threads spin-wait for work after each run. A benchmark of
    one session alone gains a little from it; a server loses more, because the spinning threads
    burn the cores that decoding and the event loop need between batches. `options`: per
    provider (`app.models.providers.provider_options`).
    """
    session_options = ort.SessionOptions()
    session_options.intra_op_num_threads = intra_op_threads
    session_options.add_session_config_entry(
        "session.intra_op.allow_spinning", "1" if spinning else "0"
    )
    session_options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if options is not None and TENSORRT in providers and TENSORRT in options:
        # TensorRT creates its cache directories only one level deep.
        Path(options[TENSORRT]["trt_engine_cache_path"]).mkdir(parents=True, exist_ok=True)
    per_provider = [dict((options or {}).get(p, {})) for p in providers]
    try:
        session = ort.InferenceSession(
            str(graph), session_options, providers=providers, provider_options=per_provider
        )
    except Exception as exc:  # ORT raises its own untyped errors (Fail, InvalidGraph, ...)
        raise RuntimeLoadError(f"could not load {graph}: {exc}") from exc
    # ORT silently drops a provider whose libraries fail to load: ask what it really uses.
    provider = str(session.get_providers()[0])
    if providers[0] != provider:
        log.warning("%s: wanted %s, running on %s", graph, providers[0], provider)
    return session, provider


def run_session(
    session: ort.InferenceSession,
    feeds: Mapping[str, NDArray[Any]],
    outputs: list[str],
    device: str | None,
) -> list[NDArray[Any]]:
    """Run `session`; with a `device` ("cuda", or "cpu" to test the path), through IO binding.

    Bound, the host inputs are copied to the device once, by ONNX Runtime on its stream, and
    each output is allocated on `device` and copied back once: the copies `session.run` makes
    as well, but explicit, so none is added (the patches go up as uint8, 4x smaller than
    float32, the logits come down as batch x classes floats), and the place where inputs
    already on the device (a GPU decoder) would be bound instead.
    """
    if device is None:
        return list(session.run(outputs, dict(feeds)))
    binding = session.io_binding()
    for name, array in feeds.items():
        binding.bind_cpu_input(name, np.ascontiguousarray(array))
    for name in outputs:
        binding.bind_output(name, device, prov.DEVICE_ID)
    session.run_with_iobinding(binding)
    return list(binding.copy_outputs_to_cpu())


def _binding_device(provider: str, io_binding: bool | None) -> str | None:
    """Where outputs are bound: the GPU for GPU providers; None (plain run) on the CPU, unless
    `io_binding` forces the bound path there (tests)."""
    if io_binding is False:
        return None
    if provider in GPU_PROVIDERS:
        return "cuda"
    return "cpu" if io_binding else None


class OnnxBackend:
    """One InferenceSession for one model version's graph.

    On TensorRT, batches whose shape its profile leaves out (grids of images wider than 4:1,
    see `app.models.providers.served_profile`) run on a second session of the same graph on the
    providers after TensorRT (CUDA), so no grid ever waits for an engine build or fails.
    """

    def __init__(
        self,
        graph: Path,
        spec: ModelSpec,
        providers: list[str],
        intra_op_threads: int = 0,
        spinning: bool = False,
        *,
        options: Mapping[str, dict[str, str]] | None = None,
        profile: Profile | None = None,
        io_binding: bool | None = None,
    ) -> None:
        self.spec = spec
        self._session, self._provider = open_session(
            graph, providers, intra_op_threads, spinning, options
        )
        self._input = spec.input_name
        self._output = spec.outputs[0].name
        self._device = _binding_device(self._provider, io_binding)
        self._profile = profile if self._provider == TENSORRT else None
        self._outside: tuple[ort.InferenceSession, str | None] | None = None
        if self._profile is not None:
            rest = [p for p in providers if p != TENSORRT]
            session, provider = open_session(graph, rest, intra_op_threads, spinning, options)
            self._outside = (session, _binding_device(provider, io_binding))

    @property
    def provider(self) -> str:
        return self._provider

    @property
    def io_binding(self) -> bool:
        return self._device is not None

    def run(self, patches: NDArray[np.uint8]) -> NDArray[np.float32]:
        session, device = self._session, self._device
        if self._outside is not None and not self._profile_covers(patches.shape):
            session, device = self._outside
        (logits,) = run_session(session, {self._input: patches}, [self._output], device)
        return np.asarray(logits, dtype=np.float32)

    def _profile_covers(self, shape: tuple[int, ...]) -> bool:
        return self._profile is None or self._profile.covers(shape)

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
        *,
        options: Mapping[str, dict[str, str]] | None = None,
        io_binding: bool | None = None,
    ) -> None:
        if spec.rollout is None:
            raise RuntimeLoadError(f"{graph}: model.json of {spec.name} has no rollout contract")
        self.spec = spec
        contract = spec.rollout
        # The contract's order: inputs (patches, head_fusion, discard_ratio), outputs (logits,
        # rollout); `app.models.spec.rollout_contract` writes them so.
        self._patches, self._fusion, self._ratio = (t.name for t in contract.inputs)
        self._outputs = [t.name for t in contract.outputs]
        self._fusion_index = {name: i for i, name in enumerate(contract.head_fusions)}
        self._session, self._provider = open_session(
            graph, providers, intra_op_threads, spinning, options
        )
        self._device = _binding_device(self._provider, io_binding)

    @property
    def provider(self) -> str:
        return self._provider

    def run(
        self, patches: NDArray[np.uint8], params: RolloutParams
    ) -> tuple[NDArray[np.float32], NDArray[np.float32]]:
        feeds: dict[str, NDArray[Any]] = {
            self._patches: patches,
            self._fusion: np.array(self._fusion_index[params.head_fusion], dtype=np.int64),
            self._ratio: np.array(params.discard_ratio, dtype=np.float32),
        }
        logits, rollout = run_session(self._session, feeds, self._outputs, self._device)
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
