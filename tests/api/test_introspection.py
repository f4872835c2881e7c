"""GET /models/{name}/introspection and POST .../attention-distance on the bundled demo model.

(The per-image attention distance against PyTorch's: tests/export/test_introspection.py.)
"""

from __future__ import annotations

import base64
import io
from collections.abc import AsyncIterator

import httpx
import numpy as np
import pytest
from PIL import Image

from app.core.settings import Settings
from export.demo.shapes import generate
from tests.images import encode
from tests.support import DEMO_MODEL, need_folder, serve

pytestmark = pytest.mark.anyio

DEMO = "demo-shapes"


@pytest.fixture(scope="module")
async def demo_client() -> AsyncIterator[httpx.AsyncClient]:
    need_folder(DEMO_MODEL, "the demo model (trained by export/demo)")
    async with serve(Settings(model_repo=DEMO_MODEL.parent, default_model=DEMO)) as client:
        yield client


def _png(text: str) -> Image.Image:
    img = Image.open(io.BytesIO(base64.b64decode(text)))
    img.load()
    return img


async def test_introspection_has_the_three_panels(demo_client: httpx.AsyncClient) -> None:
    response = await demo_client.get(f"/models/{DEMO}/introspection", params={"grid": "5x11"})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["backbone"] is None and body["native_grid"] == [8, 8]
    # Filters: 28 orthonormal components over the 8x8x3 patch.
    filters = body["filters"]
    comps = np.asarray(filters["components"])
    assert comps.shape == (28, 8 * 8 * 3) and filters["shape"] == [8, 8, 3]
    np.testing.assert_allclose(comps @ comps.T, np.eye(28), atol=1e-4)
    ratios = filters["explained_variance_ratio"]
    assert ratios == sorted(ratios, reverse=True) and 0 < sum(ratios) <= 1 + 1e-6
    assert _png(filters["png"]).size[0] > 0
    # Similarity: diagonal 1 and symmetric, at the native grid and the resampled one.
    for which, (gh, gw) in (("native", (8, 8)), ("resampled", (5, 11))):
        panel = body["position_similarity"][which]
        sim = np.asarray(panel["similarity"])
        assert panel["grid"] == [gh, gw] and sim.shape == (gh * gw, gh * gw)
        np.testing.assert_allclose(np.diag(sim), 1.0, atol=1e-5)
        np.testing.assert_array_equal(sim, sim.T)
        assert np.all(sim <= 1 + 1e-5) and np.all(sim >= -1 - 1e-5)
        assert _png(panel["png"]).mode == "RGB"
    # Attention distance over the demo's held-out evaluation images, their number recorded.
    distance = body["attention_distance"]
    assert distance["images"] == 1000 and "seed 4242" in distance["held_out"]
    mean_px = np.asarray(distance["mean_px"])
    assert mean_px.shape == (6, 4)
    # Between the nearest neighbour's distance and the image's diagonal.
    assert np.all(mean_px > 0) and np.all(mean_px < np.hypot(64, 64))


@pytest.mark.parametrize(
    ("grid", "message"),
    [
        ("8", "grid must be HxW in patches"),
        ("axb", "grid must be HxW in patches"),
        ("0x8", "both sides must be at least 1 patch"),
        ("64x64", "grid 64x64 has 4096 patches; at most 256 (4x the native 8x8)"),
    ],
)
async def test_a_bad_grid_is_a_422_that_says_why(
    demo_client: httpx.AsyncClient, grid: str, message: str
) -> None:
    response = await demo_client.get(f"/models/{DEMO}/introspection", params={"grid": grid})
    assert response.status_code == 422
    assert message in response.json()["detail"]


async def test_unknown_model_is_a_404(demo_client: httpx.AsyncClient) -> None:
    response = await demo_client.get("/models/nope/introspection")
    assert response.status_code == 404
    assert "unknown model 'nope'" in response.json()["detail"]


async def test_attention_distance_needs_one_image(demo_client: httpx.AsyncClient) -> None:
    data = encode(Image.fromarray(generate(1, seed=3).images[0]), "PNG")
    files = [("image", (f"{i}.png", data, "image/png")) for i in range(2)]
    response = await demo_client.post(
        f"/models/{DEMO}/introspection/attention-distance", files=files
    )
    assert response.status_code == 400
    assert response.json()["detail"] == "send exactly one image, not 2"
    response = await demo_client.post(
        f"/models/{DEMO}/introspection/attention-distance",
        content=b"not an image",
        headers={"content-type": "image/png"},
    )
    assert response.status_code == 400


async def test_the_hybrid_is_listed_with_its_backbone_and_its_panels() -> None:
    hybrid = DEMO_MODEL.parent / "demo-shapes-hybrid"
    need_folder(hybrid, "the demo hybrid (trained by export/demo/train.py --hybrid)")
    async with serve(Settings(model_repo=DEMO_MODEL.parent)) as client:
        listed = (await client.get("/models")).json()
        body = (await client.get("/models/demo-shapes-hybrid/introspection")).json()
    models = {m["name"]: m for m in listed["models"]}
    assert listed["default_model"] == DEMO  # the first by name
    assert models[DEMO]["backbone"] is None
    assert models["demo-shapes-hybrid"]["backbone"] == "ResNetV2 stem+[1], 1x1 cells"
    assert models["demo-shapes-hybrid"]["patch_size"] == 8
    # A hybrid has no pixel filters: the components are over the CNN's 128 channels.
    filters = body["filters"]
    assert filters["shape"] == [128, 1, 1] and "no pixel filters" in filters["shown"]
    comps = np.asarray(filters["components"])
    np.testing.assert_allclose(comps @ comps.T, np.eye(28), atol=1e-4)
    assert body["backbone"] == "ResNetV2 stem+[1], 1x1 cells"
    assert np.asarray(body["attention_distance"]["mean_px"]).shape == (3, 3)
