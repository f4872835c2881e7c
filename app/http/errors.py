"""Exceptions -> HTTP statuses (app/http/frontdoor.py's table), as {"detail": "<a message>"}.

Under /v2 the same messages come as {"error": ...}: the Open Inference Protocol's clients
(tritonclient, the KServe SDK) read that key, also for an unknown route or a wrong method.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException

from app.core.errors import BusyError, ServiceError
from app.http.frontdoor import (
    describe_validation_errors,
    error_response,
    is_load_shedding,
    status_of,
)

log = logging.getLogger(__name__)

V2_PREFIX = "/v2"


def body_key(request: Request) -> str:
    """The key an error's message goes under on this path: "error" under /v2, else "detail"."""
    path: str = request.url.path
    return "error" if path == V2_PREFIX or path.startswith(V2_PREFIX + "/") else "detail"


async def _known_error(request: Request, exc: Exception) -> JSONResponse:
    status = status_of(exc)
    assert status is not None and isinstance(exc, ServiceError)
    message = exc.message
    # Load shedding is the server working as meant, and logging each refusal would cost the
    # event loop most when it can least afford it: the access log and metrics count them.
    if status >= 500 and not is_load_shedding(exc):
        log.warning("%s %s -> %d: %s", request.method, request.url.path, status, message)
    response = error_response(status, message, body_key(request))
    if isinstance(exc, BusyError):
        response.headers["Connection"] = "close"
    return response


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    return error_response(422, describe_validation_errors(exc.errors()), body_key(request))


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    # Starlette still re-raises after this response, so the traceback reaches the server log.
    message = "internal server error; the details are in the server log"
    return error_response(500, message, body_key(request))


async def _http_error(request: Request, exc: Exception) -> Response:
    """Routing's own errors (404 no such route, 405 wrong method): FastAPI's answer, but with
    the protocol's key under /v2."""
    assert isinstance(exc, HTTPException)
    if body_key(request) == "detail":
        return await http_exception_handler(request, exc)
    return JSONResponse({"error": exc.detail}, status_code=exc.status_code, headers=exc.headers)


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(ServiceError, _known_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected)
