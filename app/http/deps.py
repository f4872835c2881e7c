"""FastAPI dependencies: the running classify service, or a 503 while there is none."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from app.core.errors import NotReadyError
from app.pipeline.service import ClassifyService


async def get_service(request: Request) -> ClassifyService:
    # async: FastAPI runs a plain `def` dependency in its thread pool, a thread hop per request.
    service = getattr(request.app.state, "service", None)
    if not isinstance(service, ClassifyService) or not service.ready:
        raise NotReadyError("the models are not loaded yet or the server is stopping; retry")
    return service


ServiceDep = Annotated[ClassifyService, Depends(get_service)]
