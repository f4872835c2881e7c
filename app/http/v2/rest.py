"""The Open Inference Protocol over HTTP, under /v2: health, metadata and inference.

Inference runs as POST /classify does, in the same order: the key (when the server has one), the
service, a request place (`admission`, refused 503 with Retry-After before the body is read),
the body under the same size and time limits, then `ClassifyService.infer`: the same queue,
batcher and deadline (`X-Request-Timeout-Ms` and the request parameter `timeout` lower it).
Errors carry the same statuses and messages as /classify's, in the protocol's own body,
`{"error": "..."}` (what tritonclient and the KServe SDK read), with 400 for every bad input.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse

from app.core.errors import BusyError, NotReadyError
from app.core.records import current_request
from app.http import frontdoor
from app.http.auth import API_KEY_SECURITY, check_api_key
from app.http.frontdoor import get_service, header_timeout_ms
from app.http.metrics import error_reason
from app.http.uploads import read_body
from app.http.v2 import inference as protocol
from app.http.v2.binary import HEADER_LENGTH, decompress, encode_response, parse_request
from app.http.v2.schemas import (
    ErrorResponse,
    InferenceRequest,
    InferenceResponse,
    MetadataTensor,
    ModelMetadataResponse,
    ModelReadyResponse,
    ServerLiveResponse,
    ServerMetadataResponse,
    ServerReadyResponse,
)
from app.models.spec import MODEL_NAME_PATTERN

log = logging.getLogger(__name__)

router = APIRouter(prefix="/v2", tags=["Open Inference Protocol (V2)"])

_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse, "description": text}
    for code, text in {
        400: "a bad input: a tensor's name, type, shape or data; a parameter; an image",
        401: "no API key or not the right one, where the server sets one",
        404: "unknown model or version",
        408: "the body did not arrive within the server's body read timeout",
        413: "body, image or image count over the limit",
        415: "a Content-Encoding other than gzip, deflate or identity",
        503: "overloaded, not ready, or the model cannot serve (with Retry-After)",
        504: "not run before the request's deadline",
    }.items()
}


def status_of(exc: BaseException) -> int | None:
    """The HTTP status of a known error, as /classify answers it, 422 folded into 400: the
    protocol has one status for every bad input."""
    status = frontdoor.status_of(exc)
    return 400 if status == 422 else status


def error_response(exc: Exception) -> JSONResponse:
    """`exc` as the protocol's error body; unexpected errors are logged and answered 500."""
    record = current_request()
    if record is not None:
        record.error_reason = error_reason(exc)
    status = status_of(exc)
    if status is None:
        log.error("V2 request failed", exc_info=exc)
        status, message = 500, "internal server error; the details are in the server log"
    else:
        message = getattr(exc, "message", str(exc))
    response = frontdoor.error_response(status, message, "error")
    if isinstance(exc, BusyError):
        response.headers["Connection"] = "close"  # the body was not read: it cannot go on
    return response


@router.get("", response_model=ServerMetadataResponse)
async def server_metadata() -> ServerMetadataResponse:
    return ServerMetadataResponse(
        name=protocol.SERVER_NAME,
        version=protocol.server_version(),
        extensions=list(protocol.EXTENSIONS),
    )


@router.get("/health/live", response_model=ServerLiveResponse)
async def server_live() -> ServerLiveResponse:
    return ServerLiveResponse(live=True)


@router.get(
    "/health/ready",
    response_model=ServerReadyResponse,
    responses={503: {"model": ServerReadyResponse, "description": "not ready"}},
)
async def server_ready(request: Request) -> Response:
    """GET /readyz's answer, VIT_SERVE_REQUIRE_GPU included (503 when not ready)."""
    engine = frontdoor.engine_of(request.app.state)
    ready = frontdoor.readiness(engine, frontdoor.draining(request)).ready
    return JSONResponse({"ready": ready}, status_code=200 if ready else 503)


# The path's parameters are read from `request.path_params` rather than declared: FastAPI's
# per-parameter resolution costs event-loop time on every request (app/http/params.py), and
# a name or version that is not one must get the protocol's 404 {"error"}, not FastAPI's 422.
# The OpenAPI document still describes them, with the forms that can exist.
_NAME = {
    "name": "model_name",
    "in": "path",
    "required": True,
    "schema": {"type": "string", "pattern": MODEL_NAME_PATTERN, "maxLength": 200},
}
_VERSION = {
    "name": "model_version",
    "in": "path",
    "required": True,
    "schema": {"type": "string", "pattern": "^[0-9]{1,9}$"},
}
_MODEL: dict[str, Any] = {"parameters": [_NAME]}
_MODEL_VERSION: dict[str, Any] = {"parameters": [_NAME, _VERSION]}


def _target(request: Request) -> tuple[str, str]:
    params = request.path_params
    return str(params["model_name"]), str(params.get("model_version", ""))


@router.get(
    "/models/{model_name}",
    response_model=ModelMetadataResponse,
    responses=_ERRORS,
    openapi_extra=_MODEL,
)
@router.get(
    "/models/{model_name}/versions/{model_version}",
    response_model=ModelMetadataResponse,
    responses=_ERRORS,
    openapi_extra=_MODEL_VERSION,
)
async def model_metadata(request: Request) -> Response:
    model_name, model_version = _target(request)
    try:
        service = await get_service(request)
        meta = await protocol.model_metadata(service, model_name, model_version)
    except Exception as exc:
        return error_response(exc)
    body = ModelMetadataResponse(
        name=meta.name,
        versions=meta.versions,
        platform=meta.platform,
        inputs=[
            MetadataTensor(name=t.name, datatype=t.datatype, shape=t.shape) for t in meta.inputs
        ],
        outputs=[
            MetadataTensor(name=t.name, datatype=t.datatype, shape=t.shape) for t in meta.outputs
        ],
        parameters=meta.properties,
    )
    return Response(body.model_dump_json(), media_type="application/json")


@router.get(
    "/models/{model_name}/ready",
    response_model=ModelReadyResponse,
    responses=_ERRORS,
    openapi_extra=_MODEL,
)
@router.get(
    "/models/{model_name}/versions/{model_version}/ready",
    response_model=ModelReadyResponse,
    responses=_ERRORS,
    openapi_extra=_MODEL_VERSION,
)
async def model_ready(request: Request) -> Response:
    """200 when the model (version) takes requests; 503 while it cannot, 404 when unknown."""
    model_name, model_version = _target(request)
    try:
        service = await get_service(request)
        if not await protocol.model_ready(service, model_name, model_version):
            raise NotReadyError(f"model '{model_name}' is not being served; retry")
        if frontdoor.draining(request):
            raise NotReadyError("the server is shutting down")
    except Exception as exc:
        return error_response(exc)
    return JSONResponse({"name": model_name, "ready": True})


_INFER_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": InferenceRequest.model_json_schema()},
            "application/octet-stream": {
                "schema": {
                    "type": "string",
                    "format": "binary",
                    "description": "the JSON request, then the inputs' binary data; header "
                    "Inference-Header-Content-Length: the JSON's length",
                }
            },
        },
    }
}


@router.post(
    "/models/{model_name}/infer",
    response_model=InferenceResponse,
    responses=_ERRORS,
    openapi_extra={**_INFER_BODY, **_MODEL, "security": API_KEY_SECURITY},
)
@router.post(
    "/models/{model_name}/versions/{model_version}/infer",
    response_model=InferenceResponse,
    responses=_ERRORS,
    openapi_extra={**_INFER_BODY, **_MODEL_VERSION, "security": API_KEY_SECURITY},
)
async def infer(request: Request) -> Response:
    arrived = time.monotonic()
    model_name, model_version = _target(request)
    try:
        check_api_key(request)
        service = await get_service(request)
        header_timeout = header_timeout_ms(request)
        try:
            version = protocol.parse_version(model_name, model_version)
            permit = await service.engine.admit(model_name, version)
        except BusyError:
            return await frontdoor.refuse_busy(request, "error")
        try:
            settings = service.settings
            body = await read_body(request, settings.upload_max_bytes, settings.body_read_timeout_s)
            body = decompress(
                body, request.headers.get("content-encoding"), settings.upload_max_bytes
            )
            parsed = parse_request(
                body, request.headers.get(HEADER_LENGTH), model_name, model_version
            )
            answer = await protocol.infer(
                service, permit, parsed, timeout_ms=header_timeout, arrived=arrived
            )
        finally:
            permit.release()
        content, json_length = encode_response(answer, parsed.parameters)
    except Exception as exc:
        return error_response(exc)
    if json_length is None:
        return Response(content, media_type="application/json")
    return Response(
        content,
        media_type="application/octet-stream",
        headers={"Inference-Header-Content-Length": str(json_length)},
    )
