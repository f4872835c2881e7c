"""/healthz, /readyz and /models."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from app.core.settings import Settings
from app.main import create_app
from app.models.repository import RepositoryError
from tests.support import TinyRepo

pytestmark = pytest.mark.anyio

NOT_READY = "the models are not loaded yet or the server is stopping; retry"


async def test_healthz_answers_ok(client: httpx.AsyncClient) -> None:
    response = await client.get("/healthz")
    assert (response.status_code, response.json()) == (200, {"status": "ok"})


async def test_readyz_is_ready_once_models_are_loaded_and_warm(client: httpx.AsyncClient) -> None:
    response = await client.get("/readyz")
    assert (response.status_code, response.json()) == (200, {"status": "ready"})


async def test_readyz_is_503_before_start_and_after_stop_while_healthz_stays_up(
    tiny_repo: TinyRepo,
) -> None:
    app = create_app(Settings(model_repo=tiny_repo.root))
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
        before = await c.get("/readyz")
        assert (before.status_code, before.json()) == (503, {"detail": NOT_READY})
        assert before.headers["retry-after"] == "1"
        async with app.router.lifespan_context(app):
            assert (await c.get("/readyz")).status_code == 200
        after = await c.get("/readyz")
        assert (after.status_code, after.json()) == (503, {"detail": NOT_READY})
        refused = await c.post("/classify", content=b"x", headers={"content-type": "image/png"})
        assert (refused.status_code, refused.json()) == (503, {"detail": NOT_READY})
        assert (await c.get("/healthz")).status_code == 200


async def test_models_describes_each_model(client: httpx.AsyncClient) -> None:
    response = await client.get("/models")
    assert response.status_code == 200
    (model,) = response.json()["models"]
    placement, wanted, fallback = model["placement"], model["wanted_provider"], model["fallback"]
    # The client's app is shared: what earlier tests sent is counted, all of it on the CPU path.
    decoded = model["decode"]["images"]
    assert set(decoded) <= {"cpu/off"}
    assert response.json() == {
        "default_model": "tiny",
        "models": [
            {
                "name": "tiny",
                "default": True,
                "versions": [1, 2],
                "default_version": 2,
                "rollout_versions": [1, 2],
                "num_classes": 10,
                "patch_size": 8,
                "backbone": None,
                "native_grid": [8, 8],
                "input_size": [64, 64],
                "fit_max_tokens": 128,
                "preprocess": {
                    "resize_mode": "shorter_side",
                    "crop_pct": 0.875,
                    "interpolation": "bicubic",
                },
                "decode": {
                    "where": "cpu",
                    "decoder": "no model version runs on a GPU (CUDA or TensorRT)",
                    "images": decoded,
                },
                "provider": "CPUExecutionProvider",
                "placement": placement,
                "wanted_provider": wanted,
                "fallback": fallback,
                "optimization": "fused",
                "version_optimization": {"1": "fused", "2": "fused"},
                "tensorrt_fp16": None,
            }
        ],
        "not_ready": [],
        "replica_not_ready": None,
    }
    # Where the nodes run, from ONNX Runtime's assignment: all on the CPU on a machine without
    # a GPU (onnxruntime-gpu then wanted CUDA, and says why it is not there).
    assert set(placement) == {"CPUExecutionProvider"} and placement["CPUExecutionProvider"] > 0
    assert (wanted == "CPUExecutionProvider") == (fallback is None)


async def test_the_openapi_document_describes_the_upload_body(client: httpx.AsyncClient) -> None:
    body = (await client.get("/openapi.json")).json()["paths"]["/classify"]["post"]["requestBody"]
    assert set(body["content"]) == {"multipart/form-data", "image/*"}


async def test_an_empty_repository_starts_not_ready_and_a_missing_one_stops_the_start(
    tmp_path: Path,
) -> None:
    app = create_app(Settings(model_repo=tmp_path))
    transport = httpx.ASGITransport(app=app)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=transport, base_url="http://test") as c,
    ):
        ready = await c.get("/readyz")
        assert (ready.status_code, ready.json()) == (
            503,
            {"detail": "the model repository is empty: add a model and reload"},
        )
        assert (await c.get("/healthz")).status_code == 200
        models = await c.get("/models")
        assert models.json() == {
            "default_model": None,
            "models": [],
            "not_ready": [],
            "replica_not_ready": None,
        }
    missing = create_app(Settings(model_repo=tmp_path / "missing"))
    with pytest.raises(RepositoryError, match="is not a folder"):
        async with missing.router.lifespan_context(missing):
            pass
