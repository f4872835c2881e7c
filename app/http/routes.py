"""HTTP routes: parse and validate the request, call the classify service, shape the answer."""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.routing import APIRoute

from app.core.errors import BusyError, NotReadyError
from app.http.auth import API_KEY_SECURITY, check_api_key
from app.http.deps import ServiceDep
from app.http.frontdoor import draining, get_service, readiness, refuse_busy
from app.http.params import openapi_parameters, read_params
from app.http.schemas import (
    ClassifyResponse,
    DecodeInfo,
    ErrorBody,
    ModelInfo,
    ModelsResponse,
    NotReady,
    PreprocessInfo,
    Status,
)
from app.http.uploads import read_uploads
from app.runtime.providers import TENSORRT

router = APIRouter()

_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorBody, "description": text}
    for code, text in {
        400: "not an image, truncated, no image in the request, or rollout asked of a model "
        "version without a rollout graph",
        401: "no API key or not the right one, where the server sets one (WWW-Authenticate)",
        404: "unknown model or version",
        408: "the body did not arrive within the server's body read timeout",
        413: "body, image pixels or image count over the limit",
        415: "not multipart/form-data or image/*",
        422: "invalid query parameter",
        503: "overloaded, not ready, or the model asked for cannot serve (with Retry-After)",
        504: "not run before the request's deadline",
    }.items()
}

# The body is read by hand (size-limited before parsing), so describe it for the OpenAPI page.
_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {
                        "image": {"type": "array", "items": {"type": "string", "format": "binary"}}
                    },
                    "required": ["image"],
                }
            },
            "image/*": {"schema": {"type": "string", "format": "binary"}},
        },
    }
}


@router.post(
    "/classify",
    response_model=ClassifyResponse,
    # Fields a request did not ask for (`rollout`, `heatmap_png`) are left out, not null.
    response_model_exclude_none=True,
    responses=_ERRORS,
    openapi_extra={**_BODY, "parameters": openapi_parameters(), "security": API_KEY_SECURITY},
)
async def classify(request: Request) -> Response:
    # The key, the service and the parameters are checked here, in that order, rather than
    # declared for FastAPI to resolve: see app/http/params.py.
    arrived = time.monotonic()
    check_api_key(request)  # before anything else: a refused request costs no work
    service = await get_service(request)
    params = read_params(request)
    try:
        # A place, and the version asked for held, before the body is read.
        permit = await service.engine.admit(params.model, params.version)
    except BusyError:
        return await refuse_busy(request)
    try:
        uploads = await read_uploads(request, service.settings)
        result = await service.classify(
            permit,
            uploads,
            top_k=params.top_k,
            resize=params.resize,
            rollout=params.rollout_params,
            heatmap=params.rollout == "png",
            timeout_ms=params.deadline_ms,
            arrived=arrived,
        )
    finally:
        permit.release()
    # Serialised here, once: returned as a model, FastAPI would validate it a second time against
    # `response_model` (which stays for the OpenAPI document) before encoding it.
    answer = ClassifyResponse.model_validate(result).model_dump_json(exclude_none=True)
    return Response(answer, media_type="application/json")


def classify_route() -> APIRoute:
    """POST /classify's route, which the request middleware serves past the router
    (app/http/direct.py): it declares no parameters and returns its own `Response`."""
    return next(r for r in router.routes if isinstance(r, APIRoute) and r.path == "/classify")


@router.get("/healthz", response_model=Status)
async def healthz() -> Status:
    """The process is alive and answering."""
    return Status(status="ok")


@router.get("/readyz", response_model=Status, responses={503: {"model": ErrorBody}})
async def readyz(request: Request) -> Status:
    """Loaded and warmed up, at least one model version serving, and not stopping.

    A model that cannot serve does not take the replica out of its load balancer: the others
    still serve, and GET /models says what is not ready and why. Except with
    VIT_SERVE_REQUIRE_GPU: a version whose sessions landed on the CPU keeps the replica out.
    """
    service = await get_service(request)
    answer = readiness(service.engine, draining(request))
    if not answer.ready:
        raise NotReadyError(answer.reason or "not ready")
    return Status(status="ready")


@router.get("/models", response_model=ModelsResponse)
async def models(request: Request, service: ServiceDep) -> ModelsResponse:
    described = service.engine.describe()
    decoded = request.app.state.metrics.decode_counts()
    infos = []
    for model in described.models:
        default = model.default
        spec = default.spec
        arch = spec.architecture
        placement = default.placement
        provider = placement.provider
        infos.append(
            ModelInfo(
                name=model.name,
                default=model.name == described.default_model,
                versions=[v.version for v in model.versions],
                default_version=model.default_version,
                rollout_versions=[v.version for v in model.versions if v.rollout],
                num_classes=arch.num_classes,
                patch_size=arch.patch_size,
                backbone=None if arch.backbone is None else arch.backbone.description,
                native_grid=arch.grid,
                input_size=arch.input_size,
                fit_max_tokens=model.max_tokens,
                preprocess=PreprocessInfo.model_validate(spec.preprocess),
                decode=DecodeInfo(
                    where=default.decode,
                    decoder=described.decoder,
                    images=decoded.get(model.name, {}),
                ),
                provider=provider,
                placement=placement.node_counts(),
                wanted_provider=placement.wanted or provider,
                fallback=placement.fallback,
                optimization=default.form,
                version_optimization={v.version: v.form for v in model.versions},
                tensorrt_fp16=service.settings.trt_fp16 if provider == TENSORRT else None,
            )
        )
    return ModelsResponse(
        default_model=described.default_model,
        models=infos,
        not_ready=[
            NotReady(model=u.model, version=u.version, reason=u.reason) for u in described.not_ready
        ],
        replica_not_ready=described.replica_not_ready,
    )
