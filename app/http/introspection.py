"""GET /models/{name}/introspection and POST .../attention-distance: Fig. 7 of the ViT paper."""

from __future__ import annotations

import asyncio
from typing import Annotated, Any, Literal

from fastapi import APIRouter, FastAPI, Query, Request
from fastapi.responses import JSONResponse, Response

from app.core.errors import BadRequestBodyError, BusyError
from app.http.auth import check_api_key
from app.http.frontdoor import get_service, refuse_busy
from app.http.schemas import ErrorBody
from app.http.uploads import read_uploads
from app.pipeline.preprocess import prepare

router = APIRouter(tags=["introspection"])

_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorBody, "description": "not an image, or not exactly one"},
    404: {"model": ErrorBody, "description": "unknown model or version, or no introspection"},
    422: {"model": ErrorBody, "description": "a bad `grid` or `version`"},
    503: {"model": ErrorBody, "description": "the model cannot serve, or not ready"},
}
VersionQuery = Annotated[int | None, Query(ge=0, description="default: the default version")]


@router.get("/models/{name}/introspection", responses=_ERRORS)
async def introspection(
    request: Request,
    name: str,
    version: VersionQuery = None,
    grid: Annotated[
        str | None,
        Query(description="also the position embeddings' similarity resampled to HxW patches"),
    ] = None,
) -> JSONResponse:
    """The three panels of Fig. 7 for a model version, as numbers and PNGs (base64): the patch
    embedding filters' principal components, the position embeddings' cosine similarity (at the
    native grid, and at `grid`), and the mean attention distance per head and depth over the
    held-out images the export measured (their number recorded)."""
    service = await get_service(request)
    return JSONResponse(await service.engine.introspect(name, version, grid))


@router.post("/models/{name}/introspection/attention-distance", responses=_ERRORS)
async def attention_distance(
    request: Request,
    name: str,
    version: VersionQuery = None,
    resize: Annotated[Literal["crop", "fit"], Query()] = "crop",
) -> Response:
    """The mean attention distance per head and depth for one uploaded image (multipart field
    `image`, or the raw body with its image/* type), run on the version's rollout graph."""
    check_api_key(request)
    service = await get_service(request)
    try:
        permit = await service.engine.admit(name, version)
    except BusyError:
        return await refuse_busy(request)
    try:
        uploads = await read_uploads(request, service.settings)
        if len(uploads) != 1:
            raise BadRequestBodyError(f"send exactly one image, not {len(uploads)}")
        upload = uploads[0]
        settings = service.settings
        image = await asyncio.to_thread(
            prepare,
            upload.data,
            permit.served.spec,
            resize,
            name=upload.name,
            max_pixels=settings.image_max_pixels,
            fit_max_tokens=permit.served.max_tokens,
            jpeg_draft=settings.jpeg_draft,
        )
        answer = await service.engine.attention_distance(permit, image.patches, image.image_size)
    finally:
        permit.release()
    return JSONResponse(answer)


def install_introspection(app: FastAPI) -> None:
    app.include_router(router)
