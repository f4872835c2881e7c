"""POST /classify?rollout=...: attention rollout grids and heatmaps, beside plain requests."""

from __future__ import annotations

import asyncio
import base64
import io
import shutil
import threading
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import onnxruntime as ort
import pytest
from numpy.typing import NDArray
from PIL import ExifTags, Image

from app.core.settings import Settings
from app.models.repository import ModelVersion
from app.models.spec import GraphFiles, ModelSpec, RolloutParams
from app.pipeline.preprocess import ResizePolicy, prepare
from app.runtime.backends import Backend, RolloutBackend
from app.runtime.sessions import onnx_backends, onnx_rollout_backends
from tests.images import encode, jpeg, noise, png, smooth
from tests.support import TinyRepo, serve

pytestmark = pytest.mark.anyio

FUSION_INDEX = {"mean": 0, "max": 1, "min": 2}
NO_ROLLOUT_GRAPH = (
    "model 'tiny' version 2 has no rollout graph (model.rollout.onnx), so it cannot give "
    "rollout maps: re-export it with `python -m export` (which writes both graphs), or ask "
    "without rollout"
)


def raw(data: bytes, content_type: str = "image/png") -> dict[str, Any]:
    return {"content": data, "headers": {"content-type": content_type}}


def spec_of(tiny_repo: TinyRepo) -> ModelSpec:
    return ModelSpec.load(tiny_repo.root / "tiny" / "model.json")


def graph_rollout(
    tiny_repo: TinyRepo,
    data: bytes,
    *,
    version: int = 2,
    resize: ResizePolicy = "crop",
    head_fusion: str = "mean",
    discard_ratio: float = 0.0,
) -> NDArray[np.float32]:
    """The rollout graph run directly on the patches the service makes, scaled to max 1."""
    prepared = prepare(
        data, spec_of(tiny_repo), resize, name="x", max_pixels=10**8, fit_max_tokens=128
    )
    session = ort.InferenceSession(
        str(tiny_repo.root / "tiny" / str(version) / "model.rollout.onnx"),
        providers=["CPUExecutionProvider"],
    )
    (rollout,) = session.run(
        ["rollout"],
        {
            "patches": prepared.patches[None],
            "head_fusion": np.array(FUSION_INDEX[head_fusion], dtype=np.int64),
            "discard_ratio": np.array(discard_ratio, dtype=np.float32),
        },
    )
    grid = np.asarray(rollout[0], dtype=np.float32)
    return np.asarray(grid / grid.max(), dtype=np.float32)


def heatmap_of(result: dict[str, Any]) -> Image.Image:
    data = base64.b64decode(result["rollout"]["heatmap_png"], validate=True)
    image = Image.open(io.BytesIO(data))
    assert image.format == "PNG"
    image.load()  # a truncated or corrupt PNG fails here
    return image


def rotated_jpeg(width: int, height: int) -> bytes:
    """A JPEG stored `width` x `height` whose EXIF says: turn it a quarter (display: h x w)."""
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = 6
    return encode(smooth(width, height), "JPEG", quality=90, exif=exif)


# --- the grid -----------------------------------------------------------------------------------


async def test_rollout_true_adds_the_graph_s_map_scaled_to_one(
    client: httpx.AsyncClient, tiny_repo: TinyRepo
) -> None:
    data = png(96, 72, seed=11)
    plain = await client.post("/classify", **raw(data))
    response = await client.post("/classify", params={"rollout": "true"}, **raw(data))
    assert response.status_code == 200
    (result,) = response.json()["results"]
    rollout = result["rollout"]
    assert set(rollout) == {"grid", "head_fusion", "discard_ratio"}  # no heatmap unless asked
    assert (rollout["head_fusion"], rollout["discard_ratio"]) == ("mean", 0.0)
    grid = np.array(rollout["grid"])
    assert grid.shape == tuple(result["grid"]) == (8, 8)
    assert grid.max() == 1.0
    np.testing.assert_allclose(grid, graph_rollout(tiny_repo, data), atol=1e-5)
    # The same weights: the rollout graph's predictions are the plain graph's.
    (plain_result,) = plain.json()["results"]
    assert "rollout" not in plain_result
    assert [p["index"] for p in result["predictions"]] == [
        p["index"] for p in plain_result["predictions"]
    ]
    np.testing.assert_allclose(
        [p["score"] for p in result["predictions"]],
        [p["score"] for p in plain_result["predictions"]],
        atol=1e-5,
    )


async def test_a_non_square_fit_grid_has_grid_h_rows_of_grid_w_values(
    client: httpx.AsyncClient, tiny_repo: TinyRepo
) -> None:
    data = png(128, 64, seed=12)
    response = await client.post(
        "/classify", params={"rollout": "true", "resize": "fit", "version": 1}, **raw(data)
    )
    (result,) = response.json()["results"]
    assert result["grid"] == [6, 11]
    grid = np.array(result["rollout"]["grid"])
    assert grid.shape == (6, 11)
    expected = graph_rollout(tiny_repo, data, version=1, resize="fit")
    np.testing.assert_allclose(grid, expected, atol=1e-5)


@pytest.mark.parametrize(
    ("head_fusion", "discard_ratio"), [("max", 0.0), ("min", 0.0), ("mean", 0.5), ("max", 0.9)]
)
async def test_head_fusion_and_discard_ratio_reach_the_graph(
    client: httpx.AsyncClient, tiny_repo: TinyRepo, head_fusion: str, discard_ratio: float
) -> None:
    data = png(80, 80, seed=13)
    default = await client.post("/classify", params={"rollout": "true"}, **raw(data))
    params: dict[str, str | float] = {
        "rollout": "true",
        "head_fusion": head_fusion,
        "discard_ratio": discard_ratio,
    }
    response = await client.post("/classify", params=params, **raw(data))
    assert response.status_code == 200
    rollout = response.json()["results"][0]["rollout"]
    assert (rollout["head_fusion"], rollout["discard_ratio"]) == (head_fusion, discard_ratio)
    grid = np.array(rollout["grid"])
    expected = graph_rollout(tiny_repo, data, head_fusion=head_fusion, discard_ratio=discard_ratio)
    np.testing.assert_allclose(grid, expected, atol=1e-5)
    default_grid = np.array(default.json()["results"][0]["rollout"]["grid"])
    assert np.abs(grid - default_grid).max() > 1e-3  # another map, not the default one


async def test_each_image_of_a_multi_image_request_gets_its_own_map(
    client: httpx.AsyncClient, tiny_repo: TinyRepo
) -> None:
    images = [png(64, 64, seed=20), jpeg(100, 70, seed=21), png(70, 90, seed=22)]
    files = [("image", (f"{i}.img", data, "image/png")) for i, data in enumerate(images)]
    response = await client.post("/classify", params={"rollout": "true"}, files=files)
    assert response.status_code == 200
    for result, data in zip(response.json()["results"], images, strict=True):
        expected = graph_rollout(tiny_repo, data)
        np.testing.assert_allclose(result["rollout"]["grid"], expected, atol=1e-5)


# --- the heatmap --------------------------------------------------------------------------------


async def test_rollout_png_is_a_heatmap_over_the_centre_crop_of_the_original_image(
    client: httpx.AsyncClient,
) -> None:
    original = noise(150, 90, seed=14)
    response = await client.post(
        "/classify", params={"rollout": "png"}, **raw(encode(original, "PNG"))
    )
    assert response.status_code == 200
    (result,) = response.json()["results"]
    assert set(result["rollout"]) == {"grid", "head_fusion", "discard_ratio", "heatmap_png"}
    heatmap = heatmap_of(result)
    assert (heatmap.mode, heatmap.size) == ("RGB", (150, 90))
    drawn, pixels = np.asarray(heatmap), np.asarray(original)
    # The crop policy showed the model x 35..114, y 5..84 of the image (the centre crop, mapped
    # back through the resize): heat there, the original pixels untouched everywhere else.
    seen = np.zeros((90, 150), dtype=bool)
    seen[5:84, 35:114] = True
    assert np.array_equal(drawn[~seen], pixels[~seen])
    assert np.mean(np.any(drawn[seen] != pixels[seen], axis=-1)) > 0.9


async def test_with_fit_the_heatmap_covers_the_whole_non_square_image(
    client: httpx.AsyncClient,
) -> None:
    original = noise(50, 120, seed=15)
    response = await client.post(
        "/classify", params={"rollout": "png", "resize": "fit"}, **raw(encode(original, "PNG"))
    )
    (result,) = response.json()["results"]
    heatmap = heatmap_of(result)
    assert heatmap.size == (50, 120)
    changed = np.any(np.asarray(heatmap) != np.asarray(original), axis=-1)  # (120, 50)
    assert changed.any(axis=0).all() and changed.any(axis=1).all()  # no row or column left out


async def test_an_exif_rotated_jpeg_gets_a_heatmap_of_the_rotated_size(
    client: httpx.AsyncClient,
) -> None:
    response = await client.post(
        "/classify", params={"rollout": "png"}, **raw(rotated_jpeg(120, 80), "image/jpeg")
    )
    assert response.status_code == 200
    (result,) = response.json()["results"]
    assert result["image_size"] == [80, 120]
    assert heatmap_of(result).size == (80, 120)


# --- plain and rollout together ------------------------------------------------------------------


class Recorder:
    """The real ONNX backends, wrapped to record each batch's graph and size; can hold the first."""

    def __init__(self, settings: Settings) -> None:
        self._plain = onnx_backends(settings)
        self._rollout = onnx_rollout_backends(settings)
        self.batches: list[tuple[str, int]] = []
        self.gate = threading.Event()
        self.gate.set()
        self.started = threading.Event()

    def _record(self, graph: str, size: int) -> None:
        self.batches.append((graph, size))
        self.started.set()
        self.gate.wait(timeout=10)

    def plain(self, version: ModelVersion) -> Backend:
        inner = self._plain(version)
        recorder = self

        class Plain:
            provider = inner.provider

            def run(self, patches: NDArray[np.uint8]) -> NDArray[np.float32]:
                recorder._record("plain", len(patches))
                return inner.run(patches)

        return Plain()

    def rollout(self, version: ModelVersion) -> RolloutBackend | None:
        found = self._rollout(version)
        if found is None:
            return None
        inner: RolloutBackend = found  # the class body below does not see the narrowing
        recorder = self

        class Rollout:
            provider = inner.provider

            def run(
                self, patches: NDArray[np.uint8], params: RolloutParams
            ) -> tuple[NDArray[np.float32], NDArray[np.float32]]:
                recorder._record("rollout", len(patches))
                return inner.run(patches, params)

        return Rollout()


async def test_plain_and_rollout_requests_in_flight_together_are_each_answered_correctly(
    tiny_repo: TinyRepo,
) -> None:
    settings = Settings(model_repo=tiny_repo.root, warmup=False)
    recorder = Recorder(settings)
    async with serve(settings, recorder.plain, recorder.rollout) as client:
        recorder.gate.clear()
        blocker = asyncio.create_task(client.post("/classify", **raw(png(64, 64, seed=30))))
        assert await asyncio.to_thread(recorder.started.wait, 10)
        images = [png(64 + 8 * i, 64, seed=31 + i) for i in range(6)]
        tasks = [
            asyncio.create_task(
                client.post("/classify", params={"rollout": "true"} if i % 2 else {}, **raw(data))
            )
            for i, data in enumerate(images)
        ]
        await asyncio.sleep(0.2)  # all six are queued behind the held batch
        recorder.gate.set()
        assert (await blocker).status_code == 200
        responses = [await task for task in tasks]
    for i, (data, response) in enumerate(zip(images, responses, strict=True)):
        assert response.status_code == 200
        (result,) = response.json()["results"]
        if i % 2:
            np.testing.assert_allclose(
                result["rollout"]["grid"], graph_rollout(tiny_repo, data), atol=1e-5
            )
        else:
            assert "rollout" not in result
    # Three plain images ran as one batch of the plain graph, three rollout ones as one of the
    # rollout graph: they batch among their own kind and never share a batch. Which of the two
    # goes first depends on which image the decoding threads finished first (the oldest key
    # leaves first), so their order is not asserted.
    assert recorder.batches[0] == ("plain", 1)
    assert sorted(recorder.batches[1:]) == [("plain", 3), ("rollout", 3)]


# --- errors -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def repo_without_rollout(tiny_repo: TinyRepo, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model as an older export left it: model.onnx only, no rollout in model.json."""
    root = tmp_path_factory.mktemp("no_rollout_repo")
    shutil.copytree(tiny_repo.root / "tiny", root / "tiny")
    spec = ModelSpec.load(root / "tiny" / "model.json")
    for version in spec.versions:
        (root / "tiny" / str(version) / "model.rollout.onnx").unlink()
    versions = {v: GraphFiles(model=files.model) for v, files in spec.versions.items()}
    spec.model_copy(update={"rollout": None, "versions": versions}).dump(
        root / "tiny" / "model.json"
    )
    return root


@pytest.mark.parametrize("mode", ["true", "png"])
async def test_rollout_from_a_model_without_a_rollout_graph_is_a_400_that_says_re_export(
    repo_without_rollout: Path, mode: str
) -> None:
    async with serve(Settings(model_repo=repo_without_rollout)) as client:
        response = await client.post("/classify", params={"rollout": mode}, **raw(png()))
        assert (response.status_code, response.json()) == (400, {"detail": NO_ROLLOUT_GRAPH})
        plain = await client.post("/classify", **raw(png()))
        assert plain.status_code == 200
        models = (await client.get("/models")).json()["models"]
        assert models[0]["rollout_versions"] == []


@pytest.mark.parametrize(
    ("params", "message"),
    [
        (
            {"rollout": "yes"},
            "query parameter 'rollout': Input should be 'false', 'true' or 'png'",
        ),
        (
            {"rollout": "true", "head_fusion": "average"},
            "query parameter 'head_fusion': Input should be 'mean', 'max' or 'min'",
        ),
        (
            {"rollout": "true", "discard_ratio": "1"},
            "query parameter 'discard_ratio': Input should be less than 1",
        ),
        (
            {"rollout": "true", "discard_ratio": "-0.1"},
            "query parameter 'discard_ratio': Input should be greater than or equal to 0",
        ),
        (
            {"rollout": "true", "discard_ratio": "nan"},
            "query parameter 'discard_ratio': Input should be a finite number",
        ),
        (
            {"rollout": "png", "discard_ratio": "half"},
            "query parameter 'discard_ratio': Input should be a valid number, unable to parse "
            "string as a number",
        ),
    ],
)
async def test_bad_rollout_parameters_are_a_422_that_names_them(
    client: httpx.AsyncClient, params: dict[str, str], message: str
) -> None:
    response = await client.post("/classify", params=params, **raw(png()))
    assert (response.status_code, response.json()) == (422, {"detail": message})
