"""The FastAPI application: `uvicorn app.main:create_app --factory`."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from app.api.errors import install_error_handlers
from app.api.routes import router
from app.classifier import BackendFactory, Classifier
from app.imaging import configure_pillow
from app.settings import Settings

log = logging.getLogger(__name__)


def _configure_logging(level: str) -> None:
    # uvicorn configures only its own loggers; without this the service's INFO lines (which
    # provider runs each model, readiness) would go nowhere. Leaves a configured process alone.
    app_log = logging.getLogger("app")
    app_log.setLevel(level.upper())
    if not app_log.handlers and not logging.getLogger().handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        app_log.addHandler(handler)


def create_app(
    settings: Settings | None = None, *, backend_factory: BackendFactory | None = None
) -> FastAPI:
    """The service for `settings` (default: from the environment).

    `backend_factory` replaces ONNX Runtime (tests use a fake); the lifespan loads the
    repository, creates and warms the sessions, starts the batcher, and drains it on shutdown.
    """
    settings = settings or Settings()
    _configure_logging(settings.log_level)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # Loading hashes graphs and builds sessions: keep the event loop free meanwhile. A
        # repository that cannot be served raises here, and the server does not start.
        classifier = await asyncio.to_thread(Classifier.load, settings, backend_factory)
        previous_limit = configure_pillow(settings.image_max_pixels)
        classifier.start()
        app.state.classifier = classifier
        log.info("ready: %d model(s) in %s", len(classifier.repository.models), settings.model_repo)
        try:
            yield
        finally:
            await classifier.stop()
            configure_pillow(previous_limit)
            log.info("stopped")

    app = FastAPI(
        title="vit-serve",
        summary="Vision Transformer inference: dynamic resolution, continuous batching.",
        lifespan=lifespan,
    )
    install_error_handlers(app)
    app.include_router(router)
    return app
