"""Access control: the checks of a request's key.

`check_api_key` guards the inference route when `VIT_SERVE_API_KEY` is set (open otherwise);
POST /classify calls it itself (see app/http/params.py for why it declares no dependencies).
`AdminKeyDep` guards admin endpoints, which are off (403) until `VIT_SERVE_ADMIN_API_KEY` is set.
A key is sent as `Authorization: Bearer <key>` or `X-API-Key: <key>`, read by `presented_keys`
for both. Both read the settings from `app.state.settings` (set by `create_app`): the checks do
not wait for the models to load.
"""

from __future__ import annotations

import secrets
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from fastapi.security.utils import get_authorization_scheme_param
from pydantic import SecretStr

from app.core.errors import AdminDisabledError, InvalidKeyError, MissingKeyError
from app.core.settings import Settings

FORMS = "'Authorization: Bearer <key>' or 'X-API-Key: <key>'"
ADMIN_DISABLED = "admin endpoints are disabled: set VIT_SERVE_ADMIN_API_KEY to enable them"

# auto_error=False: these only read the headers (and describe them in the OpenAPI document);
# the checks below decide, so that every refusal has this service's status and message.
_bearer = HTTPBearer(
    auto_error=False,
    scheme_name="BearerKey",
    description="the key as a bearer token: `Authorization: Bearer <key>`",
)
_header = APIKeyHeader(
    name="X-API-Key",
    auto_error=False,
    scheme_name="ApiKeyHeader",
    description="the key in its own header: `X-API-Key: <key>`",
)
BearerDep = Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
HeaderKeyDep = Annotated[str | None, Depends(_header)]


def _settings(request: Request) -> Settings:
    settings = getattr(request.app.state, "settings", None)
    if not isinstance(settings, Settings):
        # Fail closed: an app without settings must not serve guarded routes unguarded.
        raise RuntimeError("app.state.settings is not set; create_app sets it")
    return settings


def presented_keys(request: Request) -> list[str]:
    """The keys a request carries, read as `_bearer` and `_header` read them, without
    FastAPI's dependency machinery (its cost: docs/performance.md, "Figures behind the code").

    Either header may carry the key: a proxy in front can own Authorization for its own scheme
    (which is then not a bearer token), leaving X-API-Key to this service."""
    authorization = request.headers.get("authorization")
    scheme, credentials = get_authorization_scheme_param(authorization)
    bearer = credentials if scheme.lower() == "bearer" and credentials else None
    return [k for k in (bearer, request.headers.get(_header.model.name)) if k]


def _matches(presented: list[str], key: SecretStr) -> bool:
    expected = key.get_secret_value().encode("ascii")  # the settings admit ASCII keys only
    # compare_digest: constant time over the key's bytes. Every candidate is compared, so the
    # time does not tell which header held the wrong one. Header values arrive as Latin-1.
    results = [secrets.compare_digest(k.encode("latin-1", "replace"), expected) for k in presented]
    return any(results)


def check_api_key(request: Request) -> None:
    """The inference key, when the server has one; every request passes when it has none.

    Called by POST /classify itself, whose OpenAPI operation names `API_KEY_SECURITY`."""
    key = _settings(request).api_key
    if key is None:
        return
    presented = presented_keys(request)
    if not presented:
        raise MissingKeyError(f"this endpoint needs an API key: send it as {FORMS}")
    if not _matches(presented, key):
        raise InvalidKeyError(
            f"the API key is not valid: send the key set in VIT_SERVE_API_KEY as {FORMS}"
        )


async def require_admin_key(request: Request, _bearer: BearerDep, _header: HeaderKeyDep) -> None:
    """The admin key; admin endpoints are refused outright on a server without one.

    `_bearer` and `_header` declare the two schemes in the OpenAPI document; the key is read by
    `presented_keys`, the one reader of both headers."""
    key = _settings(request).admin_api_key
    if key is None:
        raise AdminDisabledError(ADMIN_DISABLED)
    presented = presented_keys(request)
    if not presented:
        raise MissingKeyError(f"admin endpoints need the admin API key: send it as {FORMS}")
    if not _matches(presented, key):
        raise InvalidKeyError(
            "the admin API key is not valid: send the key set in VIT_SERVE_ADMIN_API_KEY "
            f"as {FORMS}"
        )


# The security requirement of POST /classify in the OpenAPI document: either scheme (the
# schemes themselves are declared by the admin routes' `AdminKeyDep`).
API_KEY_SECURITY: list[dict[str, list[str]]] = [
    {_bearer.scheme_name: []},
    {_header.scheme_name: []},
]

AdminKeyDep = Annotated[None, Depends(require_admin_key)]
