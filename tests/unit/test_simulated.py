"""The simulated accelerator (benchmarks only): its batch-time curve, its outputs, what it costs
the CPU, and the setting that serves every model on it."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest

from app.core.settings import Settings
from app.models.spec import ModelSpec, RolloutParams
from app.pipeline.preprocess import prepare
from app.runtime import simulated
from app.runtime.backends import Backend, RolloutBackend
from app.runtime.simulated import (
    SIMULATED,
    BatchCurve,
    CurveError,
    SimulatedBackend,
    SimulatedRolloutBackend,
    simulated_logits,
)
from tests.images import jpeg
from tests.support import DEMO_MODEL, ROOT, make_spec, serve

GPU_CHECK = ROOT / "bench" / "results" / "gpu_check.json"
DEMO_REPO = DEMO_MODEL.parent


def fp16_points() -> dict[int, float]:
    """The H200's fp16 ViT-B/16 batch times, in ms, as gpu_check.json holds them."""
    (run,) = [r for r in json.loads(GPU_CHECK.read_text())["raw"] if r["precision"] == "fp16"]
    return {p["batch"]: p["ms_per_batch"] for p in run["points"]}


def own_curve(tmp_path: Path, points: Sequence[Sequence[object]], tokens: int = 196) -> Path:
    path = tmp_path / "curve.json"
    path.write_text(json.dumps({"tokens_per_image": tokens, "points": points}))
    return path


def patches(batch: int, grid: tuple[int, int] = (8, 8), seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (batch, *grid, 192), dtype=np.uint8)


# --- the curve ---------------------------------------------------------------------------------


def test_gpu_check_s_fp16_curve_gives_the_measured_times_at_measured_batches() -> None:
    curve = BatchCurve.load(GPU_CHECK)
    measured = fp16_points()
    assert len(measured) == 6 and curve.tokens_per_image == 14 * 14
    for batch, ms in measured.items():
        assert curve.seconds(batch) * 1e3 == pytest.approx(ms, rel=1e-9)
    # The fp32 run is another curve: the precision picks the run.
    fp32 = BatchCurve.load(GPU_CHECK, precision="fp32")
    assert fp32.seconds(256) > 2 * curve.seconds(256)


def test_between_measured_batches_the_time_is_linear() -> None:
    curve = BatchCurve.load(GPU_CHECK)
    ms = fp16_points()
    # 20 is halfway from 8 to 32; 96 halfway from 64 to 128.
    assert curve.seconds(20) * 1e3 == pytest.approx((ms[8] + ms[32]) / 2)
    assert curve.seconds(96) * 1e3 == pytest.approx((ms[64] + ms[128]) / 2)
    assert curve.seconds(10) * 1e3 == pytest.approx(ms[8] + (ms[32] - ms[8]) * 2 / 24)


def test_the_time_scales_with_the_tokens_an_image() -> None:
    curve = BatchCurve.load(GPU_CHECK)
    native = curve.seconds(32)
    assert curve.seconds(32, 392) == pytest.approx(2 * native)
    assert curve.seconds(32, 64) == pytest.approx(native * 64 / 196)
    assert curve.seconds(32, 196) == native


def test_outside_the_measured_batches_it_is_never_faster_than_measured(tmp_path: Path) -> None:
    curve = BatchCurve.load(own_curve(tmp_path, [[32, 4.0], [8, 2.0]]))  # any order
    # Below the smallest batch: that batch's time, not less.
    assert curve.seconds(1) == curve.seconds(4) == pytest.approx(2e-3)
    # Beyond the largest: its time per image.
    assert curve.seconds(64) == pytest.approx(8e-3)
    assert curve.seconds(48) / 48 == pytest.approx(curve.seconds(32) / 32)


def test_its_own_format_is_read_and_bad_files_are_refused(tmp_path: Path) -> None:
    curve = BatchCurve.load(own_curve(tmp_path, [[1, 1.0], [4, 2.0]], tokens=64))
    assert curve.points == ((1, 1e-3), (4, 2e-3)) and curve.tokens_per_image == 64
    assert curve.seconds(2) == pytest.approx(1e-3 + 1e-3 / 3)
    for bad in ([], [[0, 1.0]], [[2, 1.0], [2, 3.0]], [[1, -1.0]], [["x", 1.0]]):
        with pytest.raises(CurveError):
            BatchCurve.load(own_curve(tmp_path, bad))
    with pytest.raises(CurveError, match="tokens_per_image"):
        BatchCurve.load(own_curve(tmp_path, [[1, 1.0]], tokens=0))
    with pytest.raises(CurveError, match="no measured int8 run"):
        BatchCurve.load(GPU_CHECK, precision="int8")
    with pytest.raises(CurveError, match="cannot read"):
        BatchCurve.load(tmp_path / "absent.json")


# --- the backends ------------------------------------------------------------------------------


def fast_curve(tmp_path: Path) -> BatchCurve:
    return BatchCurve.load(own_curve(tmp_path, [[1, 0.1]], tokens=64))


def test_logits_have_the_model_s_shape_and_tell_images_apart(tmp_path: Path) -> None:
    spec = make_spec()
    backend: Backend = SimulatedBackend(spec, fast_curve(tmp_path))
    assert backend.provider == SIMULATED
    x = patches(5)
    logits = backend.run(x)
    assert logits.shape == (5, spec.architecture.num_classes) and logits.dtype == np.float32
    np.testing.assert_array_equal(logits, backend.run(x.copy()))  # deterministic
    assert len({int(i) for i in logits.argmax(axis=1)}) > 1  # not one answer for all
    assert np.ptp(logits, axis=1).min() > 0  # not a constant row
    # An image's logits do not depend on the batch it is in.
    np.testing.assert_array_equal(backend.run(x[2:3])[0], logits[2])


def test_rollout_gives_logits_and_a_map_over_the_grid(tmp_path: Path) -> None:
    spec = make_spec()
    backend: RolloutBackend = SimulatedRolloutBackend(spec, fast_curve(tmp_path))
    x = patches(3, grid=(6, 10))
    logits, rollout = backend.run(x, RolloutParams())
    assert logits.shape == (3, 10) and logits.dtype == np.float32
    assert rollout.shape == (3, 6, 10) and rollout.dtype == np.float32
    np.testing.assert_array_equal(logits, simulated_logits(x, 10))
    assert (rollout.reshape(3, -1).max(axis=1) == 1.0).all() and (rollout > 0).all()


class FakeClock:
    """The simulated module's `time`: perf_counter moves only when something sleeps, and every
    sleep is recorded, so a test sees how long a batch holds the device and that it sleeps
    (never spins) for it."""

    def __init__(self) -> None:
        self.now = 100.0
        self.sleeps: list[float] = []

    def perf_counter(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    fake = FakeClock()
    monkeypatch.setattr(simulated, "time", fake)
    monkeypatch.setattr(simulated, "DEVICE", simulated.SimulatedDevice())
    return fake


def test_a_run_sleeps_for_the_curves_time(tmp_path: Path, clock: FakeClock) -> None:
    # ViT-B/16-sized batches (196 tokens of 768 values): each holds the device exactly as long
    # as the curve says, asleep (time.sleep releases the GIL: nothing spins).
    curve = BatchCurve.load(own_curve(tmp_path, [[1, 50.0], [32, 80.0]]))
    backend = SimulatedBackend(make_spec(grid=(14, 14), patch_size=16), curve)
    x = np.random.default_rng(0).integers(0, 256, (32, 14, 14, 768), dtype=np.uint8)
    for _ in range(4):
        backend.run(x)
    assert clock.sleeps == pytest.approx([0.080] * 4)


def test_batches_take_turns_on_the_one_device(tmp_path: Path, clock: FakeClock) -> None:
    # Two versions' batches, one after the other: the second starts when the first ended, as
    # on one GPU, so lanes never add up to more than the curve's throughput.
    curve = BatchCurve.load(own_curve(tmp_path, [[1, 200.0]], tokens=64))
    first, second = SimulatedBackend(make_spec(), curve), SimulatedBackend(make_spec(), curve)
    started = clock.now
    first.run(patches(1))
    second.run(patches(1))
    assert clock.sleeps == pytest.approx([0.2, 0.2])
    assert clock.now - started == pytest.approx(0.4)


# --- the setting -------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_the_setting_serves_every_model_on_the_simulated_accelerator(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="app.runtime.simulated")
    settings = Settings(model_repo=DEMO_REPO, simulated_curve=GPU_CHECK)
    data = jpeg(120, 90, seed=3)
    async with serve(settings) as client:
        (model,) = [
            m
            for m in (await client.get("/models")).json()["models"]
            if m["name"] == DEMO_MODEL.name
        ]
        response = await client.post(
            "/classify",
            params={"resize": "crop", "top_k": 1},
            content=data,
            headers={"content-type": "image/jpeg"},
        )
        rollout = await client.post(
            "/classify",
            params={"resize": "crop", "rollout": "true"},
            content=data,
            headers={"content-type": "image/jpeg"},
        )
    assert (model["name"], model["provider"]) == ("demo-shapes", SIMULATED)
    # The start says so, where operators look.
    (line,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert "simulating the accelerator for benchmarks only" in line and str(GPU_CHECK) in line
    assert response.status_code == 200
    # The answer is the simulated logits of the patches the service made.
    spec = ModelSpec.load(DEMO_MODEL / "model.json")
    prepared = prepare(data, spec, "crop", name="x", max_pixels=10**8, fit_max_tokens=128)
    expected = int(simulated_logits(prepared.patches[None], len(spec.labels))[0].argmax())
    (top,) = response.json()["results"][0]["predictions"]
    assert top["index"] == expected
    assert rollout.status_code == 200
    grid = np.array(rollout.json()["results"][0]["rollout"]["grid"])
    assert grid.shape == tuple(spec.architecture.grid) and grid.max() == 1.0


@pytest.mark.anyio
async def test_without_the_setting_the_graphs_run_on_onnx_runtime() -> None:
    async with serve(Settings(model_repo=DEMO_REPO)) as client:
        (model,) = [
            m
            for m in (await client.get("/models")).json()["models"]
            if m["name"] == DEMO_MODEL.name
        ]
    assert model["provider"] != SIMULATED
