"""Execution providers (app.runtime.providers, backends): order, TensorRT's options, IO binding."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from app.core.settings import Settings
from app.models.repository import ModelVersion, scan_repository
from app.models.spec import Architecture, ModelSpec, RolloutParams
from app.runtime import placement as plan
from app.runtime.backends import OnnxBackend, OnnxRolloutBackend
from app.runtime.placement import execution_plan
from app.runtime.providers import (
    CPU,
    CUDA,
    TENSORRT,
    EnginePlatform,
    Placement,
    Profile,
    TensorrtConfig,
    candidate_providers,
    cuda_options,
    engine_cache_dir,
    fallback_chain,
    fit_grids,
    served_profile,
    shape_option,
    takes_tensorrt,
    tensorrt_options,
    tensorrt_options_key,
)
from app.runtime.sessions import open_backend

DEMO_REPO = Path(__file__).resolve().parents[2] / "model_repo"
ALL = [TENSORRT, CUDA, CPU]
VIT_B16 = Architecture(
    patch_size=16, grid=(14, 14), embed_dim=768, depth=12, heads=12, num_classes=1000
)
H200 = EnginePlatform("1.31.1", "10.16.1", "NVIDIA H200", (9, 0))


def demo_version() -> ModelVersion:
    # Version 1, the plain fp32 graph (what TensorRT takes); version 2 is int8, for CPUs.
    return scan_repository(DEMO_REPO).resolve("demo-shapes", 1)


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


def test_without_cuda_libraries_neither_gpu_provider_is_offered_unless_it_loads() -> None:
    assert candidate_providers(None, ALL, True, False, True, cuda_libraries=False) == [CPU]
    assert candidate_providers(None, ALL, True, True, True, cuda_libraries=False) == [
        TENSORRT,
        CUDA,  # what TensorRT leaves must not go to the CPU: tried, and a failure falls back
        CPU,
    ]


def test_the_service_falls_back_one_provider_at_a_time_down_to_the_cpu() -> None:
    assert fallback_chain([TENSORRT, CUDA, CPU]) == [[TENSORRT, CUDA, CPU], [CUDA, CPU], [CPU]]
    assert fallback_chain([CUDA, CPU]) == [[CUDA, CPU], [CPU]]
    assert fallback_chain([CPU]) == [[CPU]]


# --- where a graph runs ---------------------------------------------------------------------


def test_the_provider_shown_runs_the_matrix_products_not_the_most_nodes() -> None:
    # CUDA takes the arithmetic; ONNX Runtime keeps shape arithmetic on the CPU on purpose.
    assigned = [(CUDA, "MatMul")] * 3 + [(CUDA, "Add")] * 2 + [(CPU, "Shape"), (CPU, "Gather")] * 4
    placed = Placement.of_nodes(assigned, [CUDA, CPU])
    assert placed.provider == CUDA and placed.on_gpu
    assert placed.node_counts() == {CPU: 8, CUDA: 5}
    assert placed.compute == ((CUDA, 3),)
    assert placed.shown() == f"{CPU} (8 nodes), {CUDA} (5 nodes, 3 compute)"


def test_a_session_whose_matrix_products_run_on_the_cpu_runs_on_the_cpu() -> None:
    assigned = [(TENSORRT, "Shape"), (CPU, "MatMul"), (CPU, "Attention")]
    assert Placement.of_nodes(assigned, [TENSORRT, CUDA, CPU]).provider == CPU
    # Nothing recorded (an older ONNX Runtime): the first registered provider.
    assert Placement.of_nodes([], [CUDA, CPU]).provider == CUDA
    assert Placement.of_nodes([(CUDA, "Add")], [CUDA, CPU]).provider == CUDA


def test_a_placement_says_why_it_is_not_where_it_was_wanted() -> None:
    on_cpu = Placement.of_nodes([(CPU, "MatMul")], [CPU])
    assert on_cpu.with_fallback(CPU, "ignored").fallback is None
    marked = on_cpu.with_fallback(CUDA, "libcublas.so.13 not found")
    assert (marked.wanted, marked.fallback, marked.on_gpu) == (
        CUDA,
        "libcublas.so.13 not found",
        False,
    )
    assert on_cpu.with_fallback(CUDA, None).fallback == f"{CUDA} ran none of its nodes"


def test_only_plain_graphs_go_to_tensorrt() -> None:
    assert takes_tensorrt("none", rollout=False)
    assert not takes_tensorrt("fused", rollout=False)
    assert not takes_tensorrt("fp16", rollout=False)
    assert not takes_tensorrt("none", rollout=True)


def gpu_machine(
    monkeypatch: pytest.MonkeyPatch, driver: bool, tensorrt: bool, cuda: bool = True
) -> None:
    """ONNX Runtime, the driver and the libraries as on a GPU machine, as far as asked."""
    problems = {
        TENSORRT: None if tensorrt else "libnvinfer.so.10 not found",
        CUDA: None if cuda else "libcublas.so.13 not found",
    }
    monkeypatch.setattr(ort, "get_available_providers", lambda: list(ALL))
    monkeypatch.setattr(plan, "_cuda_driver_present", lambda: driver)
    monkeypatch.setattr(
        plan,
        "provider_problem",
        lambda p: None if p == CPU else ("no NVIDIA driver" if not driver else problems[p]),
    )
    monkeypatch.setattr(plan, "engine_platform", lambda: H200)


def test_runtime_asks_the_build_the_driver_and_the_libraries(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    gpu_machine(monkeypatch, driver=True, tensorrt=True)
    assert plan.candidate_providers(None, takes_tensorrt=True) == [TENSORRT, CUDA, CPU]
    assert plan.candidate_providers(None) == [CUDA, CPU]
    gpu_machine(monkeypatch, driver=True, tensorrt=False)
    assert plan.candidate_providers(None, takes_tensorrt=True) == [CUDA, CPU]
    gpu_machine(monkeypatch, driver=False, tensorrt=True)
    assert plan.candidate_providers(None, takes_tensorrt=True) == [CPU]
    gpu_machine(monkeypatch, driver=True, tensorrt=False, cuda=False)
    assert plan.candidate_providers(None, takes_tensorrt=True) == [CPU]


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
    assert cuda_options() == {"device_id": "0", "use_tf32": "1"}  # ONNX Runtime's default
    assert cuda_options(tf32=False) == {"device_id": "0", "use_tf32": "0"}


def test_engines_are_kept_per_graph_and_options(tmp_path: Path) -> None:
    profile = served_profile(demo_spec().architecture, 128, 32, 8192)
    on, off = (tensorrt_options_key(profile, fp16, H200) for fp16 in (True, False))
    assert on == (
        "(1, 4, 4, 192)|(32, 8, 8, 192)|(32, 16, 16, 192)|fp16=True"
        "|ort=1.31.1|trt=10.16.1|gpu=NVIDIA H200|sm_90"
    )
    here = engine_cache_dir(tmp_path, "demo-shapes", 1, "ab" * 32, on)
    assert here.parent == tmp_path / "demo-shapes" / "1"
    assert len(here.name) == 16
    assert here != engine_cache_dir(tmp_path, "demo-shapes", 1, "ab" * 32, off)
    assert here != engine_cache_dir(tmp_path, "demo-shapes", 1, "cd" * 32, on)
    assert here == engine_cache_dir(tmp_path, "demo-shapes", 1, "ab" * 32, on)


@pytest.mark.parametrize(
    "other",
    [
        EnginePlatform("1.32.0", "10.16.1", "NVIDIA H200", (9, 0)),  # ONNX Runtime upgraded
        EnginePlatform("1.31.1", "10.17.0", "NVIDIA H200", (9, 0)),  # TensorRT upgraded
        EnginePlatform("1.31.1", "10.16.1", "NVIDIA H100 80GB HBM3", (9, 0)),  # another GPU
        EnginePlatform("1.31.1", "10.16.1", "NVIDIA H200", (10, 0)),  # another architecture
    ],
)
def test_an_upgrade_or_another_gpu_never_finds_an_old_engine(
    tmp_path: Path, other: EnginePlatform
) -> None:
    profile = served_profile(demo_spec().architecture, 128, 32, 8192)
    dirs = [
        engine_cache_dir(
            tmp_path, "demo-shapes", 1, "ab" * 32, tensorrt_options_key(profile, True, p)
        )
        for p in (H200, other)
    ]
    assert dirs[0] != dirs[1]


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
    assert plan.options[CUDA] == {"device_id": "0", "use_tf32": "1"}
    assert plan.describe(CUDA) == f"{CUDA} (device_id=0, use_tf32=1)"
    assert (plan.wanted, plan.problems) == (TENSORRT, {})
    key = tensorrt_options_key(plan.profile, False, H200)
    assert Path(trt["trt_engine_cache_path"]) == engine_cache_dir(
        tmp_path, "demo-shapes", 1, version.spec.versions[1].model, key
    )
    rollout = execution_plan(settings, version, rollout=True)
    assert (rollout.providers, rollout.profile) == ([CUDA, CPU], None)
    assert set(rollout.options) == {CUDA}


def test_exact_fp32_on_cuda_is_a_setting_that_reaches_every_cuda_session(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    gpu_machine(monkeypatch, driver=True, tensorrt=True)
    monkeypatch.setenv("VIT_SERVE_CUDA_TF32", "false")
    settings = Settings(model_repo=DEMO_REPO, trt_cache_dir=tmp_path)
    assert settings.cuda_tf32 is False
    for rollout in (False, True):  # the plain graph (CUDA after TensorRT) and the rollout graph
        plan = execution_plan(settings, demo_version(), rollout=rollout)
        assert plan.options[CUDA] == {"device_id": "0", "use_tf32": "0"}
        assert "use_tf32" not in plan.options.get(TENSORRT, {})
    monkeypatch.delenv("VIT_SERVE_CUDA_TF32")
    assert Settings(model_repo=DEMO_REPO).cuda_tf32 is True  # the default kept


def test_the_plan_on_a_cpu_has_no_options() -> None:
    plan = execution_plan(Settings(model_repo=DEMO_REPO), demo_version(), rollout=False)
    assert (plan.providers, plan.options, plan.profile) == ([CPU], {}, None)
    assert plan.describe(CPU) == CPU


def test_the_plan_says_why_a_gpu_provider_is_left_out(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    gpu_machine(monkeypatch, driver=True, tensorrt=False)
    settings = Settings(model_repo=DEMO_REPO, trt_cache_dir=tmp_path)
    plan = execution_plan(settings, demo_version(), rollout=False)
    assert (plan.providers, plan.wanted) == ([CUDA, CPU], TENSORRT)
    assert plan.problems == {TENSORRT: "libnvinfer.so.10 not found"}
    gpu_machine(monkeypatch, driver=False, tensorrt=False)
    plan = execution_plan(settings, demo_version(), rollout=True)
    assert (plan.providers, plan.wanted) == ([CPU], CUDA)  # the rollout graph never TensorRT
    assert plan.problems == {CUDA: "no NVIDIA driver"}


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
    not plan._cuda_driver_present() or CUDA not in ort.get_available_providers(),
    reason="needs an NVIDIA driver and onnxruntime-gpu: this machine has no GPU",
)


@needs_gpu
@pytest.mark.parametrize("provider", [TENSORRT, CUDA])
def test_the_demo_model_on_the_gpu_matches_the_cpu(provider: str, tmp_path: Path) -> None:
    if provider == TENSORRT and not plan._tensorrt_libraries_present():
        pytest.skip(f"TensorRT cannot load here: {plan.provider_problem(TENSORRT)}")
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
