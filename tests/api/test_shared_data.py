"""Real photos and Pillow's odd and broken images (../shared/testdata; skipped when absent)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import pytest

from tests.support import ODD_IMAGES, PHOTOS, need_folder

pytestmark = [pytest.mark.anyio, pytest.mark.needs_shared]


async def test_every_photo_is_classified_with_probabilities_that_sum_to_one(
    client: httpx.AsyncClient,
) -> None:
    need_folder(PHOTOS, "the shared photos")
    photos = sorted(PHOTOS.glob("*.JPEG"))
    assert len(photos) == 100
    chunks = [photos[i : i + 16] for i in range(0, len(photos), 16)]

    async def classify(chunk: list[Path], resize: str) -> httpx.Response:
        files = [("image", (p.name, p.read_bytes(), "image/jpeg")) for p in chunk]
        return await client.post("/classify", params={"top_k": 10, "resize": resize}, files=files)

    responses = await asyncio.gather(
        *(classify(chunk, ("crop", "fit")[i % 2]) for i, chunk in enumerate(chunks))
    )
    results = []
    for response in responses:
        assert response.status_code == 200, response.text
        results.extend(response.json()["results"])
    assert len(results) == 100
    for result in results:
        assert len(result["predictions"]) == 10
        assert sum(p["score"] for p in result["predictions"]) == pytest.approx(1.0, abs=1e-5)
        width, height = result["image_size"]
        assert width > 0 and height > 0


async def test_odd_and_broken_images_get_a_result_or_a_clear_4xx_never_a_500(
    client: httpx.AsyncClient,
) -> None:
    need_folder(ODD_IMAGES, "the shared odd images")
    statuses: dict[str, int] = {}
    for path in sorted(ODD_IMAGES.iterdir()):
        files = [("image", (path.name, path.read_bytes(), "application/octet-stream"))]
        response = await client.post("/classify", files=files)
        assert response.status_code in (200, 400, 413), (path.name, response.text)
        if response.status_code != 200:
            detail = response.json()["detail"]
            assert f"'{path.name}'" in detail
        statuses[path.name] = response.status_code
    assert len(statuses) > 100
    known = {
        "hopper.png": 200,
        "transparent.webp": 200,
        "tiff_strip_cmyk_jpeg.tif": 200,
        "hopper_orientation_6.webp": 200,
        "truncated_jpeg.jpg": 400,
        "rgba.psd": 400,  # a valid image in a format the server does not open
        "bmp__b__badwidth.bmp": 413,
    }
    assert {name: statuses[name] for name in known} == known
