"""The service against the PyTorch model it was exported from: patchify, the sessions' logits
and rollout, /classify's answers. (That the tiny repository the service's tests run on is what
the export writes today: tests/export/test_tiny_repository.py.)"""

from __future__ import annotations

from typing import Any

import httpx
import numpy as np
import pytest
import torch

from app.engine import softmax
from app.models.repository import scan_repository
from app.models.spec import HEAD_FUSIONS, HeadFusion, ModelSpec, RolloutParams
from app.pipeline.preprocess import ResizePolicy, patchify, prepare
from app.runtime.backends import CPU, OnnxBackend, OnnxRolloutBackend
from export.rollout import RolloutViT
from export.vit import patchify as torch_patchify
from tests.export.tiny import TinyTorchRepo
from tests.images import jpeg, png

# --- patches, logits and rollout maps -----------------------------------------------------------


@pytest.mark.parametrize(("height", "width", "patch"), [(64, 64, 8), (48, 80, 8), (32, 96, 16)])
def test_numpy_patchify_equals_the_reference_torch_patchify(
    height: int, width: int, patch: int
) -> None:
    pixels = np.random.default_rng(height + width).integers(
        0, 256, (height, width, 3), dtype=np.uint8
    )
    expected = torch_patchify(torch.from_numpy(pixels)[None], patch)[0].numpy()
    got = patchify(pixels, patch)
    assert got.dtype == np.uint8
    assert got.flags.c_contiguous
    assert got.shape == (height // patch, width // patch, patch * patch * 3)
    np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize(("policy", "size"), [("crop", (120, 90)), ("fit", (160, 64))])
def test_prepared_patches_give_the_logits_of_the_pytorch_model(
    tiny_repo: TinyTorchRepo, policy: str, size: tuple[int, int]
) -> None:
    version = scan_repository(tiny_repo.root).resolve(None, 1)
    backend = OnnxBackend(version.graph_path, version.spec, [CPU])
    prepared = [
        prepare(
            png(*size, seed=seed),
            version.spec,
            "fit" if policy == "fit" else "crop",
            name="test",
            max_pixels=10**6,
            fit_max_tokens=128,
        )
        for seed in (1, 2)
    ]
    batch = np.stack([p.patches for p in prepared])
    with torch.no_grad():
        expected = tiny_repo.models[1](torch.from_numpy(batch)).numpy()
    got = backend.run(batch)
    assert got.dtype == np.float32
    assert got.shape == (2, 10)
    np.testing.assert_allclose(got, expected, atol=1e-4)


@pytest.mark.parametrize(
    ("head_fusion", "discard_ratio", "grid"),
    [("mean", 0.0, (8, 8)), ("max", 0.5, (6, 11)), ("min", 0.9, (4, 4))],
)
def test_the_rollout_backend_gives_the_pytorch_rollout_and_logits(
    tiny_repo: TinyTorchRepo, head_fusion: HeadFusion, discard_ratio: float, grid: tuple[int, int]
) -> None:
    version = scan_repository(tiny_repo.root).resolve(None, 1)
    assert version.rollout_path is not None
    backend = OnnxRolloutBackend(version.rollout_path, version.spec, [CPU])
    backend.warm_up(grid=grid, batch=2)
    rng = np.random.default_rng(3)
    patches = rng.integers(0, 256, (2, *grid, version.spec.architecture.patch_dim), dtype=np.uint8)
    logits, rollout = backend.run(patches, RolloutParams(head_fusion, discard_ratio))
    fusion = torch.tensor(HEAD_FUSIONS.index(head_fusion))
    with torch.no_grad():
        expected_logits, expected_rollout = RolloutViT(tiny_repo.models[1])(
            torch.from_numpy(patches), fusion, torch.tensor(discard_ratio, dtype=torch.float32)
        )
    assert logits.dtype == rollout.dtype == np.dtype(np.float32)
    assert rollout.shape == (2, *grid)
    np.testing.assert_allclose(logits, expected_logits.numpy(), atol=1e-4)
    np.testing.assert_allclose(rollout, expected_rollout.numpy(), atol=1e-5)


# --- /classify ----------------------------------------------------------------------------------


def raw(data: bytes, content_type: str = "image/jpeg") -> dict[str, Any]:
    return {"content": data, "headers": {"content-type": content_type}}


def expected_probs(
    tiny_repo: TinyTorchRepo, version: int, data: bytes, resize: ResizePolicy = "crop"
) -> np.ndarray:
    """What the PyTorch model says about the image, preprocessed as the service does."""
    spec = ModelSpec.load(tiny_repo.root / "tiny" / "model.json")
    prepared = prepare(data, spec, resize, name="x", max_pixels=10**8, fit_max_tokens=128)
    with torch.no_grad():
        logits = tiny_repo.models[version](torch.from_numpy(prepared.patches[None])).numpy()
    return softmax(logits[0])


def assert_matches(result: dict[str, Any], probs: np.ndarray) -> None:
    predictions = result["predictions"]
    scores = [p["score"] for p in predictions]
    assert scores == sorted(scores, reverse=True)
    order = np.argsort(-probs, kind="stable")[: len(predictions)]
    assert [p["index"] for p in predictions] == order.tolist()
    assert [p["label"] for p in predictions] == [f"class-{i}" for i in order]
    np.testing.assert_allclose(scores, probs[order], atol=1e-5)


@pytest.mark.anyio
async def test_three_images_in_one_multipart_request_are_answered_in_order(
    client: httpx.AsyncClient, tiny_repo: TinyTorchRepo
) -> None:
    images = [jpeg(96, 72, seed=0), png(128, 64, seed=1), png(50, 120, seed=2)]
    files = [("image", (f"{i}.img", data, "image/png")) for i, data in enumerate(images)]
    response = await client.post("/classify", files=files)
    assert response.status_code == 200
    body = response.json()
    assert (body["model"], body["version"]) == ("tiny", 2)
    assert set(body["timing"]) == {"preprocess_ms", "inference_ms", "total_ms"}
    sizes = [r["image_size"] for r in body["results"]]
    assert sizes == [[96, 72], [128, 64], [50, 120]]
    for result, data in zip(body["results"], images, strict=True):
        assert (result["grid"], result["resize"]) == ([8, 8], "crop")
        assert len(result["predictions"]) == 5
        assert_matches(result, expected_probs(tiny_repo, 2, data))


@pytest.mark.anyio
async def test_a_raw_image_body_is_classified(
    client: httpx.AsyncClient, tiny_repo: TinyTorchRepo
) -> None:
    data = jpeg(120, 90, seed=4)
    response = await client.post("/classify", **raw(data))
    assert response.status_code == 200
    (result,) = response.json()["results"]
    assert result["image_size"] == [120, 90]
    assert_matches(result, expected_probs(tiny_repo, 2, data))


@pytest.mark.anyio
async def test_the_version_parameter_selects_the_weights(
    client: httpx.AsyncClient, tiny_repo: TinyTorchRepo
) -> None:
    data = png(64, 64, seed=5)
    response = await client.post("/classify", params={"version": 1, "top_k": 10}, **raw(data))
    assert response.status_code == 200
    assert response.json()["version"] == 1
    assert_matches(response.json()["results"][0], expected_probs(tiny_repo, 1, data))
    named = await client.post("/classify", params={"model": "tiny", "version": 2}, **raw(data))
    assert named.json()["version"] == 2


@pytest.mark.anyio
async def test_fit_keeps_the_aspect_ratio_in_the_grid(
    client: httpx.AsyncClient, tiny_repo: TinyTorchRepo
) -> None:
    data = png(128, 64, seed=6)
    response = await client.post("/classify", params={"resize": "fit"}, **raw(data, "image/png"))
    (result,) = response.json()["results"]
    assert (result["grid"], result["resize"]) == ([6, 11], "fit")
    assert_matches(result, expected_probs(tiny_repo, 2, data, "fit"))
