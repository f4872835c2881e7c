"""ONNX Runtime sessions: one per graph of each model version, on the best provider that works.

"Works" is checked, not assumed: ONNX Runtime's own fallback (its Python wrapper re-creating a
failed session on other providers and printing why to stdout) is off, the service moves down
TensorRT -> CUDA -> CPU itself and logs each step's reason (`open_on_best`), and where a session
runs is read from ONNX Runtime's record of which provider each node was assigned to
(`Placement`), not from the providers it was offered.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import onnxruntime as ort
from numpy.typing import NDArray

from app.models.spec import ModelSpec, RolloutParams
from app.runtime import providers as prov
from app.runtime.providers import CPU as CPU  # re-exported: callers name providers from here too
from app.runtime.providers import CUDA as CUDA
from app.runtime.providers import GPU_PROVIDERS, Placement, Profile
from app.runtime.providers import TENSORRT as TENSORRT

log = logging.getLogger(__name__)

# Session option: keep ONNX Runtime's record of which provider each node was assigned to.
RECORD_ASSIGNMENT = "session.record_ep_graph_assignment_info"


class Backend(Protocol):
    """What the batcher runs: a batch of patch grids in, a batch of logits out."""

    @property
    def provider(self) -> str: ...

    def run(self, patches: NDArray[np.uint8]) -> NDArray[np.float32]:
        """(B, grid_h, grid_w, P*P*C) uint8 -> (B, num_classes) float32 logits."""
        ...


@runtime_checkable
class DeviceInputBackend(Protocol):
    """A backend that also takes patches already on its device (the GPU decoder's)."""

    def run_device(self, patches: ort.OrtValue) -> NDArray[np.float32]:
        """An OrtValue (B, grid_h, grid_w, P*P*C) uint8 on the GPU -> (B, classes) logits."""
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


def open_placed_session(
    graph: Path,
    providers: list[str],
    intra_op_threads: int = 0,
    spinning: bool = False,
    options: Mapping[str, dict[str, str]] | None = None,
) -> tuple[ort.InferenceSession, Placement]:
    """A session on exactly `providers`, and where its nodes were placed.

    `spinning`: let ORT's intra-op threads spin-wait for work after each run. A benchmark of
    one session alone gains a little from it; a server loses more, because the spinning threads
    burn the cores that decoding and the event loop need between batches. `options`: per
    provider (`app.runtime.providers.provider_options`).

    ONNX Runtime's fallback is off (`enable_fallback=0`: neither at creation nor, later, when a
    run fails does its wrapper move the session to other providers by itself and print why to
    stdout), so a provider that fails raises RuntimeLoadError here and the caller decides
    (`open_on_best`). A provider whose libraries do not load is still dropped by ONNX Runtime
    without an error (a line on stderr): the placement shows it.
    """
    session_options = ort.SessionOptions()
    session_options.intra_op_num_threads = intra_op_threads
    session_options.add_session_config_entry(
        "session.intra_op.allow_spinning", "1" if spinning else "0"
    )
    session_options.add_session_config_entry(RECORD_ASSIGNMENT, "1")
    session_options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if options is not None and TENSORRT in providers and TENSORRT in options:
        # TensorRT creates its cache directories only one level deep.
        Path(options[TENSORRT]["trt_engine_cache_path"]).mkdir(parents=True, exist_ok=True)
    per_provider = [dict((options or {}).get(p, {})) for p in providers]
    try:
        session = ort.InferenceSession(
            str(graph),
            session_options,
            providers=providers,
            provider_options=per_provider,
            enable_fallback=0,
        )
    except Exception as exc:  # ORT raises its own untyped errors (Fail, InvalidGraph, ...)
        raise RuntimeLoadError(f"could not load {graph} on {providers}: {exc}") from exc
    return session, placement_of_session(session)


def placement_of_session(session: ort.InferenceSession) -> Placement:
    """Where ONNX Runtime put each node of `session`'s graph (its assignment record; the
    registered providers alone where this ONNX Runtime keeps none)."""
    try:
        assigned = [
            (str(sub.ep_name), str(node.op_type))
            for sub in session.get_provider_graph_assignment_info()
            for node in sub.get_nodes()
        ]
    except (AttributeError, RuntimeError):  # older releases, or recording not enabled
        assigned = []
    return Placement.of_nodes(assigned, [str(p) for p in session.get_providers()])


def open_session(
    graph: Path,
    providers: list[str],
    intra_op_threads: int = 0,
    spinning: bool = False,
    options: Mapping[str, dict[str, str]] | None = None,
) -> tuple[ort.InferenceSession, str]:
    """A session on `providers` (see `open_placed_session`) and the provider that runs its
    graph's arithmetic."""
    session, placement = open_placed_session(graph, providers, intra_op_threads, spinning, options)
    if placement.provider != providers[0]:
        log.warning("%s: wanted %s, running on %s", graph, providers[0], placement.shown())
    return session, placement.provider


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
    see `app.runtime.providers.served_profile`) run on a second session of the same graph on the
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
        self._session, self.placement = open_placed_session(
            graph, providers, intra_op_threads, spinning, options
        )
        self._input = spec.input_name
        self._output = spec.outputs[0].name
        self._device = _binding_device(self.placement.provider, io_binding)
        self._profile = profile if self.placement.provider == TENSORRT else None
        self._outside: tuple[ort.InferenceSession, str | None] | None = None
        self.outside_placement: Placement | None = None  # where grids beyond the profile run
        if self._profile is not None:
            rest = [p for p in providers if p != TENSORRT]
            session, placed = open_placed_session(graph, rest, intra_op_threads, spinning, options)
            self._outside = (session, _binding_device(placed.provider, io_binding))
            self.outside_placement = placed.with_fallback(rest[0], None)

    @property
    def provider(self) -> str:
        """The provider that runs the graph's arithmetic (`Placement.provider`)."""
        return self.placement.provider

    @property
    def placements(self) -> list[Placement]:
        """Every session's placement: this graph's, then its CUDA session beside TensorRT's."""
        return [self.placement] + ([self.outside_placement] if self.outside_placement else [])

    @property
    def io_binding(self) -> bool:
        return self._device is not None

    def run(self, patches: NDArray[np.uint8]) -> NDArray[np.float32]:
        session, device = self._session, self._device
        if self._outside is not None and not self._profile_covers(patches.shape):
            session, device = self._outside
        (logits,) = run_session(session, {self._input: patches}, [self._output], device)
        return np.asarray(logits, dtype=np.float32)

    def run_device(self, patches: ort.OrtValue) -> NDArray[np.float32]:
        """Patches the GPU decoder made, bound where they are: no copy through the host."""
        session, device = self._session, self._device
        shape = tuple(int(d) for d in patches.shape())
        if self._outside is not None and not self._profile_covers(shape):
            session, device = self._outside
        if device != "cuda":
            raise RuntimeError(f"patches on the GPU cannot feed a session on {self.provider}")
        binding = session.io_binding()
        binding.bind_ortvalue_input(self._input, patches)
        binding.bind_output(self._output, device, prov.DEVICE_ID)
        session.run_with_iobinding(binding)
        (logits,) = binding.copy_outputs_to_cpu()
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
        self._session, self.placement = open_placed_session(
            graph, providers, intra_op_threads, spinning, options
        )
        self._device = _binding_device(self.placement.provider, io_binding)

    @property
    def provider(self) -> str:
        return self.placement.provider

    @property
    def placements(self) -> list[Placement]:
        return [self.placement]

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
