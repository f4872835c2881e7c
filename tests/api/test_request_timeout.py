"""A request lowers its own deadline with `X-Request-Timeout-Ms` or `timeout_ms`."""

from __future__ import annotations

import httpx
import pytest

from tests.images import png

pytestmark = pytest.mark.anyio


async def test_a_deadline_shorter_than_decoding_is_a_504(client: httpx.AsyncClient) -> None:
    # A microsecond passes before the image is decoded, whichever way the deadline is given.
    data, image = png(64, 64), {"content-type": "image/png"}
    response = await client.post(
        "/classify", params={"timeout_ms": 0.001}, content=data, headers=image
    )
    assert response.status_code == 504
    headers = {**image, "x-request-timeout-ms": "0.001"}
    response = await client.post("/classify", content=data, headers=headers)
    assert response.status_code == 504


async def test_a_generous_client_deadline_is_served(client: httpx.AsyncClient) -> None:
    headers = {"content-type": "image/png", "x-request-timeout-ms": "60000"}
    response = await client.post("/classify", content=png(64, 64), headers=headers)
    assert response.status_code == 200


@pytest.mark.parametrize("value", ["0", "-5", "soon", "nan"])
async def test_a_bad_client_deadline_is_a_422(client: httpx.AsyncClient, value: str) -> None:
    headers = {"content-type": "image/png", "x-request-timeout-ms": value}
    response = await client.post("/classify", content=png(64, 64), headers=headers)
    assert response.status_code == 422
    response = await client.post(
        "/classify", params={"timeout_ms": value}, content=png(64, 64), headers=headers
    )
    assert response.status_code == 422
