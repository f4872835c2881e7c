"""What every front door shares (/classify, the Open Inference Protocol over REST and gRPC).

One table from an error's kind to its HTTP status (gRPC maps the statuses to its codes), the
error response and its headers, refusing a request when every place is taken (its body read
and dropped), the timeout header, and readiness: the engine's answer, and draining for
shutdown. Each door writes none of these again.
"""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse
from starlette.requests import ClientDisconnect
from starlette.types import Receive

from app.core.errors import ErrorKind, InvalidInputError, NotReadyError, ServiceError
from app.engine import LOADING_MESSAGE, EngineClient, Readiness
from app.pipeline.service import ClassifyService

HTTP_STATUS: dict[ErrorKind, int] = {
    ErrorKind.BAD_INPUT: 400,
    ErrorKind.UNAUTHORIZED: 401,
    ErrorKind.FORBIDDEN: 403,
    ErrorKind.NOT_FOUND: 404,
    ErrorKind.BODY_TIMEOUT: 408,
    ErrorKind.CONFLICT: 409,
    ErrorKind.TOO_LARGE: 413,
    ErrorKind.UNSUPPORTED_MEDIA: 415,
    ErrorKind.INVALID_PARAMETER: 422,
    ErrorKind.UNAVAILABLE: 503,
    ErrorKind.SHED: 503,
    ErrorKind.DEADLINE: 504,
}
RETRY_AFTER_S = 1
TIMEOUT_HEADER = "x-request-timeout-ms"
DRAINING_MESSAGE = "the server is shutting down; retry on another replica"


def status_of(exc: BaseException) -> int | None:
    """The HTTP status of one of the service's errors; None for anything else (a 500)."""
    return HTTP_STATUS[exc.kind] if isinstance(exc, ServiceError) else None


def is_load_shedding(exc: BaseException) -> bool:
    """Refused or expired to keep up: the server working as meant, not worth a log line."""
    return isinstance(exc, ServiceError) and exc.kind in (ErrorKind.SHED, ErrorKind.DEADLINE)


def error_response(status: int, message: str, key: str = "detail") -> JSONResponse:
    """`{key: message}` with the headers its status calls for."""
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


async def discard_body(receive: Receive, max_bytes: int, timeout_s: float) -> bool:
    """Read a refused request's body and drop it; False when it is over `max_bytes` or not in
    within `timeout_s` (then the connection must close: the rest of the body is still on it).

    Keeping the connection costs one read of a body on loopback or from a load balancer;
    closing it would make the client connect again for its retry, and under overload accepting
    connections is what the event loop can least afford.
    """
    received = 0
    try:
        async with asyncio.timeout(timeout_s):
            while True:
                message = await receive()
                if message["type"] != "http.request":
                    return False  # the client went away
                received += len(message.get("body", b""))
                if received > max_bytes:
                    return False
                if not message.get("more_body", False):
                    return True
    except (TimeoutError, ClientDisconnect):
        return False


async def refuse(request: Request, status: int, message: str, key: str = "detail") -> JSONResponse:
    """Answer a request that is refused before its body was read: the body is read and dropped
    (bounded by `upload_max_bytes` and `body_read_timeout_s` of the settings) so that the
    connection can carry the client's retry; closed when the body is too large or too slow."""
    settings = request.app.state.settings
    response = error_response(status, message, key)
    drained = await discard_body(
        request.receive, settings.upload_max_bytes, settings.body_read_timeout_s
    )
    if not drained:
        response.headers["connection"] = "close"
    return response


def header_timeout_ms(request: Request) -> float | None:
    """The timeout header's deadline in ms, or InvalidInputError naming the header."""
    value = request.headers.get(TIMEOUT_HEADER)
    if value is None:
        return None
    try:
        timeout = float(value)
    except ValueError:
        timeout = float("nan")
    if not timeout > 0 or timeout == float("inf"):
        raise InvalidInputError(
            f"header '{TIMEOUT_HEADER}': a positive number of milliseconds, got {value[:40]!r}"
        )
    return timeout


def draining(request: Request) -> bool:
    lifecycle = getattr(request.app.state, "lifecycle", None)
    return bool(getattr(lifecycle, "draining", False))


def engine_of(state: Any) -> EngineClient | None:
    engine: EngineClient | None = getattr(state, "engine", None)
    return engine


def readiness(engine: EngineClient | None, is_draining: bool) -> Readiness:
    """The one readiness answer of every door: the engine's, and not draining for shutdown."""
    if engine is None:
        return Readiness(False, LOADING_MESSAGE, loaded=False)
    answer = engine.readiness()
    if answer.ready and is_draining:
        return Readiness(False, DRAINING_MESSAGE)
    return answer


async def get_service(request: Request) -> ClassifyService:
    """The running classify service, or NotReadyError (503) while there is none."""
    # async: FastAPI runs a plain `def` dependency in its thread pool, a thread hop per request.
    service = getattr(request.app.state, "service", None)
    if not isinstance(service, ClassifyService):
        raise NotReadyError(LOADING_MESSAGE)
    return service
