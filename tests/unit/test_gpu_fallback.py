"""The service's own provider fallback, and where a session's nodes really run.

On this project's machines onnxruntime-gpu is installed and there is no GPU, which is a real
GPU failure to test against: TensorRT's provider library does not load (ONNX Runtime raises),
and CUDA's does not either (ONNX Runtime drops it with a line on stderr and runs on the CPU,
without an error). The tests that rely on it are skipped where that is not so.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from app.core.logs import JsonFormatter
from app.core.settings import Settings
from app.models.repository import ModelVersion, scan_repository
from app.runtime import backends as runtime
from app.runtime import placement as plan
from app.runtime.backends import OnnxBackend, RuntimeLoadError, open_placed_session
from app.runtime.fallback import open_on_best
from app.runtime.placement import ExecutionPlan
from app.runtime.providers import CPU, CUDA, TENSORRT, Placement
from app.runtime.sessions import open_backend

DEMO_REPO = Path(__file__).resolve().parents[2] / "model_repo"

gpu_build_without_gpu = pytest.mark.skipif(
    TENSORRT not in ort.get_available_providers() or plan._cuda_driver_present(),
    reason="needs onnxruntime-gpu on a machine without a GPU driver (its providers then fail)",
)


def demo() -> ModelVersion:
    # Version 1, the plain fp32 graph (what TensorRT takes); version 2 is int8, for CPUs.
    return scan_repository(DEMO_REPO).resolve("demo-shapes", 1)


def fallback_lines(caplog: pytest.LogCaptureFixture) -> list[dict[str, object]]:
    """The fallback log records, as the JSON log lines the service writes."""
    formatter = JsonFormatter()
    lines = [json.loads(formatter.format(r)) for r in caplog.records]
    return [line for line in lines if line.get("event") == "provider_fallback"]


def test_onnx_runtimes_own_fallback_is_off() -> None:
    # Its wrapper would otherwise re-create a failed session on other providers, and retry a
    # failed run on them, printing why to stdout. (`_enable_fallback` is the flag it reads.)
    session, placed = open_placed_session(demo().graph_path, [CPU])
    assert session._enable_fallback is False
    assert placed.provider == CPU


def test_the_placement_on_the_cpu_is_what_the_profiler_sees_run(tmp_path: Path) -> None:
    # What a session reports is ONNX Runtime's node assignment; check it against a profiled
    # run: every kernel that ran ran on the provider the assignment names, matrix products too.
    version = demo()
    options = ort.SessionOptions()
    options.add_session_config_entry(runtime.RECORD_ASSIGNMENT, "1")
    options.enable_profiling = True
    options.profile_file_prefix = str(tmp_path / "profile")
    session = ort.InferenceSession(str(version.graph_path), options, providers=[CPU])
    placed = runtime.placement_of_session(session)
    patches = np.zeros((2, 8, 8, version.spec.architecture.patch_dim), dtype=np.uint8)
    session.run(None, {"patches": patches})
    events = json.loads(Path(session.end_profiling()).read_text())
    ran = [e["args"] for e in events if e.get("cat") == "Node" and "provider" in e.get("args", {})]
    assert ran, "the profile holds no node events"
    assert {a["provider"] for a in ran} == set(placed.node_counts()) == {CPU}
    matmul = {a["provider"] for a in ran if a.get("op_name") in ("MatMul", "FusedMatMul", "Gemm")}
    assert matmul == {placed.provider}
    assert dict(placed.compute)[CPU] >= version.spec.architecture.depth * 4  # per block: 4+


@gpu_build_without_gpu
def test_cuda_dropped_silently_by_onnx_runtime_shows_as_the_cpu() -> None:
    # ONNX Runtime registers only the CPU (its CUDA library's libcublas does not load here) and
    # raises nothing: get_providers() alone would say so too, but the assignment is the record.
    session, placed = open_placed_session(demo().graph_path, [CUDA, CPU])
    assert [str(p) for p in session.get_providers()] == [CPU]
    assert placed.provider == CPU and not placed.on_gpu
    assert sum(placed.node_counts().values()) > 100


@gpu_build_without_gpu
def test_tensorrt_failing_falls_back_to_cuda_then_the_cpu_with_its_reason_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="app")
    settings = Settings(model_repo=DEMO_REPO, providers=[TENSORRT, CUDA, CPU])
    backend, plan = open_backend(settings, demo())
    assert plan.providers == [TENSORRT, CUDA, CPU] and plan.wanted == TENSORRT
    placed = backend.placement
    assert (placed.provider, placed.wanted) == (CPU, TENSORRT)
    # Both steps, each with the service's own reason (before ONNX Runtime's, for TensorRT).
    assert placed.fallback is not None
    tensorrt, cuda = placed.fallback.split(f"; {CUDA}: ")
    assert tensorrt.startswith(f"{TENSORRT}: no NVIDIA driver")
    assert cuda.startswith("no NVIDIA driver")
    failed, dropped = fallback_lines(caplog)
    assert failed["level"] == "WARNING" and failed["logger"] == "app.runtime.fallback"
    assert (failed["provider"], failed["next"]) == (TENSORRT, [CUDA, CPU])
    assert "no NVIDIA driver" in str(failed["reason"])
    assert (dropped["provider"], dropped["running_on"]) == (TENSORRT, CPU)
    assert str(dropped["reason"]).startswith(f"{CUDA}: no NVIDIA driver")
    # The graph runs, and on the CPU gives the CPU's logits.
    patches = np.full((1, 8, 8, 192), 7, dtype=np.uint8)
    np.testing.assert_array_equal(
        backend.run(patches), OnnxBackend(demo().graph_path, demo().spec, [CPU]).run(patches)
    )


@gpu_build_without_gpu
def test_a_provider_dropped_without_an_error_is_logged_as_a_fallback(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="app")
    settings = Settings(model_repo=DEMO_REPO, providers=[CUDA, CPU])
    backend, _ = open_backend(settings, demo())
    assert (backend.provider, backend.placement.wanted) == (CPU, CUDA)
    (line,) = fallback_lines(caplog)
    assert (line["provider"], line["running_on"]) == (CUDA, CPU)
    assert (
        line["reason"]
        == backend.placement.fallback
        == f"{CUDA}: no NVIDIA driver (libcuda.so.1 does not load)"
    )


def test_each_step_down_the_chain_is_tried_in_turn_and_the_cpus_error_is_raised() -> None:
    tried: list[list[str]] = []
    plan = ExecutionPlan([TENSORRT, CUDA, CPU], {}, None, "none", TENSORRT, {})

    def failing(providers: list[str]) -> OnnxBackend:
        tried.append(providers)
        raise RuntimeLoadError(f"{providers[0]} broke\nsecond line")

    with pytest.raises(RuntimeLoadError, match="CPUExecutionProvider broke"):
        open_on_best(failing, plan, "m/1 model.onnx")
    assert tried == [[TENSORRT, CUDA, CPU], [CUDA, CPU], [CPU]]


def test_a_graph_where_it_was_wanted_has_no_fallback() -> None:
    plan = ExecutionPlan([CPU], {}, None, "none", CPU, {})
    version = demo()
    backend, steps = open_on_best(
        lambda providers: OnnxBackend(version.graph_path, version.spec, providers), plan, "demo"
    )
    assert steps == []
    assert backend.placement.fallback is None and backend.placement.wanted == CPU
    assert isinstance(backend.placement, Placement) and backend.placements == [backend.placement]
