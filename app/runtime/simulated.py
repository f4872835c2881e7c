"""A simulated accelerator, for benchmarks only: backends that sleep for a measured batch time.

With `VIT_SERVE_SIMULATED_CURVE` set, every model version is served by these instead of ONNX
Runtime sessions (`app.runtime.sessions.onnx_backends`). A batch sleeps as long as the curve
says a GPU took for it (`time.sleep` releases the GIL, so the rest of the process runs as it
would beside a GPU) and answers logits of the right shape, derived cheaply from the patches.
What is left to measure is the CPU the service spends around the accelerator: the front ends'
decoding, the event loop, the batcher. The answers are not a model's: never serve them.

The curve is read from a JSON file in one of two formats:

- `bench/results/gpu_check.json` (written by `python -m bench.gpu_check`): its "raw" runs, the
  first of the chosen precision (fp16 by default), each point's batch and ms_per_batch. Those
  runs are at ViT-B/16's native grid, 14x14 = 196 tokens an image (bench/gpu_graphs.SIZES).
- its own: `{"tokens_per_image": 196, "points": [[1, 1.39], [8, 1.692], ...]}`, each point a
  batch size and its milliseconds.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from app.models.repository import ModelVersion
from app.models.spec import ModelSpec, RolloutParams
from app.runtime.providers import Placement

log = logging.getLogger(__name__)

SIMULATED = "SimulatedExecutionProvider"

# bench.gpu_check times its raw runs at the graph's native grid, 224 px in 16 px patches.
GPU_CHECK_TOKENS_PER_IMAGE = 14 * 14

# The logits read every SAMPLE_STRIDE-th byte of the first SAMPLE_BYTES of an image's patches:
# enough to tell images apart, at a small fraction of summing all of them (150 KB an image at
# ViT-B/16).
SAMPLE_STRIDE = 61
SAMPLE_BYTES = 64 * 1024


class CurveError(ValueError):
    """A batch-time curve file that cannot be read."""


@dataclass(frozen=True)
class BatchCurve:
    """Measured batch times: (batch size, seconds), batch sizes ascending, at `tokens_per_image`."""

    tokens_per_image: int
    points: tuple[tuple[int, float], ...]

    def __post_init__(self) -> None:
        if self.tokens_per_image <= 0:
            raise CurveError(f"tokens_per_image must be positive, not {self.tokens_per_image}")
        if not self.points:
            raise CurveError("a batch-time curve needs at least one point")
        batches = [b for b, _ in self.points]
        if batches != sorted(set(batches)) or batches[0] <= 0:
            raise CurveError(f"batch sizes must be positive and ascending, not {batches}")
        if any(not math.isfinite(s) or s <= 0 for _, s in self.points):
            raise CurveError("batch times must be positive")

    @classmethod
    def of_points(cls, tokens_per_image: int, points: Sequence[Sequence[float]]) -> BatchCurve:
        """From [batch, milliseconds] pairs, in any order."""
        try:
            pairs = sorted((int(b), float(ms) / 1e3) for b, ms in points)
        except (TypeError, ValueError) as exc:
            raise CurveError(f"points must be [batch, ms] pairs: {exc}") from exc
        return cls(int(tokens_per_image), tuple(pairs))

    @classmethod
    def parse(cls, data: Mapping[str, Any], precision: str = "fp16") -> BatchCurve:
        """Either format (the module's docstring); `precision`: which of gpu_check's runs."""
        if "points" in data:
            return cls.of_points(data.get("tokens_per_image", 0), data["points"])
        runs = data.get("raw")
        if not isinstance(runs, list):
            raise CurveError('neither "points" nor gpu_check\'s "raw" runs found')
        for run in runs:
            if run.get("precision") == precision and run.get("points"):
                points = [(p["batch"], p["ms_per_batch"]) for p in run["points"]]
                return cls.of_points(GPU_CHECK_TOKENS_PER_IMAGE, points)
        found = sorted({str(r.get("precision")) for r in runs if r.get("points")})
        raise CurveError(f"no measured {precision} run among the raw runs (found: {found})")

    @classmethod
    def load(cls, path: Path, precision: str = "fp16") -> BatchCurve:
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise CurveError(f"cannot read the batch-time curve {path}: {exc}") from exc
        if not isinstance(data, dict):
            raise CurveError(f"{path}: a batch-time curve is a JSON object")
        return cls.parse(data, precision)

    def seconds(self, batch: int, tokens_per_image: int | None = None) -> float:
        """What a batch of `batch` images of `tokens_per_image` tokens (default: the curve's)
        takes.

        Between measured batch sizes, linear. Below the smallest, that batch's time: a GPU's
        small batches are bound by kernel launches, not work, so they cost no less. Above the
        largest, the largest's time per image: never cheaper per image than was measured.

        Images of another token count cost in proportion to their tokens. That is first order
        only: attention's share grows with the square of the tokens, but at ViT-B/16's sizes the
        projections and MLPs, linear in the tokens, take most of the time.
        """
        if batch <= 0:
            return 0.0
        (b0, s0), (bn, sn) = self.points[0], self.points[-1]
        if batch <= b0:
            base = s0
        elif batch >= bn:
            base = sn * batch / bn
        else:
            (lo, s_lo), (hi, s_hi) = next(
                (a, b) for a, b in itertools.pairwise(self.points) if a[0] <= batch <= b[0]
            )
            base = s_lo + (s_hi - s_lo) * (batch - lo) / (hi - lo)
        tokens = self.tokens_per_image if tokens_per_image is None else tokens_per_image
        return base * tokens / self.tokens_per_image


def _shift(patches: NDArray[np.uint8]) -> NDArray[np.int64]:
    """Per image, a cheap sum of a sample of its patch bytes: of its first SAMPLE_BYTES, where
    a stride over the whole image would read every cache line of it (on a GPU the host does
    not read the pixels: the simulation must not either)."""
    flat = np.ascontiguousarray(patches).reshape(len(patches), -1)[:, :SAMPLE_BYTES]
    sums: NDArray[np.int64] = flat[:, ::SAMPLE_STRIDE].sum(axis=1, dtype=np.int64)
    return sums


def simulated_logits(patches: NDArray[np.uint8], num_classes: int) -> NDArray[np.float32]:
    """(B, num_classes) float32: one fixed descending ramp, rotated per image so that its top
    class is `sum of sampled patch bytes % num_classes`. Deterministic, different for
    different images, and a gather's cost, not a model's."""
    ramp = np.linspace(1.0, -1.0, num_classes, dtype=np.float32)
    twice = np.concatenate([ramp, ramp])
    logits: NDArray[np.float32] = np.empty((len(patches), num_classes), dtype=np.float32)
    for row, top in zip(logits, _shift(patches) % num_classes, strict=True):
        # The ramp rotated right by `top`: its largest value lands at class `top`.
        row[...] = twice[num_classes - top : 2 * num_classes - top]
    return logits


def simulated_rollout(patches: NDArray[np.uint8]) -> NDArray[np.float32]:
    """(B, grid_h, grid_w) float32: 0.1 everywhere, 1 at one patch chosen like the top class."""
    batch, gh, gw = patches.shape[:3]
    maps = np.full((batch, gh * gw), 0.1, dtype=np.float32)
    maps[np.arange(batch), _shift(patches) % (gh * gw)] = 1.0
    return maps.reshape(batch, gh, gw)


class SimulatedDevice:
    """One accelerator: a batch holds it for its time, the next one starts when it is free."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._free_at = 0.0  # perf_counter time the last batch ended

    def occupy(self, seconds: float, started: float) -> None:
        """Hold the device until `seconds` after `started`, or after the batch before it ended
        if that is later. What the caller spent since `started` making the outputs counts: the
        curve's times are whole runs. Sleeping, never spinning, keeps the CPU and the GIL free
        meanwhile (a lock that waits releases the GIL too)."""
        with self._lock:
            end = max(started, self._free_at) + seconds
            left = end - time.perf_counter()
            if left > 0:
                time.sleep(left)
            self._free_at = max(end, time.perf_counter())


# One simulated accelerator per process, as one engine process owns one GPU: batches of every
# version and runtime instance take turns on it, so several lanes never add up to more than
# the curve's throughput.
DEVICE = SimulatedDevice()


def _occupy(curve: BatchCurve, patches: NDArray[np.uint8], started: float) -> None:
    batch, gh, gw = patches.shape[:3]
    DEVICE.occupy(curve.seconds(batch, gh * gw), started)


class _OnTheCurve:
    """A model version's session on the simulated accelerator: its spec, the curve, where."""

    def __init__(self, spec: ModelSpec, curve: BatchCurve) -> None:
        self.spec = spec
        self.curve = curve
        self.placement = Placement(SIMULATED, wanted=SIMULATED)

    @property
    def provider(self) -> str:
        return SIMULATED

    @property
    def placements(self) -> list[Placement]:
        return [self.placement]


class SimulatedBackend(_OnTheCurve):
    """The `Backend` of one model version on the simulated accelerator."""

    def run(self, patches: NDArray[np.uint8]) -> NDArray[np.float32]:
        """(B, grid_h, grid_w, P*P*C) uint8 -> (B, num_classes) float32, after the curve's time."""
        started = time.perf_counter()
        logits = simulated_logits(patches, self.spec.architecture.num_classes)
        _occupy(self.curve, patches, started)
        return logits


class SimulatedRolloutBackend(_OnTheCurve):
    """The `RolloutBackend` of one model version on the simulated accelerator: the plain graph's
    logits and a rollout map, after the same time (the rollout's own extra cost is not in the
    curve). The rollout parameters change nothing."""

    def run(
        self, patches: NDArray[np.uint8], params: RolloutParams
    ) -> tuple[NDArray[np.float32], NDArray[np.float32]]:
        started = time.perf_counter()
        logits = simulated_logits(patches, self.spec.architecture.num_classes)
        rollout = simulated_rollout(patches)
        _occupy(self.curve, patches, started)
        return logits, rollout


def simulated_backends(path: Path) -> Callable[[ModelVersion], SimulatedBackend]:
    """The factory of every version's plain backend on the curve in `path` (read now, so a bad
    file stops the start); says, at start, that the service is simulating."""
    curve = BatchCurve.load(path)
    log.warning(
        "simulating the accelerator for benchmarks only: every model's inference is a sleep "
        "on the batch-time curve in %s (%d points at %d tokens an image), its logits are not "
        "the model's (VIT_SERVE_SIMULATED_CURVE)",
        path,
        len(curve.points),
        curve.tokens_per_image,
        extra={"event": "simulated_accelerator", "curve": str(path)},
    )

    def load(version: ModelVersion) -> SimulatedBackend:
        log.info("model %s version %d on %s (its graph is not run)", *version.key, SIMULATED)
        return SimulatedBackend(version.spec, curve)

    return load


def simulated_rollout_backends(
    path: Path,
) -> Callable[[ModelVersion], SimulatedRolloutBackend | None]:
    """The rollout counterpart: a backend for each version that has a rollout graph, as with
    ONNX Runtime, so rollout requests for one that has none still get a 400."""
    curve = BatchCurve.load(path)

    def load(version: ModelVersion) -> SimulatedRolloutBackend | None:
        if version.rollout_path is None or version.spec.rollout is None:
            return None
        return SimulatedRolloutBackend(version.spec, curve)

    return load
