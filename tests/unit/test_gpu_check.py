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

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from PIL import Image

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
    assert report["errors"] == [] and report["skipped"] == []
    env_ = report["environment"]
    assert env_["onnxruntime"] == ort.__version__ and env_["python"]
    # Placement as ONNX Runtime recorded it, for the demo model and both ViT forms.
    assert set(report["placement"]) == {
        "demo-shapes CPUExecutionProvider",
        "vit-smoke-fused CPUExecutionProvider",
        "vit-smoke-fp16 CPUExecutionProvider",
    }
    assert all(p["provider"] == "CPUExecutionProvider" for p in report["placement"].values())
    assert len(report["parity"]) == 9 and all(row["passed"] for row in report["parity"])
    assert [(r["precision"], [p["batch"] for p in r["points"]]) for r in report["raw"]] == [
        ("fp32", [1, 8]),
        ("fp16", [1, 8]),
    ]
    e2e = report["end_to_end"]
    assert e2e["placement"]["provider"] == "CPUExecutionProvider"
    assert e2e["decode"]["ceiling_img_per_s"] > 0
    assert [level["concurrency"] for level in e2e["levels"]] == [4, 16]
    assert all(level["ok"] > 0 and level["errors"] == level["lost"] == 0 for level in e2e["levels"])
    with Image.open(tmp_path / "gpu_check_smoke.png") as png:
        assert png.size == (1000, 460)
    assert "parity: 9/9 within bounds" in done.stdout
    assert "service c=16:" in done.stdout and "decode ceiling:" in done.stdout


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
    assert len(plan.parity_grids) == 3 and plan.budget_s <= 360


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
    from app.core.settings import Settings

    monkeypatch.setenv("VIT_SERVE_MAX_BATCH_SIZE", "64")
    monkeypatch.setenv("VIT_SERVE_FIT_MAX_TOKENS", "300")
    used = gpu_check.settings_for(tmp_path, "TensorrtExecutionProvider", tmp_path / "cache")
    service = Settings(model_repo=tmp_path, trt_cache_dir=tmp_path / "cache")
    different = {k for k, v in used.model_dump().items() if v != service.model_dump()[k]}
    assert different <= {"providers", "warmup"}
    assert (used.max_batch_size, used.fit_max_tokens, used.trt_fp16) == (64, 300, True)
