"""POST /classify served past the router (app/http/direct.py) answers as the router would."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import SecretStr

from app.core.settings import Settings
from app.http.direct import DirectRoute
from tests.images import png
from tests.support import TinyRepo, serve

pytestmark = pytest.mark.anyio

# (method, url, headers, body): answers, errors from the route, the service, validation and the
# key check; GET, which has no route (405), and a trailing slash take the router either way.
REQUESTS: list[tuple[str, str, dict[str, str], bytes]] = [
    ("POST", "/classify?top_k=2", {"content-type": "image/png"}, png()),
    ("POST", "/classify?top_k=0", {"content-type": "image/png"}, png()),
    ("POST", "/classify?model=nope", {"content-type": "image/png"}, png()),
    ("POST", "/classify", {"content-type": "image/png"}, b"not an image"),
    ("POST", "/classify", {"content-type": "image/png"}, b""),
    ("POST", "/classify", {"content-type": "text/plain"}, b"hello"),
    ("POST", "/classify", {"content-type": "image/png", "x-request-timeout-ms": "x"}, png()),
    ("POST", "/classify", {"content-type": "image/png", "x-api-key": "wrong"}, png()),
    ("GET", "/classify", {}, b""),
    ("POST", "/classify/", {"content-type": "image/png"}, png()),
]


async def answers(settings: Settings) -> list[tuple[int, Any, str | None]]:
    out = []
    async with serve(settings) as client:
        for method, url, headers, body in REQUESTS:
            if settings.api_key is not None:
                headers = {"x-api-key": settings.api_key.get_secret_value(), **headers}
            r = await client.request(method, url, headers=headers, content=body)
            shown: Any = r.text
            if r.headers.get("content-type") == "application/json":
                shown = r.json()
                shown.pop("timing", None)  # differs from run to run
            out.append((r.status_code, shown, r.headers.get("content-type")))
        metrics = (await client.get("/metrics")).text
    assert 'route="/classify"' in metrics  # the route is in the scope for the metrics
    return out


@pytest.mark.parametrize("api_key", [None, "secret"])
async def test_direct_and_routed_answers_are_the_same(
    tiny_repo: TinyRepo, monkeypatch: pytest.MonkeyPatch, api_key: str | None
) -> None:
    settings = Settings(
        model_repo=tiny_repo.root, api_key=None if api_key is None else SecretStr(api_key)
    )
    taken: list[str] = []
    matches = DirectRoute.matches

    def counting(self: DirectRoute, scope: dict[str, Any]) -> bool:
        found = matches(self, scope)
        taken.extend([scope["path"]] if found else [])
        return found

    monkeypatch.setattr(DirectRoute, "matches", counting)
    direct = await answers(settings)
    assert len(taken) == 8  # every POST /classify above, and nothing else
    monkeypatch.setattr(DirectRoute, "matches", lambda self, scope: False)
    routed = await answers(settings)
    assert direct == routed
    wrong_key = 401 if api_key else 200
    assert [status for status, _, _ in direct] == [
        200, 422, 404, 400, 400, 415, 422, wrong_key, 405, 307
    ]  # fmt: skip
