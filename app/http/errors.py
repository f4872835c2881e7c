"""Exceptions -> HTTP statuses, as {"detail": "<a message a person can act on>"}.

Under /v2 the same messages come as {"error": ...}: the Open Inference Protocol's clients
(tritonclient, the KServe SDK) read that key, also for an unknown route or a wrong method.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException

from app.core.errors import (
    AdminDisabledError,
    BadRequestBodyError,
    BodyTimeoutError,
    BusyError,
    InvalidInputError,
    InvalidParameterError,
    NoImageError,
    NotReadyError,
    PayloadTooLargeError,
    RolloutUnavailableError,
    TooManyImagesError,
    UnauthorizedError,
    UnsupportedMediaTypeError,
)
from app.models.repository import ModelNotReadyError, RepositoryError, UnknownModelError
from app.pipeline.batches import (
    DeadlineExceededError,
    InferenceError,
    NotServedError,
    OverloadedError,
    ShuttingDownError,
)
from app.pipeline.imaging import ImageDecodeError, ImageTooLargeError

log = logging.getLogger(__name__)

STATUS_OF: dict[type[Exception], int] = {
    NoImageError: 400,
    BadRequestBodyError: 400,
    ImageDecodeError: 400,
    RolloutUnavailableError: 400,
    InvalidInputError: 400,
    UnauthorizedError: 401,
    AdminDisabledError: 403,
    UnknownModelError: 404,
    BodyTimeoutError: 408,
    PayloadTooLargeError: 413,
    TooManyImagesError: 413,
    ImageTooLargeError: 413,
    UnsupportedMediaTypeError: 415,
    InvalidParameterError: 422,
    # A model that fails is the server's fault, but one the client can route around: retry.
    InferenceError: 503,
    NotServedError: 503,
    ModelNotReadyError: 503,
    RepositoryError: 409,
    OverloadedError: 503,
    BusyError: 503,
    ShuttingDownError: 503,
    NotReadyError: 503,
    DeadlineExceededError: 504,
}
RETRY_AFTER_S = 1
_LOAD_SHEDDING = (OverloadedError, BusyError, DeadlineExceededError, ShuttingDownError)

_PLACES = {"query": "query parameter", "path": "path parameter", "header": "header"}


V2_PREFIX = "/v2"


def body_key(request: Request) -> str:
    """The key an error's message goes under on this path: "error" under /v2, else "detail"."""
    path: str = request.url.path
    return "error" if path == V2_PREFIX or path.startswith(V2_PREFIX + "/") else "detail"


def error_response(status: int, message: str, key: str = "detail") -> JSONResponse:
    headers: dict[str, str] = {}
    if status == 401:
        # RFC 9110: a 401 names the scheme that would succeed (X-API-Key works as well).
        headers["WWW-Authenticate"] = "Bearer"
    elif status == 408:
        # The rest of the body may still be on its way: the connection cannot carry another
        # request, so say so rather than let the client reuse it.
        headers["Connection"] = "close"
    elif status == 503:
        # Transient by construction (a full queue, a restart): tell clients when to retry.
        headers["Retry-After"] = str(RETRY_AFTER_S)
    return JSONResponse({key: message}, status_code=status, headers=headers or None)


async def _known_error(request: Request, exc: Exception) -> JSONResponse:
    status = next(STATUS_OF[t] for t in type(exc).__mro__ if t in STATUS_OF)
    message: str = getattr(exc, "message", str(exc))
    # Load shedding is the server working as meant, and logging each refusal would cost the
    # event loop most when it can least afford it: the access log and metrics count them.
    if status >= 500 and not isinstance(exc, _LOAD_SHEDDING):
        log.warning("%s %s -> %d: %s", request.method, request.url.path, status, message)
    response = error_response(status, message, body_key(request))
    if isinstance(exc, BusyError):
        response.headers["Connection"] = "close"
    return response


def describe_validation_errors(errors: Sequence[Any]) -> str:
    """FastAPI's error list as one sentence, e.g. "query parameter 'top_k': Input should be ..."."""
    parts = []
    for error in errors:
        loc = [str(p) for p in error.get("loc", ())]
        where = _PLACES.get(loc[0], loc[0]) if loc else "request"
        name = ".".join(loc[1:])
        parts.append(f"{where} '{name}': {error.get('msg', 'invalid')}" if name else where)
    return "; ".join(parts) or "invalid request"


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
    for exc_type in STATUS_OF:
        app.add_exception_handler(exc_type, _known_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected)
