"""fp32 and int8 versions of one model served side by side: /models tells their forms apart,
both answer, they agree, and rollout maps still come from the fp32 rollout graph. No PyTorch:
the int8 graph is made here from the bundled demo model's fp32 graph by the export's quantiser
(export/quantize.py imports no PyTorch)."""

from __future__ import annotations

import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from PIL import Image

from app.core.settings import Settings
from app.models.repository import sha256_of
from app.models.spec import (
    GRAPH_FILENAME,
    ROLLOUT_GRAPH_FILENAME,
    SPEC_FILENAME,
    GraphFiles,
    GraphOptimization,
    ModelSpec,
)
from export.demo.shapes import CLASSES, generate
from export.quantize import (
    DEFAULT_METHOD,
    Gate,
    demo_held_out,
    failures,
    measure_gate,
    quantize,
)
from tests.images import encode
from tests.support import DEMO_MODEL, need_folder, serve

pytestmark = pytest.mark.anyio

DEMO = "demo-shapes"
SEED = 778  # neither a training seed nor the gate's


def _fp32_version(spec: ModelSpec) -> int:
    return min(v for v, f in spec.versions.items() if f.optimization.level != "int8")


@pytest.fixture(scope="module")
def side_by_side(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """demo-shapes with version 1 its fp32 graph and version 2 the int8 one, gate recorded."""
    need_folder(DEMO_MODEL, "the demo model (trained by export/demo)")
    root = tmp_path_factory.mktemp("int8") / "repo"
    bundled = ModelSpec.load(DEMO_MODEL / SPEC_FILENAME)
    v = _fp32_version(bundled)
    (root / DEMO / "1").mkdir(parents=True)
    for name in (GRAPH_FILENAME, ROLLOUT_GRAPH_FILENAME):
        shutil.copy(DEMO_MODEL / str(v) / name, root / DEMO / "1" / name)
    (root / DEMO / "2").mkdir()
    fp32, int8 = root / DEMO / "1" / GRAPH_FILENAME, root / DEMO / "2" / GRAPH_FILENAME
    quantize(fp32, int8, DEFAULT_METHOD)
    shutil.copy(root / DEMO / "1" / ROLLOUT_GRAPH_FILENAME, root / DEMO / "2")
    record = measure_gate(fp32, int8, demo_held_out(bundled, 200), Gate(), "test")
    files = bundled.versions[v]
    versions = {
        1: files,
        2: GraphFiles(
            model=sha256_of(int8),
            rollout=files.rollout,
            optimization=GraphOptimization(level="int8", int8=record),
        ),
    }
    bundled.model_copy(update={"versions": versions}).dump(root / DEMO / SPEC_FILENAME)
    return root


@pytest.fixture(scope="module")
async def client(side_by_side: Path) -> AsyncIterator[httpx.AsyncClient]:
    async with serve(Settings(model_repo=side_by_side, default_model=DEMO)) as c:
        yield c


def _shapes(count: int) -> list[tuple[bytes, int]]:
    batch = generate(count, seed=SEED)
    return [
        (encode(Image.fromarray(img), "PNG"), int(label))
        for img, label in zip(batch.images, batch.labels, strict=True)
    ]


async def test_models_lists_each_versions_form(client: httpx.AsyncClient) -> None:
    (demo,) = (await client.get("/models")).json()["models"]
    assert demo["versions"] == [1, 2] and demo["default_version"] == 2
    fp32_form = ModelSpec.load(DEMO_MODEL / SPEC_FILENAME).versions[1].optimization.level
    assert demo["version_optimization"] == {"1": fp32_form, "2": "int8"}
    assert demo["optimization"] == "int8"  # the default version's


async def test_fp32_and_int8_versions_both_answer_and_agree(client: httpx.AsyncClient) -> None:
    images = _shapes(16)
    top1: dict[int, list[str]] = {}
    for version in (1, 2):
        files = [("image", (f"{i}.png", data, "image/png")) for i, (data, _) in enumerate(images)]
        response = await client.post(
            "/classify", params={"version": version, "top_k": 1}, files=files
        )
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["version"] == version
        top1[version] = [r["predictions"][0]["label"] for r in body["results"]]
    # 99.8% agreement on the gate's 1000 images; a near-tie may flip on another CPU's kernels.
    assert sum(a == b for a, b in zip(top1[1], top1[2], strict=True)) >= 15
    right = sum(label == CLASSES[truth] for label, (_, truth) in zip(top1[2], images, strict=True))
    assert right >= 14  # 97.6% held-out accuracy


async def test_an_int8_version_serves_rollout_maps_from_its_fp32_rollout_graph(
    client: httpx.AsyncClient,
) -> None:
    (data, _), *_ = _shapes(1)
    response = await client.post(
        "/classify",
        params={"version": 2, "rollout": "true"},
        files=[("image", ("a.png", data, "image/png"))],
    )
    assert response.status_code == 200, response.text
    grid = response.json()["results"][0]["rollout"]["grid"]
    assert len(grid) == 8 and len(grid[0]) == 8 and max(max(row) for row in grid) == 1.0


def test_the_gate_recorded_for_the_side_by_side_version_passes(side_by_side: Path) -> None:
    gate = ModelSpec.load(side_by_side / DEMO / SPEC_FILENAME).versions[2].optimization.int8
    assert gate is not None and failures(gate, Gate()) == []


async def test_beside_a_gpu_the_int8_version_stands_aside_and_fp32_is_the_default(
    side_by_side: Path,
) -> None:
    # CUDA offered (the GPU build lists it on any machine): the int8 graph would run its
    # matrix products on the CPU between copies, so it is not served there, and says why.
    gpu = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    async with serve(Settings(model_repo=side_by_side, default_model=DEMO, providers=gpu)) as c:
        body = (await c.get("/models")).json()
        (demo,) = body["models"]
        assert demo["versions"] == [1] and demo["default_version"] == 1
        (aside,) = body["not_ready"]
        assert (aside["model"], aside["version"]) == (DEMO, 2)
        assert "int8, a CPU form" in aside["reason"]
        assert body["replica_not_ready"] is None  # the replica still serves
        assert (await c.get("/readyz")).status_code == 200
        response = await c.post("/classify", params={"version": 2}, files=_files(1))
        assert response.status_code == 503 and "int8, a CPU form" in response.text


def _files(count: int) -> list[tuple[str, tuple[str, bytes, str]]]:
    return [
        ("image", (f"{i}.png", data, "image/png")) for i, (data, _) in enumerate(_shapes(count))
    ]
