"""The FastAPI application: `uvicorn app.main:create_app --factory`."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from app.core import collector
from app.core.logs import configure_logging
from app.core.settings import Settings
from app.engine import Engine, ModelTable, RemoteEngine
from app.grpc.server import GrpcFrontDoor
from app.http.admin import router as admin_router
from app.http.cors import install_cors
from app.http.direct import DirectRoute
from app.http.errors import install_error_handlers
from app.http.frontdoor import readiness
from app.http.introspection import install_introspection
from app.http.metrics import MULTIPROC_ENV, Metrics
from app.http.middleware import Lifecycle, RequestMiddleware, install_metrics
from app.http.page import install_page
from app.http.routes import classify_route, router
from app.http.v2.rest import router as v2_router
from app.pipeline.preprocess import configure_pillow
from app.pipeline.service import ClassifyService
from app.runtime.decodemode import open_decoder
from app.runtime.devicedecode import DeviceDecoder
from app.runtime.sessions import BackendFactory, RolloutBackendFactory

log = logging.getLogger(__name__)


def load_engine(
    settings: Settings,
    backend_factory: BackendFactory | None = None,
    rollout_factory: RolloutBackendFactory | None = None,
    device_decoder: DeviceDecoder | None = None,
) -> Engine:
    """Load (and warm) every model version and make the engine that serves them; blocking.

    The device decoder is VIT_SERVE_DECODE's (`open_decoder`: a DecodeUnavailableError here,
    with why, when it is `gpu` and cannot be), or `device_decoder` where one is given (tests).
    """
    table = ModelTable.load(settings, backend_factory, rollout_factory)
    if device_decoder is not None:
        return Engine(settings, table, device_decoder, device_decoder.name)
    decoder, note = open_decoder(settings.decode, table.on_gpu)
    return Engine(settings, table, decoder, note)


def create_app(
    settings: Settings | None = None,
    *,
    backend_factory: BackendFactory | None = None,
    rollout_factory: RolloutBackendFactory | None = None,
    engine_address: str | None = None,
    device_decoder: DeviceDecoder | None = None,
) -> FastAPI:
    """The service for `settings` (default: from the environment).

    `backend_factory` and `rollout_factory` replace ONNX Runtime for the plain and the rollout
    graphs (tests use fakes; a rollout factory that returns None serves no maps); the lifespan
    loads the repository, creates and warms the sessions, starts the batcher, and drains it on
    shutdown. With `engine_address` this is a front-end process: the engine runs in another
    process (app/engine/host.py), reached there, and this one loads no model.
    `device_decoder` replaces the one VIT_SERVE_DECODE opens (tests: a host stand-in).
    """
    settings = settings or Settings()
    configure_logging(settings.log_level, settings.log_format)
    # A front end of several: its metrics go to the replica's shared folder (app/server.py).
    metrics = Metrics(multiprocess_dir=os.environ.get(MULTIPROC_ENV) if engine_address else None)
    lifecycle = Lifecycle()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        direct.check_innermost(RequestMiddleware)
        collector.tune_once()  # before the models: their sessions stay collectable
        engine: Engine | RemoteEngine
        if engine_address is None:
            # Loading hashes graphs and builds sessions: keep the event loop free meanwhile. A
            # repository that cannot be served raises here, and the server does not start.
            local = await asyncio.to_thread(
                load_engine, settings, backend_factory, rollout_factory, device_decoder
            )
            local.observe(metrics)  # the domain reports to hooks and never imports Prometheus
            local.start()
            engine = local
        else:
            remote = RemoteEngine(engine_address, settings.shared_memory_bytes)
            await remote.start(settings.engine_start_timeout_s, lambda: lifecycle.draining)
            engine = remote
        service = ClassifyService(settings, engine)
        previous_limit = configure_pillow(settings.image_max_pixels)
        metrics.watch(engine, lambda: readiness(engine, lifecycle.draining).ready)
        app.state.engine = engine
        app.state.service = service
        # The Open Inference Protocol over gRPC, in this event loop, when a port is set.
        grpc_door = None
        if settings.grpc_port is not None:
            grpc_door = GrpcFrontDoor(
                service, settings, metrics, lifecycle, shared_port=engine_address is not None
            )
            app.state.grpc_port = await grpc_door.start()
        described = engine.describe()
        log.info(
            "started: %d model(s) serving, %d not ready, in %s",
            len(described.models),
            len(described.not_ready),
            settings.model_repo,
        )
        try:
            yield
        finally:
            if grpc_door is not None:  # its calls in flight finish first, as HTTP's did
                await grpc_door.stop(settings.drain_timeout_s)
            await engine.stop()
            service.stop()
            configure_pillow(previous_limit)
            log.info("stopped")

    app = FastAPI(
        title="vit-serve",
        summary="Vision Transformer inference: dynamic resolution, continuous batching.",
        lifespan=lifespan,
        # FastAPI's own OpenTelemetry hooks, off: the service's metrics are Prometheus's, and
        # with them on every request asks the global providers whether anyone listens.
        telemetry={"tracing": False, "metrics": False, "logs": False},
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
