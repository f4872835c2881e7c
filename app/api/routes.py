"""HTTP routes: parse and validate the request, call the classifier, shape the answer."""

from __future__ import annotations

import asyncio
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Header, Query, Request, Response

from app.api.auth import ApiKeyDep
from app.api.deps import ClassifierDep
from app.api.schemas import (
    ClassifyResponse,
    ErrorBody,
    ModelInfo,
    ModelsResponse,
    NotReady,
    PreprocessInfo,
    Status,
)
from app.api.uploads import read_uploads
from app.errors import NotReadyError
from app.providers import TENSORRT, graph_form
from app.rollout import HeadFusion, RolloutParams

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
    openapi_extra=_BODY,
)
async def classify(
    request: Request,
    _key: ApiKeyDep,  # before anything else: a refused request costs no work
    classifier: ClassifierDep,
    model: Annotated[
        str | None, Query(max_length=200, description="default: the server's default model")
    ] = None,
    version: Annotated[int | None, Query(ge=0, description="default: the highest")] = None,
    top_k: Annotated[int | None, Query(ge=1, description="default 5, clipped to classes")] = None,
    resize: Annotated[
        Literal["crop", "fit"],
        Query(description="crop: the training preprocessing; fit: keep the aspect ratio"),
    ] = "crop",
    rollout: Annotated[
        Literal["false", "true", "png"],
        Query(
            description="true: add each image's attention rollout grid (runs the rollout graph); "
            "png: also a heatmap of it over the image"
        ),
    ] = "false",
    head_fusion: Annotated[
        HeadFusion, Query(description="rollout: how each block's attention heads are fused")
    ] = "mean",
    discard_ratio: Annotated[
        float,
        Query(
            ge=0.0,
            lt=1.0,
            allow_inf_nan=False,
            description="rollout: fraction of lowest attentions zeroed per block",
        ),
    ] = 0.0,
    timeout_ms: Annotated[
        float | None,
        Query(
            gt=0,
            allow_inf_nan=False,
            description="this request's deadline in ms; lowers the server's, never raises it",
        ),
    ] = None,
    x_request_timeout_ms: Annotated[
        float | None,
        Header(gt=0, allow_inf_nan=False, description="as timeout_ms; the lower of both wins"),
    ] = None,
) -> Response:
    arrived = asyncio.get_running_loop().time()
    given = [t for t in (timeout_ms, x_request_timeout_ms) if t is not None]
    with classifier.admission():
        uploads = await read_uploads(request, classifier.settings)
        result = await classifier.classify(
            uploads,
            model=model,
            version=version,
            top_k=top_k,
            resize=resize,
            rollout=None if rollout == "false" else RolloutParams(head_fusion, discard_ratio),
            heatmap=rollout == "png",
            timeout_ms=min(given, default=None),
            arrived=arrived,
        )
    # Serialised here, once: returned as a model, FastAPI would validate it a second time against
    # `response_model` (which stays for the OpenAPI document) before encoding it.
    answer = ClassifyResponse.model_validate(result).model_dump_json(exclude_none=True)
    return Response(answer, media_type="application/json")


@router.get("/healthz", response_model=Status)
async def healthz() -> Status:
    """The process is alive and answering."""
    return Status(status="ok")


@router.get("/readyz", response_model=Status, responses={503: {"model": ErrorBody}})
async def readyz(classifier: ClassifierDep) -> Status:
    """Loaded and warmed up, at least one model version serving, and not stopping.

    A model that cannot serve does not take the replica out of its load balancer: the others
    still serve, and GET /models says what is not ready and why.
    """
    if not classifier.serving:
        raise NotReadyError(
            "no model can be served; GET /models lists each one's reason"
            if classifier.repository.unavailable
            else "the model repository is empty: add a model and reload"
        )
    return Status(status="ready")


@router.get("/models", response_model=ModelsResponse)
async def models(classifier: ClassifierDep) -> ModelsResponse:
    repository = classifier.repository
    infos = []
    for name, entry in sorted(repository.models.items()):
        spec = entry.spec
        arch = spec.architecture
        provider = classifier.provider(entry)
        infos.append(
            ModelInfo(
                name=name,
                default=name == repository.default_model,
                versions=sorted(entry.versions),
                default_version=entry.default_version,
                rollout_versions=classifier.rollout_versions(entry),
                num_classes=arch.num_classes,
                patch_size=arch.patch_size,
                native_grid=arch.grid,
                input_size=arch.input_size,
                fit_max_tokens=classifier.fit_max_tokens(spec),
                preprocess=PreprocessInfo.model_validate(spec.preprocess),
                provider=provider,
                optimization=graph_form(spec, entry.default_version),
                tensorrt_fp16=classifier.settings.trt_fp16 if provider == TENSORRT else None,
            )
        )
    not_ready = [
        NotReady(model=u.model, version=u.version, reason=u.reason)
        for _, u in sorted(repository.unavailable.items(), key=lambda kv: (kv[0][0], kv[0][1] or 0))
    ]
    return ModelsResponse(default_model=repository.default_model, models=infos, not_ready=not_ready)
