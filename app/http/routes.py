"""HTTP routes: parse and validate the request, call the classify service, shape the answer."""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.routing import APIRoute

from app.core.errors import NotReadyError
from app.http.auth import API_KEY_SECURITY, check_api_key
from app.http.deps import ServiceDep, get_service
from app.http.params import openapi_parameters, read_params
from app.http.schemas import (
    ClassifyResponse,
    ErrorBody,
    ModelInfo,
    ModelsResponse,
    NotReady,
    PreprocessInfo,
    Status,
)
from app.http.uploads import read_uploads
from app.models.providers import TENSORRT, graph_form

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
    arrived = asyncio.get_running_loop().time()
    check_api_key(request)  # before anything else: a refused request costs no work
    service = await get_service(request)
    params = read_params(request)
    with service.admission():
        uploads = await read_uploads(request, service.settings)
        result = await service.classify(
            uploads,
            model=params.model,
            version=params.version,
            top_k=params.top_k,
            resize=params.resize,
            rollout=params.rollout_params,
            heatmap=params.rollout == "png",
            timeout_ms=params.deadline_ms,
            arrived=arrived,
        )
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
async def readyz(service: ServiceDep) -> Status:
    """Loaded and warmed up, at least one model version serving, and not stopping.

    A model that cannot serve does not take the replica out of its load balancer: the others
    still serve, and GET /models says what is not ready and why. Except with
    VIT_SERVE_REQUIRE_GPU: a version whose sessions landed on the CPU keeps the replica out.
    """
    reason = service.models.not_ready_reason
    if reason is not None:
        raise NotReadyError(f"VIT_SERVE_REQUIRE_GPU is set and {reason}")
    if not service.serving:
        raise NotReadyError(
            "no model can be served; GET /models lists each one's reason"
            if service.models.repository.unavailable
            else "the model repository is empty: add a model and reload"
        )
    return Status(status="ready")


@router.get("/models", response_model=ModelsResponse)
async def models(service: ServiceDep) -> ModelsResponse:
    repository = service.models.repository
    infos = []
    for name, entry in sorted(repository.models.items()):
        spec = entry.spec
        arch = spec.architecture
        placement = service.models.placement(entry)
        provider = placement.provider
        infos.append(
            ModelInfo(
                name=name,
                default=name == repository.default_model,
                versions=sorted(entry.versions),
                default_version=entry.default_version,
                rollout_versions=service.models.rollout_versions(entry),
                num_classes=arch.num_classes,
                patch_size=arch.patch_size,
                backbone=None if arch.backbone is None else arch.backbone.description,
                native_grid=arch.grid,
                input_size=arch.input_size,
                fit_max_tokens=service.fit_max_tokens(spec),
                preprocess=PreprocessInfo.model_validate(spec.preprocess),
                provider=provider,
                placement=placement.node_counts(),
                wanted_provider=placement.wanted or provider,
                fallback=placement.fallback,
                optimization=graph_form(spec, entry.default_version),
                version_optimization={v: graph_form(spec, v) for v in sorted(entry.versions)},
                tensorrt_fp16=service.settings.trt_fp16 if provider == TENSORRT else None,
            )
        )
    not_ready = [
        NotReady(model=u.model, version=u.version, reason=u.reason)
        for _, u in sorted(repository.unavailable.items(), key=lambda kv: (kv[0][0], kv[0][1] or 0))
    ]
    return ModelsResponse(
        default_model=repository.default_model,
        models=infos,
        not_ready=not_ready,
        replica_not_ready=service.models.not_ready_reason,
    )
