"""Around every request: its id, the access log, the request metrics, and the drain.

Also `GET /metrics`, and the error handlers' note of each error's kind for the metrics.

A pure ASGI middleware rather than Starlette's BaseHTTPMiddleware: it sees the status as the
response starts, adds `X-Request-ID` to it, and runs the route in the request's own task, so the
context variables it opens (request id, metrics record) reach the classify service.
"""

from __future__ import annotations

import logging
import re
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import FastAPI, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.core.logs import request_id_var
from app.core.records import RequestRecord, current_request, request_scope
from app.http.direct import DirectRoute
from app.http.frontdoor import DRAINING_MESSAGE, error_response
from app.http.metrics import QUIET_PATHS, UNMATCHED_ROUTE, Metrics, error_reason

access_log = logging.getLogger("app.access")

REQUEST_ID_HEADER = "x-request-id"
# Ids from a client or a load balancer are kept when they look like ids (uuids, nginx's
# $request_id, trace ids); anything else is replaced, so logs never carry injected text.
_VALID_REQUEST_ID = re.compile(r"[A-Za-z0-9._:\-]{1,128}")
# Refused while draining: readiness, so that load balancers and Kubernetes stop sending work.
# Everything else is served as usual (see Lifecycle).
_REFUSED_WHILE_DRAINING = frozenset({"/readyz"})
CONNECTION_CLOSE = (b"connection", b"close")


class Lifecycle:
    """Whether the server is draining for shutdown: set on SIGTERM (see app.server).

    While draining, /readyz answers 503 so that load balancers stop sending work, and every
    other request is served as usual: a load balancer takes seconds to notice, and what it
    sends meanwhile should succeed, not turn into a 503 that a client without retries sees as
    an error. Each answer carries `Connection: close`, so kept-alive connections end as they are
    used and their clients reconnect, to another replica once the balancer has noticed.
    """

    def __init__(self) -> None:
        self.draining = False

    def begin_drain(self) -> None:
        self.draining = True


def _request_id(scope: Scope) -> str:
    for name, value in scope["headers"]:
        if name == b"x-request-id":
            text: str = bytes(value).decode("latin-1")
            if _VALID_REQUEST_ID.fullmatch(text):
                return text
            break
    return uuid.uuid4().hex


def _route_of(scope: Scope) -> str | None:
    path: object = getattr(scope.get("route"), "path", None)
    return path if isinstance(path, str) else None


class RequestMiddleware:
    def __init__(
        self,
        app: ASGIApp,
        *,
        owner: FastAPI,
        metrics: Metrics,
        lifecycle: Lifecycle,
        direct: DirectRoute | None = None,
    ) -> None:
        """`direct`: a route served past the router (app/http/direct.py)."""
        self.app = app
        self.owner = owner
        self.metrics = metrics
        self.lifecycle = lifecycle
        self.direct = direct

    def _known_route(self, path: str) -> str:
        # A refused request never reaches the router, so its route is looked up: the app has
        # no path parameters, and its OpenAPI document (built once, cached) lists every route.
        return path if path in self.owner.openapi().get("paths", {}) else UNMATCHED_ROUTE

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        path: str = scope["path"]
        quiet = path in QUIET_PATHS
        record = RequestRecord(request_id=_request_id(scope))
        header = (REQUEST_ID_HEADER.encode(), record.request_id.encode())
        status = 500  # what the client sees if the app raises before answering
        sent_bytes = 0

        async def send_with_id(message: Message) -> None:
            nonlocal status, sent_bytes
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = [*message.get("headers", []), header]
                # Read as the answer starts: a request in flight when the drain began closes too.
                if self.lifecycle.draining and CONNECTION_CLOSE not in headers:
                    headers.append(CONNECTION_CLOSE)
                message = {**message, "headers": headers}
            elif message["type"] == "http.response.body":
                sent_bytes += len(message.get("body", b""))
            await send(message)

        refused = self.lifecycle.draining and path in _REFUSED_WHILE_DRAINING
        token = request_id_var.set(record.request_id)
        if not quiet:
            self.metrics.in_flight.inc()
        try:
            with request_scope(record):
                if refused:
                    record.error_reason = "shutting_down"
                    response = error_response(503, DRAINING_MESSAGE)
                    await response(scope, receive, send_with_id)
                elif self.direct is not None and self.direct.matches(scope):
                    await self.direct(scope, receive, send_with_id)
                else:
                    await self.app(scope, receive, send_with_id)
        except Exception:
            record.error_reason = record.error_reason or "internal"
            raise
        finally:
            seconds = time.perf_counter() - started
            route = self._known_route(path) if refused else _route_of(scope) or UNMATCHED_ROUTE
            if not quiet:
                self.metrics.in_flight.dec()
                self.metrics.request_done(route, status, seconds, record)
            level = logging.DEBUG if quiet and status < 500 else logging.INFO
            if access_log.isEnabledFor(level):  # its fields are not built for nothing
                client = scope.get("client")
                access_log.log(
                    level,
                    "%s %s %d",
                    scope["method"],
                    path,
                    status,
                    extra={
                        "method": scope["method"],
                        "path": path,
                        "query": scope.get("query_string", b"").decode("latin-1")[:200],
                        "route": route,
                        "status": status,
                        "duration_ms": round(seconds * 1e3, 3),
                        "bytes_sent": sent_bytes,
                        "model": record.model or None,
                        "images": record.images or None,
                        "error_reason": record.error_reason if status >= 400 else None,
                        "client": f"{client[0]}:{client[1]}" if client else None,
                    },
                )
            request_id_var.reset(token)


ExceptionHandler = Callable[[Request, Exception], Awaitable[Response]]


def _noting_reason(handler: ExceptionHandler) -> ExceptionHandler:
    async def handle(request: Request, exc: Exception) -> Response:
        record = current_request()
        if record is not None:
            record.error_reason = error_reason(exc)
        return await handler(request, exc)

    return handle


def install_metrics(app: FastAPI, metrics: Metrics) -> None:
    """Serve `GET /metrics` and note each handled error's reason for the request metrics.

    Call after every exception handler is installed: the handlers are wrapped as they are.
    """

    async def metrics_endpoint(_: Request) -> Response:
        await metrics.refresh()
        return Response(metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    app.add_route("/metrics", metrics_endpoint, methods=["GET"], include_in_schema=False)
    handlers: dict[Any, Any] = app.exception_handlers
    for exc_type, handler in list(handlers.items()):
        handlers[exc_type] = _noting_reason(handler)
