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


@pytest.mark.parametrize(
    ("params", "headers", "message"),
    [
        (
            {},
            {"x-request-timeout-ms": "0"},
            "header 'x-request-timeout-ms': Input should be greater than 0",
        ),
        (
            {"timeout_ms": "soon"},
            {},
            "query parameter 'timeout_ms': Input should be a valid number, unable to parse "
            "string as a number",
        ),
        (
            {"timeout_ms": "-1", "top_k": "0"},
            {"x-request-timeout-ms": "nan"},
            "query parameter 'top_k': Input should be greater than or equal to 1; "
            "query parameter 'timeout_ms': Input should be greater than 0; "
            "header 'x-request-timeout-ms': Input should be a finite number",
        ),
    ],
)
async def test_each_bad_deadline_is_named_in_the_422(
    client: httpx.AsyncClient, params: dict[str, str], headers: dict[str, str], message: str
) -> None:
    headers = {"content-type": "image/png", **headers}
    response = await client.post("/classify", params=params, content=png(64, 64), headers=headers)
    assert (response.status_code, response.json()) == (422, {"detail": message})
