"""POST /classify served past the router (app/http/direct.py) answers as the router would."""

from __future__ import annotations

from collections.abc import MutableMapping
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


async def test_a_middleware_inside_the_direct_route_fails_the_start(tiny_repo: TinyRepo) -> None:
    # Added before the request middleware, it would sit inside it: skipped for POST /classify.
    from starlette.middleware import Middleware
    from starlette.middleware.gzip import GZipMiddleware

    from app.main import create_app

    app = create_app(Settings(model_repo=tiny_repo.root))
    app.user_middleware.append(Middleware(GZipMiddleware))  # innermost
    with pytest.raises(RuntimeError, match="GZipMiddleware sits inside RequestMiddleware"):
        async with app.router.lifespan_context(app):
            pass


async def test_no_handled_answer_follows_one_that_began() -> None:
    from fastapi import FastAPI, Request, Response
    from fastapi.routing import APIRoute

    from app.core.errors import InvalidInputError
    from app.http.errors import install_error_handlers

    async def endpoint(request: Request) -> Response:
        await request._send({"type": "http.response.start", "status": 200, "headers": []})
        raise InvalidInputError("too late to answer 400")

    app = FastAPI()
    install_error_handlers(app)
    direct = DirectRoute(app, APIRoute("/x", endpoint, methods=["POST"]), "POST")
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: MutableMapping[str, Any]) -> None:
        sent.append(dict(message))

    scope = {"type": "http", "method": "POST", "path": "/x", "headers": [], "query_string": b""}
    with pytest.raises(RuntimeError, match="response already started"):
        await direct(scope, receive, send)
    assert [m["status"] for m in sent] == [200]  # one start, no 400 after it
