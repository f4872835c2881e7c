"""bench.gpu_check: its CPU smoke run end to end, its bounds and report; the graph kits it
builds ViT-B/16 from without PyTorch (bench.gpu_graphs)."""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import ClassVar

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from PIL import Image

from app.core.settings import Settings
from app.runtime import decodemode
from bench import gpu_check
from bench.gpu_graphs import FORMS, SIZES, GraphKit, materialise, model_repository

ROOT = Path(__file__).resolve().parents[2]


def test_the_cpu_smoke_run_goes_through_every_phase(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("VIT_SERVE_")}
    done = subprocess.run(
        [sys.executable, "-m", "bench.gpu_check", "--cpu-smoke", "--out", str(tmp_path)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_check_smoke.json").read_text())
    assert report["errors"] == []
    # Nothing skipped but the level with GPU decoding, for a reason it states.
    (skipped,) = report["skipped"]
    assert skipped.startswith("end to end with VIT_SERVE_DECODE=gpu: ")
    assert report["end_to_end"]["gpu_decode"]["skipped"] in skipped
    env_ = report["environment"]
    assert env_["onnxruntime"] == ort.__version__ and env_["python"]
    # Placement as ONNX Runtime recorded it, for the demo model and both ViT forms.
    assert set(report["placement"]) == {
        "demo-shapes CPUExecutionProvider",
        "vit-smoke-fused CPUExecutionProvider",
        "vit-smoke-fp16 CPUExecutionProvider",
    }
    assert all(p["provider"] == "CPUExecutionProvider" for p in report["placement"].values())
    # fp32 both ways (the service's default, and VIT_SERVE_CUDA_TF32=false), fp16 once.
    assert len(report["parity"]) == 15 and all(row["passed"] for row in report["parity"])
    marked = [(row["graph"], row.get("cuda_tf32")) for row in report["parity"]]
    assert marked.count(("vit-smoke-fused CPUExecutionProvider", True)) == 3
    assert marked.count((f"vit-smoke-fused CPUExecutionProvider {gpu_check.TF32_OFF}", False)) == 3
    assert marked.count(("vit-smoke-fp16 CPUExecutionProvider", None)) == 3
    assert [(r["precision"], [p["batch"] for p in r["points"]]) for r in report["raw"]] == [
        ("fp32", [1, 8]),
        ("fp16", [1, 8]),
    ]
    e2e = report["end_to_end"]
    assert e2e["placement"]["provider"] == "CPUExecutionProvider"
    assert e2e["decode"]["ceiling_img_per_s"] > 0
    assert [level["concurrency"] for level in e2e["levels"]] == [4, 16]
    assert all(level["ok"] > 0 and level["errors"] == level["lost"] == 0 for level in e2e["levels"])
    # The workers sweep, each step its own service, the load from 2 client processes.
    sweep = e2e["sweep"]
    assert [(lv["workers"], lv["concurrency"]) for lv in sweep] == [(1, 16), (2, 16)]
    assert [lv["service_env"]["VIT_SERVE_WORKERS"] for lv in sweep] == ["1", "2"]
    assert all(lv["ok"] > 0 and lv["errors"] == lv["lost"] == 0 for lv in sweep)
    assert all(lv["client_processes"] == 2 and lv["client_cpu_ms_per_image"] > 0 for lv in sweep)
    assert len(set(e2e["client_pids"])) == 2
    assert set(sweep[0]["server_cpu_ms_per_image_by_process"]) == {"main"}
    assert set(sweep[1]["server_cpu_ms_per_image_by_process"]) == {"main", "engine", "front-end"}
    assert sweep[0] == {**e2e["levels"][1], "service_env": sweep[0]["service_env"],
                        "start_s": sweep[0]["start_s"]}  # fmt: skip
    target = e2e["target"]
    assert target["concurrency"] == 16
    assert target["limit_img_per_s"] == min(
        target["raw_fp16_best_img_per_s"], e2e["decode"]["ceiling_img_per_s"]
    )
    assert target["best_workers"] in (1, 2)
    with Image.open(tmp_path / "gpu_check_smoke.png") as png:
        assert png.size == (1000, 460)
    assert "parity: 15/15 within bounds" in done.stdout
    assert "service c=16 (workers=1):" in done.stdout and "decode ceiling:" in done.stdout
    assert "sweep workers=2 c=16:" in done.stdout and "\ntarget: >= 70% of min(" in done.stdout
    assert "with VIT_SERVE_CUDA_TF32=false" in done.stdout


def test_fp32_parity_is_absolute_and_fp16_relative_with_the_same_top1() -> None:
    expected = np.array([[10.0, 0.0, -2.0], [0.0, 5.0, 1.0]], dtype=np.float32)
    close = expected + 5e-4
    assert gpu_check.compare("g", close, expected, False, (1, 1))["passed"]
    assert not gpu_check.compare("g", expected + 2e-3, expected, False, (1, 1))["passed"]
    # fp16: within 1% of the largest |logit| (0.1 here), and the same class first.
    assert gpu_check.compare("g", expected + 0.09, expected, True, (1, 1))["passed"]
    swapped = expected.copy()
    swapped[1] = [5.0, 0.0, 1.0]
    row = gpu_check.compare("g", swapped, expected, True, (1, 1))
    assert (row["passed"], row["top1_agree"]) == (False, "1/2")


def test_a_machine_without_a_usable_gpu_is_named_with_the_reason() -> None:
    env = {"providers_in_build": ["CPUExecutionProvider"], "libraries": {}}
    assert "install onnxruntime-gpu" in str(gpu_check.gpu_missing(env))
    env = {
        "providers_in_build": ["CUDAExecutionProvider", "CPUExecutionProvider"],
        "libraries": {"CUDAExecutionProvider": {"problem": "no NVIDIA driver"}},
    }
    assert gpu_check.gpu_missing(env) == "no NVIDIA driver"


def test_the_gpu_plan_measures_what_the_check_promises() -> None:
    plan = gpu_check.Plan.make(smoke=False, budget_s=None)
    assert plan.size == "vit-b16" and plan.device == "CUDAExecutionProvider"
    assert plan.batches == (1, 8, 32, 64, 128, 256)
    assert plan.concurrency == (64, 256)
    assert (plan.workers, plan.sweep_concurrency) == ((1, 4, 8, 14), 256)
    assert plan.client_processes > 1  # one client process is near its ceiling at these rates
    assert len(plan.parity_grids) == 3 and plan.budget_s <= 360
    # The TensorRT subprocess gets the plan through JSON.
    for smoke in (False, True):
        plan = gpu_check.Plan.make(smoke=smoke, budget_s=None)
        assert gpu_check.Plan.of_json(json.loads(json.dumps(vars(plan)))) == plan


def sweep_report(sweep: list[tuple[int, float, int]]) -> gpu_check.Report:
    """A report with raw fp16 at 8,000 img/s best, a decode ceiling of 3,000, and the sweep's
    (workers, img/s, errors)."""
    report = gpu_check.Report(gpu_check.Plan.make(smoke=False, budget_s=None))
    cuda = "CUDAExecutionProvider"
    report.raw = [
        {"provider": cuda, "precision": "fp32", "points": [{"batch": 256, "img_per_s": 9e3}]},
        {
            "provider": cuda,
            "precision": "fp16",
            "points": [{"batch": 32, "img_per_s": 7000.0}, {"batch": 256, "img_per_s": 8000.0}],
        },
    ]
    report.end_to_end = {
        "placement": {"provider": cuda},
        "decode": {"ceiling_img_per_s": 3000.0},
        "sweep": [
            {"workers": w, "img_per_s": rate, "errors": errors, "lost": 0}
            for w, rate, errors in sweep
        ],
    }
    return report


def test_the_sweeps_target_is_70_percent_of_the_lower_limit_with_no_errors() -> None:
    met = gpu_check.sweep_target(sweep_report([(1, 500.0, 0), (8, 2200.0, 0), (14, 2100.0, 0)]))
    assert met is not None
    assert (met["raw_fp16_best_img_per_s"], met["raw_fp16_best_batch"]) == (8000.0, 256)
    assert (met["limit_img_per_s"], met["bound_img_per_s"]) == (3000.0, 2100.0)
    assert (met["best_workers"], met["best_share_of_limit"], met["met"]) == (8, 0.733, True)
    assert "met; best workers=8" in gpu_check.target_line(met)
    # The fastest step had errors: it does not count.
    missed = gpu_check.sweep_target(sweep_report([(4, 2000.0, 0), (8, 2500.0, 3)]))
    assert missed is not None
    assert (missed["best_workers"], missed["met"]) == (4, False)
    assert "missed; best workers=4" in gpu_check.target_line(missed)
    none = gpu_check.sweep_target(sweep_report([(4, 2500.0, 1)]))
    assert none is not None and none["met"] is False and none["best_workers"] is None
    assert gpu_check.sweep_target(gpu_check.Report(gpu_check.Plan.make(False, None))) is None


def test_gpu_decoding_runs_only_where_the_setting_and_the_decoder_exist(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    gpu = gpu_check.Plan.make(smoke=False, budget_s=None)
    smoke = gpu_check.Plan.make(smoke=True, budget_s=None)

    class WithoutDecode:  # a checkout from before it
        model_fields: ClassVar[dict[str, object]] = {"workers": None}

    # The decoder's wheels are an optional part of the bundle: without them, the reason.
    monkeypatch.setattr(decodemode, "unavailable_reason", lambda: "no cvcuda here")
    assert gpu_check.gpu_decode_problem(gpu) == "no cvcuda here"
    monkeypatch.setattr(decodemode, "unavailable_reason", lambda: None)
    assert gpu_check.gpu_decode_problem(gpu) is None
    assert gpu_check.gpu_decode_problem(smoke) == "the smoke run has no GPU"
    monkeypatch.setattr(gpu_check, "Settings", WithoutDecode)
    assert "VIT_SERVE_DECODE is not a setting" in str(gpu_check.gpu_decode_problem(gpu))


# --- the graph kits ------------------------------------------------------------------------------


@pytest.mark.parametrize("size", sorted(SIZES))
@pytest.mark.parametrize("form", FORMS)
def test_each_kit_is_an_export_whose_weights_are_made_at_run_time(size: str, form: str) -> None:
    kit = GraphKit(size, form)
    manifest = kit.manifest()
    skeleton = kit.skeleton.read_bytes()
    assert hashlib.sha256(skeleton).hexdigest() == manifest["skeleton_sha256"]
    assert len(skeleton) < 1_000_000  # the GPU machine carries at most 64 MiB, all told
    graph = onnx.load_from_string(skeleton)
    # The export's graph: uint8 patches cast first, then everything else.
    assert [n.op_type for n in graph.graph.node if "patches" in n.input] == ["Cast"]
    external = {
        i.name for i in graph.graph.initializer if any(e.key == "location" for e in i.external_data)
    }
    assert external == {t["name"] for t in manifest["tensors"]}
    ends = sorted((t["offset"], t["offset"] + t["length"]) for t in manifest["tensors"])
    assert all(a[1] <= b[0] for a, b in itertools.pairwise(ends))  # no overlap
    assert ends[-1][1] <= manifest["data_bytes"]
    assert manifest["architecture"]["embed_dim"] == SIZES[size]["embed_dim"]


def test_a_materialised_kit_runs_at_any_grid_and_serves_from_a_repository(tmp_path: Path) -> None:
    kit = GraphKit("vit-smoke", "fused")
    graph = materialise(kit, tmp_path / "g")
    session = ort.InferenceSession(str(graph), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    for grid in [(14, 14), (7, 26), (18, 18)]:
        (logits,) = session.run(None, {"patches": rng.integers(0, 256, (2, *grid, 768), np.uint8)})
        assert logits.shape == (2, 10) and np.isfinite(logits).all() and logits.std() > 0.1
    # The same seed, the same weights.
    again = materialise(kit, tmp_path / "h")
    assert (tmp_path / "g" / "model.onnx.data").read_bytes() == (
        again.parent / "model.onnx.data"
    ).read_bytes()
    from app.models.repository import scan_repository

    name, _ = model_repository(kit, tmp_path / "repo")
    version = scan_repository(tmp_path / "repo").resolve(name, None)
    assert version.spec.versions[1].optimization.level == "fused"
    assert version.spec.architecture.grid == (14, 14) and version.rollout_path is None


def test_tensorrt_is_built_with_the_services_own_settings(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The engine measured is the one the service would build: every setting from the
    # environment as the service reads it, but for where the graphs and the cache are and the
    # provider measured.
    monkeypatch.setenv("VIT_SERVE_MAX_BATCH_SIZE", "64")
    monkeypatch.setenv("VIT_SERVE_FIT_MAX_TOKENS", "300")
    used = gpu_check.settings_for(tmp_path, "TensorrtExecutionProvider", tmp_path / "cache")
    service = Settings(model_repo=tmp_path, trt_cache_dir=tmp_path / "cache")
    different = {k for k, v in used.model_dump().items() if v != service.model_dump()[k]}
    assert different <= {"providers", "warmup"}
    assert (used.max_batch_size, used.fit_max_tokens, used.trt_fp16) == (64, 300, True)


class SteppedClock:
    """A clock whose time moves only when a service of the fake below runs."""

    def __init__(self, left: float) -> None:
        self.left = left


def test_the_sweep_leaves_out_what_the_time_left_cannot_hold(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    plan = gpu_check.Plan.make(smoke=False, budget_s=None)
    started: list[tuple[str, float]] = []
    broken: set[str] = set()

    class NoClients:
        def __init__(self, processes: int, bodies: list[bytes]) -> None:
            assert processes == plan.client_processes
            self.pids = list(range(processes))

        def __enter__(self) -> NoClients:
            return self

        def __exit__(self, *exc: object) -> None:
            pass

    def serve_levels(
        repo: Path,
        model: str,
        env: dict[str, str],
        levels: tuple[int, ...],
        plan_: gpu_check.Plan,
        clients: object,
        log: Path,
        ready_timeout_s: float,
    ) -> gpu_check.Served:
        # Each service takes 20 s to start, then its warm-up and its levels.
        started.append((env["VIT_SERVE_WORKERS"], ready_timeout_s))
        if env["VIT_SERVE_WORKERS"] in broken:
            raise TimeoutError("the server did not become ready")
        clock.left -= 20 + plan.warmup_s + len(levels) * plan.seconds_per_level
        measured = [
            {"workers": int(env["VIT_SERVE_WORKERS"]), "concurrency": c, "img_per_s": 100.0,
             "errors": 0, "lost": 0, "p50_ms": 1.0, "p99_ms": 2.0}
            for c in levels
        ]  # fmt: skip
        return gpu_check.Served(env, 20.0, measured, {"provider": "CUDAExecutionProvider"})

    monkeypatch.setattr(gpu_check, "Clients", NoClients)
    monkeypatch.setattr(gpu_check, "serve_levels", serve_levels)
    monkeypatch.setattr(
        gpu_check, "decode_ceiling", lambda *a: {"img_per_s_per_core": 1.0, "cores": 1,
                                                  "ceiling_img_per_s": 1.0}
    )  # fmt: skip
    monkeypatch.setattr(gpu_check, "gpu_decode_problem", lambda p: "not in this checkout")
    repo = gpu_check.DEMO_REPO
    # Enough for all four: the first needs 90 s of start (a guess) + 3 + 2 levels of 10 s (+10);
    # the others 30 (the 20 s measured, x1.5) + 3 + 10 (+10).
    clock = SteppedClock(200.0)
    done = gpu_check.end_to_end(repo, "demo-shapes", plan, clock, tmp_path, None)  # type: ignore[arg-type]
    assert [w for w, _ in started] == ["1", "4", "8", "14"]
    assert [lv["workers"] for lv in done["sweep"]] == [1, 4, 8, 14]
    assert [lv["concurrency"] for lv in done["levels"]] == [64, 256]
    assert done["not_measured"] == [] and done["gpu_decode"] == {"skipped": "not in this checkout"}
    # 150 s: after three steps 41 s are left, short of the 53 the fourth needs.
    started.clear()
    clock = SteppedClock(150.0)
    done = gpu_check.end_to_end(repo, "demo-shapes", plan, clock, tmp_path, None)  # type: ignore[arg-type]
    assert [w for w, _ in started] == ["1", "4", "8"]
    assert done["not_measured"] == ["workers=14 (time budget)"] and done["failed"] == []
    # Each service may take the time left beyond its warm-up, its levels and 10 s to stop.
    assert started[0][1] == pytest.approx(150.0 - 3 - 20 - 10)
    # A step whose service fails is reported; the steps before and after still count.
    started.clear()
    broken.add("8")
    clock = SteppedClock(200.0)
    done = gpu_check.end_to_end(repo, "demo-shapes", plan, clock, tmp_path, None)  # type: ignore[arg-type]
    assert [lv["workers"] for lv in done["sweep"]] == [1, 4, 14]
    assert done["failed"] == ["workers=8: TimeoutError: the server did not become ready"]
