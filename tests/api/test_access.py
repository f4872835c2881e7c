"""Access control (API key, admin key) and CORS: who may call what, and from which page."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from pydantic import SecretStr, ValidationError

from app.core.settings import Settings
from app.http.auth import AdminKeyDep
from app.http.errors import install_error_handlers
from tests.images import png
from tests.support import ClientFactory

pytestmark = pytest.mark.anyio

KEY = "classify-key-0123"
ADMIN_KEY = "admin-key-4567"
PNG = {"content-type": "image/png"}
FORMS = "'Authorization: Bearer <key>' or 'X-API-Key: <key>'"
MISSING = f"this endpoint needs an API key: send it as {FORMS}"
INVALID = f"the API key is not valid: send the key set in VIT_SERVE_API_KEY as {FORMS}"
ADMIN_DISABLED = "admin endpoints are disabled: set VIT_SERVE_ADMIN_API_KEY to enable them"
ADMIN_MISSING = f"admin endpoints need the admin API key: send it as {FORMS}"
ADMIN_INVALID = (
    f"the admin API key is not valid: send the key set in VIT_SERVE_ADMIN_API_KEY as {FORMS}"
)
ORIGIN = "https://app.example.com"


def assert_refused(response: httpx.Response, status: int, message: str) -> None:
    assert (response.status_code, response.json()) == (status, {"detail": message})
    if status == 401:
        assert response.headers["www-authenticate"] == "Bearer"
    else:
        assert "www-authenticate" not in response.headers


# --- the API key on /classify ---------------------------------------------------------------


async def test_classify_is_open_when_no_key_is_set(client: httpx.AsyncClient) -> None:
    response = await client.post("/classify", content=png(), headers=PNG)
    assert response.status_code == 200


async def test_classify_without_a_key_is_a_401_that_says_how_to_send_one(
    make_client: ClientFactory,
) -> None:
    async with make_client(api_key=KEY) as client:
        assert_refused(await client.post("/classify", content=png(), headers=PNG), 401, MISSING)
        # Another scheme on Authorization (a proxy's Basic) is not a key for this service.
        basic = {**PNG, "authorization": "Basic dXNlcjpwYXNz"}
        assert_refused(await client.post("/classify", content=png(), headers=basic), 401, MISSING)
        empty = {**PNG, "authorization": "Bearer ", "x-api-key": ""}
        assert_refused(await client.post("/classify", content=png(), headers=empty), 401, MISSING)


@pytest.mark.parametrize(
    "header",
    [
        {"authorization": "Bearer not-the-key"},
        {"x-api-key": "not-the-key"},
        {"authorization": f"Bearer {KEY}x"},
        {"x-api-key": KEY[:-1]},
        {"x-api-key": KEY.upper()},
    ],
)
async def test_classify_with_a_wrong_key_is_a_401(
    make_client: ClientFactory, header: dict[str, str]
) -> None:
    async with make_client(api_key=KEY) as client:
        response = await client.post("/classify", content=png(), headers={**PNG, **header})
        assert_refused(response, 401, INVALID)


@pytest.mark.parametrize(
    "header",
    [
        {"authorization": f"Bearer {KEY}"},
        {"authorization": f"bearer {KEY}"},  # the scheme is case-insensitive (RFC 9110)
        {"x-api-key": KEY},
        # One right key is enough: a proxy may own Authorization for its own credentials.
        {"authorization": "Bearer a-proxy-token", "x-api-key": KEY},
    ],
)
async def test_classify_with_the_key_is_served(
    make_client: ClientFactory, header: dict[str, str]
) -> None:
    async with make_client(api_key=KEY) as client:
        response = await client.post("/classify", content=png(), headers={**PNG, **header})
        assert response.status_code == 200
        assert response.json()["model"] == "tiny"


async def test_the_key_is_checked_before_the_parameters_and_the_body(
    make_client: ClientFactory,
) -> None:
    # A refused client learns nothing about the parameters and costs no body read.
    async with make_client(api_key=KEY) as client:
        response = await client.post("/classify?top_k=0", content=b"not an image", headers=PNG)
        assert_refused(response, 401, MISSING)


async def test_probes_metrics_and_models_stay_open_with_a_key_set(
    make_client: ClientFactory,
) -> None:
    async with make_client(api_key=KEY, admin_api_key=ADMIN_KEY) as client:
        for path in ("/healthz", "/readyz", "/metrics", "/models"):
            assert (await client.get(path)).status_code == 200, path


async def test_refusals_are_counted_by_reason(make_client: ClientFactory) -> None:
    async with make_client(api_key=KEY) as client:
        await client.post("/classify", content=png(), headers=PNG)
        await client.post("/classify", content=png(), headers={**PNG, "x-api-key": "wrong"})
        await client.post("/classify", content=png(), headers={**PNG, "x-api-key": "wrong"})
        metrics = (await client.get("/metrics")).text
    for reason, count in (("missing_key", 1), ("invalid_key", 2)):
        labels = f'protocol="http",reason="{reason}",route="/classify",status="401"'
        line = f"vit_serve_errors_total{{{labels}}}"
        assert f"{line} {count:.1f}" in metrics


async def test_the_openapi_document_names_both_ways_to_send_a_key(
    client: httpx.AsyncClient,
) -> None:
    document = (await client.get("/openapi.json")).json()
    schemes = document["components"]["securitySchemes"]
    assert schemes["BearerKey"]["type"] == "http"
    assert schemes["BearerKey"]["scheme"] == "bearer"
    assert (schemes["ApiKeyHeader"]["in"], schemes["ApiKeyHeader"]["name"]) == (
        "header",
        "X-API-Key",
    )
    # Alternatives: either one will do.
    classify = document["paths"]["/classify"]["post"]
    assert classify["security"] == [{"BearerKey": []}, {"ApiKeyHeader": []}]
    assert "401" in classify["responses"]
    assert "security" not in document["paths"]["/healthz"]["get"]


# --- the admin key, through a small app (admin routes use AdminKeyDep) -----------------------


def admin_client(settings: Settings | None) -> httpx.AsyncClient:
    app = FastAPI()
    install_error_handlers(app)
    if settings is not None:
        app.state.settings = settings

    @app.post("/admin/ping")
    async def ping(_: AdminKeyDep) -> dict[str, str]:
        return {"status": "ok"}

    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    return httpx.AsyncClient(transport=transport, base_url="http://test")


async def test_admin_endpoints_are_403_until_an_admin_key_is_set() -> None:
    # The inference key does not turn them on, nor does any key a client sends.
    async with admin_client(Settings(api_key=SecretStr(KEY), admin_api_key=None)) as client:
        for headers in ({}, {"authorization": f"Bearer {KEY}"}, {"x-api-key": ADMIN_KEY}):
            assert_refused(await client.post("/admin/ping", headers=headers), 403, ADMIN_DISABLED)


async def test_admin_endpoints_need_the_admin_key() -> None:
    settings = Settings(api_key=SecretStr(KEY), admin_api_key=SecretStr(ADMIN_KEY))
    async with admin_client(settings) as client:
        assert_refused(await client.post("/admin/ping"), 401, ADMIN_MISSING)
        for headers in ({"x-api-key": "wrong"}, {"authorization": f"Bearer {KEY}"}):
            assert_refused(await client.post("/admin/ping", headers=headers), 401, ADMIN_INVALID)
        for headers in ({"authorization": f"Bearer {ADMIN_KEY}"}, {"x-api-key": ADMIN_KEY}):
            response = await client.post("/admin/ping", headers=headers)
            assert (response.status_code, response.json()) == (200, {"status": "ok"})


async def test_an_app_without_settings_refuses_rather_than_opens() -> None:
    async with admin_client(None) as client:
        response = await client.post("/admin/ping", headers={"x-api-key": ADMIN_KEY})
        assert_refused(response, 500, "internal server error; the details are in the server log")


# --- key settings ---------------------------------------------------------------------------


def test_access_is_open_and_cors_off_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("API_KEY", "ADMIN_API_KEY", "CORS_ALLOW_ORIGINS", "BODY_READ_TIMEOUT_S"):
        monkeypatch.delenv(f"VIT_SERVE_{name}", raising=False)
    settings = Settings()
    assert (settings.api_key, settings.admin_api_key) == (None, None)
    assert (settings.cors_allow_origins, settings.body_read_timeout_s) == ([], 30.0)
    monkeypatch.setenv("VIT_SERVE_CORS_ALLOW_ORIGINS", f'["{ORIGIN}", "http://localhost:5173"]')
    assert Settings().cors_allow_origins == [ORIGIN, "http://localhost:5173"]


def test_a_key_read_from_a_file_loses_its_newline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VIT_SERVE_API_KEY", f" {KEY}\n")
    monkeypatch.setenv("VIT_SERVE_ADMIN_API_KEY", f"{ADMIN_KEY}\n")
    settings = Settings()
    assert settings.api_key is not None and settings.admin_api_key is not None
    assert settings.api_key.get_secret_value() == KEY
    assert settings.admin_api_key.get_secret_value() == ADMIN_KEY
    assert KEY not in repr(settings)


@pytest.mark.parametrize("field", ["api_key", "admin_api_key"])
@pytest.mark.parametrize("key", ["", "  \n", "two words", "clé-non-ascii"])
def test_a_key_a_header_cannot_carry_is_refused_without_being_echoed(field: str, key: str) -> None:
    with pytest.raises(ValidationError, match="a key must be visible ASCII without spaces") as info:
        overrides: dict[str, Any] = {field: key}
        Settings(**overrides)
    assert field in str(info.value)
    if key.strip():
        assert key not in str(info.value)


@pytest.mark.parametrize("origin", ["https://app.example.com/", "app.example.com", "https://a/b"])
def test_an_origin_with_a_path_or_no_scheme_is_refused(origin: str) -> None:
    with pytest.raises(ValidationError, match="is not an origin: write scheme://host"):
        Settings(cors_allow_origins=[origin])


# --- CORS -----------------------------------------------------------------------------------


def preflight(origin: str = ORIGIN, method: str = "POST") -> dict[str, str]:
    return {
        "origin": origin,
        "access-control-request-method": method,
        "access-control-request-headers": "authorization, content-type, x-api-key, "
        "x-request-id, x-request-timeout-ms",
    }


async def test_cors_is_off_by_default(client: httpx.AsyncClient) -> None:
    response = await client.options("/classify", headers=preflight())
    assert response.status_code == 405  # no CORS layer: OPTIONS is just an unserved method
    assert "access-control-allow-origin" not in response.headers
    response = await client.get("/models", headers={"origin": ORIGIN})
    assert response.status_code == 200
    assert "access-control-allow-origin" not in response.headers


async def test_cors_allows_a_configured_origin(make_client: ClientFactory) -> None:
    async with make_client(cors_allow_origins=[ORIGIN]) as client:
        response = await client.options("/classify", headers=preflight())
        assert response.status_code == 200
        assert response.headers["access-control-allow-origin"] == ORIGIN
        assert response.headers["access-control-allow-methods"] == "GET, POST"
        allowed = {h.strip() for h in response.headers["access-control-allow-headers"].split(",")}
        assert {
            "Authorization",
            "Content-Type",
            "X-API-Key",
            "X-Request-ID",
            "X-Request-Timeout-Ms",
        } <= allowed

        response = await client.post("/classify", content=png(), headers={**PNG, "origin": ORIGIN})
        assert response.status_code == 200
        assert response.headers["access-control-allow-origin"] == ORIGIN
        assert response.headers["access-control-expose-headers"] == "X-Request-ID, Retry-After"
        assert "x-request-id" in response.headers


async def test_cors_ignores_other_origins(make_client: ClientFactory) -> None:
    async with make_client(cors_allow_origins=[ORIGIN]) as client:
        other = "https://elsewhere.example"
        response = await client.options("/classify", headers=preflight(origin=other))
        assert (response.status_code, response.text) == (400, "Disallowed CORS origin")
        assert "access-control-allow-origin" not in response.headers
        response = await client.options("/classify", headers=preflight(method="DELETE"))
        assert (response.status_code, response.text) == (400, "Disallowed CORS method")
        response = await client.get("/models", headers={"origin": other})
        assert response.status_code == 200
        assert "access-control-allow-origin" not in response.headers


async def test_cors_with_a_key_preflights_freely_and_lets_the_page_read_a_401(
    make_client: ClientFactory,
) -> None:
    # Browsers send preflights without credentials: they must not need the key.
    async with make_client(api_key=KEY, cors_allow_origins=[ORIGIN]) as client:
        response = await client.options("/classify", headers=preflight())
        assert response.status_code == 200
        response = await client.post("/classify", content=png(), headers={**PNG, "origin": ORIGIN})
        assert_refused(response, 401, MISSING)
        assert response.headers["access-control-allow-origin"] == ORIGIN
        headers = {**PNG, "origin": ORIGIN, "authorization": f"Bearer {KEY}"}
        response = await client.post("/classify", content=png(), headers=headers)
        assert response.status_code == 200
        assert response.headers["access-control-allow-origin"] == ORIGIN
