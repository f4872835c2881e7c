"""The FastAPI application: `uvicorn app.main:create_app --factory`."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from app.core import collector
from app.core.logs import configure_logging
from app.core.settings import Settings
from app.http.admin import router as admin_router
from app.http.cors import install_cors
from app.http.direct import DirectRoute
from app.http.errors import install_error_handlers
from app.http.introspection import install_introspection
from app.http.metrics import Metrics
from app.http.middleware import Lifecycle, RequestMiddleware, install_metrics
from app.http.page import install_page
from app.http.routes import classify_route, router
from app.http.v2.grpc_server import GrpcFrontDoor
from app.http.v2.rest import router as v2_router
from app.models.sessions import BackendFactory, RolloutBackendFactory
from app.models.table import ModelTable
from app.pipeline.imaging import configure_pillow
from app.pipeline.service import ClassifyService

log = logging.getLogger(__name__)


def create_app(
    settings: Settings | None = None,
    *,
    backend_factory: BackendFactory | None = None,
    rollout_factory: RolloutBackendFactory | None = None,
) -> FastAPI:
    """The service for `settings` (default: from the environment).

    `backend_factory` and `rollout_factory` replace ONNX Runtime for the plain and the rollout
    graphs (tests use fakes; a rollout factory that returns None serves no maps); the lifespan
    loads the repository, creates and warms the sessions, starts the batcher, and drains it on
    shutdown.
    """
    settings = settings or Settings()
    configure_logging(settings.log_level, settings.log_format)
    metrics = Metrics()
    lifecycle = Lifecycle()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        collector.tune_once()  # before the models: their sessions stay collectable
        # Loading hashes graphs and builds sessions: keep the event loop free meanwhile. A
        # repository that cannot be served raises here, and the server does not start.
        models = await asyncio.to_thread(
            ModelTable.load, settings, backend_factory, rollout_factory
        )
        service = ClassifyService(settings, models)
        previous_limit = configure_pillow(settings.image_max_pixels)
        # The observers: the domain reports to these hooks and never imports Prometheus.
        metrics.watch(service, lambda: lifecycle.draining)
        models.on_change = lambda: metrics.show_models(models)
        service.batcher.observer = metrics
        service.start()
        app.state.service = service
        # The Open Inference Protocol over gRPC, in this event loop, when a port is set.
        grpc_door = None
        if settings.grpc_port is not None:
            grpc_door = GrpcFrontDoor(service, settings, metrics, lifecycle)
            app.state.grpc_port = await grpc_door.start()
        log.info(
            "started: %d model(s) serving, %d not ready, in %s",
            len(models.repository.models),
            len(models.repository.unavailable),
            settings.model_repo,
        )
        try:
            yield
        finally:
            if grpc_door is not None:  # its calls in flight finish first, as HTTP's did
                await grpc_door.stop(settings.drain_timeout_s)
            await service.stop()
            configure_pillow(previous_limit)
            log.info("stopped")

    app = FastAPI(
        title="vit-serve",
        summary="Vision Transformer inference: dynamic resolution, continuous batching.",
        lifespan=lifespan,
    )
    install_error_handlers(app)
    app.include_router(router)
    app.include_router(admin_router)
    app.include_router(v2_router)
    install_introspection(app)
    install_page(app)
    app.state.settings = settings  # the access checks read it (app/http/auth.py)
    app.state.metrics = metrics
    app.state.lifecycle = lifecycle
    direct = DirectRoute(app, classify_route(), "POST")
    app.add_middleware(
        RequestMiddleware, owner=app, metrics=metrics, lifecycle=lifecycle, direct=direct
    )
    install_cors(app, settings.cors_allow_origins)  # after: the outermost middleware
    install_metrics(app, metrics)  # last: it wraps the exception handlers installed above
    return app
