"""Admin endpoints, behind the admin API key (off until one is set)."""

from __future__ import annotations

from fastapi import APIRouter

from app.http.auth import AdminKeyDep
from app.http.deps import ServiceDep
from app.http.schemas import ErrorBody, NotReady, ReloadResponse

router = APIRouter(prefix="/admin", tags=["admin"])


@router.post(
    "/reload",
    response_model=ReloadResponse,
    responses={
        401: {"model": ErrorBody, "description": "no admin key, or the wrong one"},
        403: {"model": ErrorBody, "description": "admin endpoints are off (no key is set)"},
        409: {"model": ErrorBody, "description": "the model repository cannot be read"},
    },
)
async def reload(_: AdminKeyDep, service: ServiceDep) -> ReloadResponse:
    """Scan the model repository and serve what it holds now: new and changed versions are
    loaded, warmed and swapped in; removed ones drain and are released. No request fails."""
    report = await service.engine.reload()
    return ReloadResponse(
        loaded=report.loaded,
        unloaded=report.unloaded,
        unchanged=report.unchanged,
        failed=[NotReady(model=f.model, version=f.version, reason=f.reason) for f in report.failed],
    )
