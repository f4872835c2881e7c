"""Execution providers (app.models.providers and runtime): order, TensorRT's options, IO binding."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from app.core.settings import Settings
from app.models import runtime
from app.models.providers import (
    CPU,
    CUDA,
    TENSORRT,
    Profile,
    TensorrtConfig,
    candidate_providers,
    cuda_options,
    engine_cache_dir,
    fit_grids,
    served_profile,
    shape_option,
    takes_tensorrt,
    tensorrt_options,
    tensorrt_options_key,
)
from app.models.repository import ModelVersion, scan_repository
from app.models.runtime import OnnxBackend, OnnxRolloutBackend, execution_plan
from app.models.sessions import open_backend
from app.models.spec import Architecture, ModelSpec, RolloutParams

DEMO_REPO = Path(__file__).resolve().parents[2] / "model_repo"
ALL = [TENSORRT, CUDA, CPU]
VIT_B16 = Architecture(
    patch_size=16, grid=(14, 14), embed_dim=768, depth=12, heads=12, num_classes=1000
)


def demo_version() -> ModelVersion:
    return scan_repository(DEMO_REPO).resolve("demo-shapes", None)


def demo_spec() -> ModelSpec:
    return demo_version().spec


# --- which providers, in which order ------------------------------------------------------


def test_on_a_gpu_tensorrt_comes_first_then_cuda_then_cpu() -> None:
    assert candidate_providers(None, ALL, True, True, True) == [TENSORRT, CUDA, CPU]


def test_without_a_driver_nothing_gpu_is_offered() -> None:
    assert candidate_providers(None, ALL, False, True, True) == [CPU]


def test_without_tensorrt_libraries_cuda_comes_first() -> None:
    assert candidate_providers(None, ALL, True, False, True) == [CUDA, CPU]


def test_a_graph_tensorrt_cannot_take_whole_gets_cuda_in_its_place() -> None:
    assert candidate_providers(None, ALL, True, True, False) == [CUDA, CPU]
    assert candidate_providers([TENSORRT, CPU], ALL, True, True, False) == [CUDA, CPU]
    assert candidate_providers([CUDA, CPU, TENSORRT], ALL, True, True, False) == [CUDA, CPU]


def test_an_explicit_list_is_kept_less_what_the_build_lacks() -> None:
    assert candidate_providers([CUDA, TENSORRT], ALL, True, True, True) == [CUDA, TENSORRT, CPU]
    assert candidate_providers([TENSORRT], [CUDA, CPU], True, True, True) == [CPU]
    assert candidate_providers([CPU], ALL, True, True, True) == [CPU]


def test_cuda_always_follows_tensorrt() -> None:
    assert candidate_providers([TENSORRT, CPU], ALL, True, True, True) == [TENSORRT, CUDA, CPU]


def test_only_plain_graphs_go_to_tensorrt() -> None:
    assert takes_tensorrt("none", rollout=False)
    assert not takes_tensorrt("fused", rollout=False)
    assert not takes_tensorrt("fp16", rollout=False)
    assert not takes_tensorrt("none", rollout=True)


def gpu_machine(monkeypatch: pytest.MonkeyPatch, driver: bool, tensorrt: bool) -> None:
    monkeypatch.setattr(ort, "get_available_providers", lambda: list(ALL))
    monkeypatch.setattr(runtime, "_cuda_driver_present", lambda: driver)
    monkeypatch.setattr(runtime, "_tensorrt_libraries_present", lambda: tensorrt)


def test_runtime_asks_the_build_the_driver_and_the_libraries(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    gpu_machine(monkeypatch, driver=True, tensorrt=True)
    assert runtime.candidate_providers(None, takes_tensorrt=True) == [TENSORRT, CUDA, CPU]
    assert runtime.candidate_providers(None) == [CUDA, CPU]
    gpu_machine(monkeypatch, driver=True, tensorrt=False)
    assert runtime.candidate_providers(None, takes_tensorrt=True) == [CUDA, CPU]
    gpu_machine(monkeypatch, driver=False, tensorrt=True)
    assert runtime.candidate_providers(None, takes_tensorrt=True) == [CPU]


# --- TensorRT's profile and options -------------------------------------------------------


def test_the_grids_fit_makes_of_images_up_to_4_to_1() -> None:
    assert sorted(fit_grids(demo_spec().architecture, 128, 4.0)) == [
        (4, 15), (4, 16), (5, 13), (5, 14), (6, 11), (7, 9), (7, 10), (8, 8),
        (9, 7), (10, 7), (11, 6), (13, 5), (14, 5), (15, 4), (16, 4),
    ]  # fmt: skip


def test_wider_images_reach_one_patch_high_grids() -> None:
    grids = fit_grids(demo_spec().architecture, 128, 40_000_000)
    assert {(1, 128), (128, 1), (1, 45), (2, 32)} <= grids
    assert max(h for h, _ in grids) == 128


def test_the_demo_models_profile() -> None:
    profile = served_profile(demo_spec().architecture, 128, 32, 8192)
    assert profile == Profile(min=(1, 4, 4, 192), opt=(32, 8, 8, 192), max=(32, 16, 16, 192))
    assert [shape_option("patches", s) for s in (profile.min, profile.opt, profile.max)] == [
        "patches:1x4x4x192",
        "patches:32x8x8x192",
        "patches:32x16x16x192",
    ]


def test_a_vit_b16_at_224s_profile() -> None:
    profile = served_profile(VIT_B16, 392, 32, 8192)
    assert [shape_option("patches", s) for s in (profile.min, profile.opt, profile.max)] == [
        "patches:1x7x7x768",
        "patches:32x14x14x768",
        "patches:32x28x28x768",
    ]


def test_the_token_budget_bounds_the_profiles_batches() -> None:
    # 8 native grids of 196 tokens fit in 1600; 16 of the smallest (7x26 = 182 tokens) do not.
    profile = served_profile(VIT_B16, 392, 32, 1600)
    assert (profile.opt[0], profile.max[0]) == (8, 8)


def test_a_profile_covers_its_box_only() -> None:
    profile = Profile(min=(1, 4, 4, 192), opt=(32, 8, 8, 192), max=(32, 16, 16, 192))
    assert profile.covers((1, 4, 16, 192))
    assert profile.covers((32, 16, 4, 192))
    assert not profile.covers((1, 1, 128, 192))
    assert not profile.covers((33, 8, 8, 192))


def test_tensorrt_options(tmp_path: Path) -> None:
    profile = served_profile(demo_spec().architecture, 128, 32, 8192)
    config = TensorrtConfig("patches", profile, True, tmp_path, tmp_path / "engine")
    assert tensorrt_options(config) == {
        "device_id": "0",
        "trt_fp16_enable": "1",
        "trt_engine_cache_enable": "1",
        "trt_engine_cache_path": str(tmp_path / "engine"),
        "trt_timing_cache_enable": "1",
        "trt_timing_cache_path": str(tmp_path),
        "trt_profile_min_shapes": "patches:1x4x4x192",
        "trt_profile_opt_shapes": "patches:32x8x8x192",
        "trt_profile_max_shapes": "patches:32x16x16x192",
    }
    assert cuda_options() == {"device_id": "0"}


def test_engines_are_kept_per_graph_and_options(tmp_path: Path) -> None:
    profile = served_profile(demo_spec().architecture, 128, 32, 8192)
    on, off = (tensorrt_options_key(profile, fp16) for fp16 in (True, False))
    assert on == "(1, 4, 4, 192)|(32, 8, 8, 192)|(32, 16, 16, 192)|fp16=True"
    here = engine_cache_dir(tmp_path, "demo-shapes", 1, "ab" * 32, on)
    assert here.parent == tmp_path / "demo-shapes" / "1"
    assert len(here.name) == 16
    assert here != engine_cache_dir(tmp_path, "demo-shapes", 1, "ab" * 32, off)
    assert here != engine_cache_dir(tmp_path, "demo-shapes", 1, "cd" * 32, on)
    assert here == engine_cache_dir(tmp_path, "demo-shapes", 1, "ab" * 32, on)


def test_the_plan_for_the_demo_model_on_a_gpu(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    gpu_machine(monkeypatch, driver=True, tensorrt=True)
    version = demo_version()
    settings = Settings(model_repo=DEMO_REPO, trt_cache_dir=tmp_path, trt_fp16=False)
    plan = execution_plan(settings, version, rollout=False)
    assert plan.providers == [TENSORRT, CUDA, CPU]
    assert plan.optimization == "none"
    assert plan.profile == served_profile(version.spec.architecture, 128, 32, 8192)
    trt = plan.options[TENSORRT]
    assert trt["trt_fp16_enable"] == "0"
    assert trt["trt_profile_max_shapes"] == "patches:32x16x16x192"
    assert Path(trt["trt_engine_cache_path"]).parent == tmp_path / "demo-shapes" / "1"
    assert plan.options[CUDA] == {"device_id": "0"}
    assert plan.describe(CUDA) == f"{CUDA} (device_id=0)"
    rollout = execution_plan(settings, version, rollout=True)
    assert (rollout.providers, rollout.profile) == ([CUDA, CPU], None)
    assert set(rollout.options) == {CUDA}


def test_the_plan_on_a_cpu_has_no_options() -> None:
    plan = execution_plan(Settings(model_repo=DEMO_REPO), demo_version(), rollout=False)
    assert (plan.providers, plan.options, plan.profile) == ([CPU], {}, None)
    assert plan.describe(CPU) == CPU


# --- IO binding ---------------------------------------------------------------------------


def batch(spec: ModelSpec, grid: tuple[int, int], size: int) -> np.ndarray:
    rng = np.random.default_rng(7)
    shape = (size, *grid, spec.architecture.patch_dim)
    return rng.integers(0, 256, size=shape, dtype=np.uint8)


@pytest.mark.parametrize("grid", [(8, 8), (5, 13), (1, 45)])
def test_io_binding_gives_the_logits_of_session_run(grid: tuple[int, int]) -> None:
    version = demo_version()
    plain = OnnxBackend(version.graph_path, version.spec, [CPU])
    bound = OnnxBackend(version.graph_path, version.spec, [CPU], io_binding=True)
    assert (plain.io_binding, bound.io_binding) == (False, True)
    patches = batch(version.spec, grid, 3)
    expected = plain.run(patches)
    got = bound.run(patches)
    assert got.shape == (3, 10)
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("params", [RolloutParams(), RolloutParams("max", 0.5)])
def test_io_binding_gives_the_rollout_of_session_run(params: RolloutParams) -> None:
    version = demo_version()
    assert version.rollout_path is not None
    plain = OnnxRolloutBackend(version.rollout_path, version.spec, [CPU])
    bound = OnnxRolloutBackend(version.rollout_path, version.spec, [CPU], io_binding=True)
    patches = batch(version.spec, (6, 11), 2)
    (logits, rollout), (bound_logits, bound_rollout) = (
        plain.run(patches, params),
        bound.run(patches, params),
    )
    assert bound_rollout.shape == (2, 6, 11)
    np.testing.assert_array_equal(bound_logits, logits)
    np.testing.assert_array_equal(bound_rollout, rollout)


# --- on a GPU -----------------------------------------------------------------------------

needs_gpu = pytest.mark.skipif(
    not runtime._cuda_driver_present() or CUDA not in ort.get_available_providers(),
    reason="needs an NVIDIA driver and onnxruntime-gpu: this machine has no GPU",
)


@needs_gpu
@pytest.mark.parametrize("provider", [TENSORRT, CUDA])
def test_the_demo_model_on_the_gpu_matches_the_cpu(provider: str, tmp_path: Path) -> None:
    if provider == TENSORRT and not runtime._tensorrt_libraries_present():
        pytest.skip("TensorRT's libraries (libnvinfer) are not installed")
    version = demo_version()
    settings = Settings(model_repo=DEMO_REPO, trt_cache_dir=tmp_path, providers=[provider])
    gpu, _ = open_backend(settings, version)
    assert (gpu.provider, gpu.io_binding) == (provider, True)
    cpu = OnnxBackend(version.graph_path, version.spec, [CPU])
    # In TensorRT's profile, at its edges, and outside it (a 1 x 45 grid runs on CUDA).
    for grid, size in [((8, 8), 32), ((4, 16), 1), ((16, 4), 5), ((1, 45), 2)]:
        patches = batch(version.spec, grid, size)
        # fp16 inside TensorRT: logits of about +-10 agree to a few hundredths.
        np.testing.assert_allclose(gpu.run(patches), cpu.run(patches), rtol=0, atol=5e-2)
