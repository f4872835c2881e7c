"""What every front door shares (/classify, the Open Inference Protocol over REST and gRPC).

One table from an error's kind to its HTTP status (gRPC maps the statuses to its codes), the
error response and its headers, refusing a request when every place is taken (its body read
and dropped), the parameters more than one door takes (rollout's, the timeout header),
validated by one definition so that the same mistake gets the same message everywhere, client
text made safe to quote, and readiness: the engine's answer, and draining for shutdown. Each
door writes none of these again.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from typing import Any, TypeVar

from fastapi import Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.requests import ClientDisconnect
from starlette.types import Receive

from app.core.errors import ErrorKind, InvalidParameterError, NotReadyError, ServiceError
from app.core.records import current_request
from app.engine import BUSY_MESSAGE, LOADING_MESSAGE, EngineClient, Readiness
from app.models.spec import HeadFusion, RolloutParams
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


async def refuse_busy(request: Request, key: str = "detail") -> JSONResponse:
    """503 for a request that finds every place taken, before its body was read: the body is
    read and dropped (bounded by `upload_max_bytes` and `body_read_timeout_s`) so that the
    connection can carry the client's retry; closed when the body is too large or too slow."""
    record = current_request()
    if record is not None:
        record.error_reason = "busy"
    settings = request.app.state.settings
    response = error_response(503, BUSY_MESSAGE, key)
    drained = await discard_body(
        request.receive, settings.upload_max_bytes, settings.body_read_timeout_s
    )
    if not drained:
        response.headers["connection"] = "close"
    return response


def shown(text: str, limit: int = 100) -> str:
    """Client-supplied text made safe to quote in a message: printable and short."""
    clean = "".join(c if c.isprintable() else "?" for c in text)
    return clean if len(clean) <= limit else clean[: limit - 3] + "..."


_PLACES = {"query": "query parameter", "path": "path parameter", "header": "header"}


def describe_validation_errors(errors: Sequence[Any]) -> str:
    """pydantic's errors as one sentence, e.g. "query parameter 'top_k': Input should be ..."."""
    parts = []
    for error in errors:
        loc = [str(p) for p in error.get("loc", ())]
        where = _PLACES.get(loc[0], loc[0]) if loc else "request"
        name = ".".join(loc[1:])
        parts.append(f"{where} '{name}': {error.get('msg', 'invalid')}" if name else where)
    return "; ".join(parts) or "invalid request"


class RolloutFields(BaseModel):
    """A rollout request's parameters, as every door takes them."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    head_fusion: HeadFusion = Field(
        default="mean", description="rollout: how each block's attention heads are fused"
    )
    discard_ratio: float = Field(
        default=0.0,
        ge=0.0,
        lt=1.0,
        allow_inf_nan=False,
        description="rollout: fraction of lowest attentions zeroed per block",
    )

    def to_params(self) -> RolloutParams:
        return RolloutParams(self.head_fusion, self.discard_ratio)


class TimeoutHeaderField(BaseModel):
    """The timeout header, as every HTTP door takes it."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    request_timeout_ms: float | None = Field(
        default=None,
        gt=0,
        allow_inf_nan=False,
        alias="x-request-timeout-ms",  # TIMEOUT_HEADER
        description="this request's deadline in ms; the lowest of all given wins",
    )


M = TypeVar("M", bound=BaseModel)


def validated(model: type[M], values: Mapping[str, object], place: str) -> M:
    """`values` as `model`, or InvalidParameterError with pydantic's messages, each named as a
    `place` ("query", "header", "parameter") and its name, as /classify has always said them."""
    try:
        return model.model_validate(dict(values))
    except ValidationError as exc:
        errors = [{**e, "loc": (place, *e["loc"])} for e in exc.errors(include_url=False)]
        raise InvalidParameterError(describe_validation_errors(errors)) from None


def rollout_params(values: Mapping[str, object]) -> RolloutParams:
    """The rollout parameters among `values` (a door's own parameters, typed as it got them)."""
    # A JSON true is no number, though pydantic would read it as 1.
    given = {k: str(v) if isinstance(v, bool) else v for k, v in values.items()}
    fields = ("head_fusion", "discard_ratio")
    chosen = {k: given[k] for k in fields if k in given}
    return validated(RolloutFields, chosen, "parameter").to_params()


def header_timeout_ms(request: Request) -> float | None:
    """The timeout header's deadline in ms, or InvalidParameterError naming the header."""
    value = request.headers.get(TIMEOUT_HEADER)
    if value is None:
        return None
    return validated(TimeoutHeaderField, {TIMEOUT_HEADER: value}, "header").request_timeout_ms


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
