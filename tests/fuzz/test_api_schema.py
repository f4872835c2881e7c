"""The HTTP API fuzzed from its own OpenAPI schema (schemathesis), on the tiny model repository.

Every generated request, valid by the schema or deliberately not, must get an answer that is no
server error and that the schema documents (status, content type, headers, body); requests
that break the schema must be refused with a documented 4xx.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from pydantic import SecretStr
from schemathesis import Case, GenerationMode
from schemathesis.checks import (
    content_type_conformance,
    negative_data_rejection,
    not_a_server_error,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from schemathesis.core.result import Ok
from schemathesis.python import asgi
from schemathesis.schemas import APIOperation, BaseSchema

from app.core.settings import Settings
from app.main import create_app
from tests.fuzz import tally
from tests.support import TinyRepo

CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    negative_data_rejection,
]
# A request that breaks the schema must be refused with a 4xx: schemathesis' default list lacks
# 413 (too many images) and takes 5xx. status_code_conformance checks the 4xx is documented.
REFUSED = ["4xx"]
ADMIN_KEY = "fuzz-admin-key"


@pytest.fixture(scope="module")
def api(tiny_repo: TinyRepo) -> Iterator[BaseSchema]:
    """The schema as the app serves it; calls go to that app in-process, lifespan started."""
    app = create_app(Settings(model_repo=tiny_repo.root, admin_api_key=SecretStr(ADMIN_KEY)))
    config = schemathesis.Config.from_dict(
        {"checks": {"negative_data_rejection": {"expected-statuses": REFUSED}}}
    )
    schema = schemathesis.openapi.from_asgi("/openapi.json", app, config=config)
    try:
        yield schema
    finally:
        # schemathesis started the app's lifespan on its first request: stop it (the batcher,
        # the sessions) here rather than at interpreter exit.
        asgi.shutdown_lifespans()


def modes_of(operation: APIOperation[Any, Any, Any, Any]) -> list[GenerationMode]:
    """Requests that fit the schema; also ones that break it where there is input to break."""
    takes_input = bool(operation.body) or any(True for _ in operation.iter_parameters())
    return list(GenerationMode) if takes_input else [GenerationMode.POSITIVE]


def sets_its_own_deadline(case: Case[Any]) -> bool:
    headers = {k.lower() for k in case.headers or {}}
    return "timeout_ms" in (case.query or {}) or "x-request-timeout-ms" in headers


def test_no_request_gets_a_server_error_or_an_undocumented_answer(api: BaseSchema) -> None:
    # Every operation the schema has, read at run time: a new route is fuzzed without a change.
    operations = []
    for result in api.get_all_operations():
        assert isinstance(result, Ok), f"schemathesis cannot read an operation: {result}"
        operations.append(result.ok())
    assert "POST /classify" in {operation.label for operation in operations}
    for operation in operations:
        for mode in modes_of(operation):
            fuzz(operation, mode)


def fuzz(operation: APIOperation[Any, Any, Any, Any], mode: GenerationMode) -> None:
    name = f"{operation.label} ({mode.value})"

    # Schemathesis filters what it generates against the schema: expected, not a problem here.
    @settings(
        suppress_health_check=[
            HealthCheck.filter_too_much,
            HealthCheck.too_slow,
            HealthCheck.data_too_large,
        ]
    )
    @given(case=operation.as_strategy(generation_mode=mode))
    def one(case: Case[Any]) -> None:
        if mode is GenerationMode.POSITIVE and operation.path.startswith("/admin/"):
            # With the key, so that admin requests reach the route (a reload of an unchanged
            # repository) rather than all stopping at the key check.
            case.headers["X-API-Key"] = ADMIN_KEY
        response = case.call()
        if response.status_code == 504 and sets_its_own_deadline(case):
            # Generated deadlines go down to microseconds: a 504 is then the documented answer
            # (the request's deadline passed), not a fault. The other checks still apply.
            tally.record_call(name, "504 (its own deadline)")
            case.validate_response(response, checks=CHECKS, excluded_checks=[not_a_server_error])
            return
        tally.record_call(name, str(response.status_code))
        case.validate_response(response, checks=CHECKS)

    one()
