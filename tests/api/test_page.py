"""GET /: the try-it page and its assets, served by the app itself with nothing from outside."""

from __future__ import annotations

import re

import httpx
import pytest

from app.http.page import STATIC_DIR

pytestmark = pytest.mark.anyio

ASSETS = {"/static/page.css": "text/css", "/static/page.js": "text/javascript"}


async def test_the_page_is_served_at_the_root(client: httpx.AsyncClient) -> None:
    response = await client.get("/")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    assert "<title>vit-serve" in response.text
    # The browser may load nothing from anywhere else.
    assert "default-src 'self'" in response.headers["content-security-policy"]
    for path in ASSETS:
        assert f'"{path}"' in response.text


async def test_the_page_assets_are_served(client: httpx.AsyncClient) -> None:
    for path, media_type in ASSETS.items():
        response = await client.get(path)
        assert response.status_code == 200, path
        assert response.headers["content-type"].startswith(media_type), path
        assert response.content == (STATIC_DIR / path.removeprefix("/static/")).read_bytes()


async def test_the_page_is_not_part_of_the_api_document(client: httpx.AsyncClient) -> None:
    paths = (await client.get("/openapi.json")).json()["paths"]
    assert "/" not in paths
    assert "/classify" in paths


async def test_unknown_assets_are_404(client: httpx.AsyncClient) -> None:
    assert (await client.get("/static/nothing.js")).status_code == 404
    assert (await client.get("/static/../main.py")).status_code == 404


def test_the_page_refers_to_no_other_host() -> None:
    # No CDN, fonts or analytics: the page must work on a machine with no network.
    for path in STATIC_DIR.iterdir():
        text = path.read_text(encoding="utf-8")
        assert not re.search(r"(https?:)?//[a-z0-9.-]+\.[a-z]{2,}", text, re.IGNORECASE), path
