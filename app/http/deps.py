"""FastAPI dependencies: the running classify service, or a 503 while there is none."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends

from app.http.frontdoor import get_service
from app.pipeline.service import ClassifyService

ServiceDep = Annotated[ClassifyService, Depends(get_service)]
