"""POST /classify straight to its endpoint, past Starlette's router and FastAPI's route wrapper.

Between the request middleware and the endpoint, Starlette and FastAPI run their exception
middleware, an exit stack, the router (matching every route before it), FastAPI's request
handler (dependency solving, telemetry) and two more exception wrappers, for a route that
declares no parameters and returns its own `Response` (app/http/routes.py): what that costs
the event loop per request is measured by `bench.direct_route` (docs/performance.md).

`DirectRoute` does what those layers do for this one route: it puts the route in the scope (the
metrics and the access log read it), calls the endpoint with a `Request`, and answers an
exception with the app's own handler for it, as Starlette's exception middleware would: the
handler of the first class in the exception's MRO that has one (the handlers for `Exception`
and 500 belong to the server-error middleware, outside: what has no handler propagates there,
as before). The route stays registered, so the OpenAPI document and other methods (405) are
unchanged; a request under a `root_path` takes the router, as before.
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import FastAPI, Request, Response
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException
from starlette.types import Message, Receive, Scope, Send

Endpoint = Callable[[Request], Awaitable[Response]]


class DirectRoute:
    def __init__(self, app: FastAPI, route: APIRoute, method: str) -> None:
        self.app = app
        self.route = route
        self.method = method
        self.endpoint: Endpoint = route.endpoint

    def matches(self, scope: Scope) -> bool:
        return (
            scope["path"] == self.route.path
            and scope["method"] == self.method
            and not scope.get("root_path")
        )

    def _handler(self, exc: Exception) -> Callable[..., Any] | None:
        handlers = self.app.exception_handlers
        if isinstance(exc, HTTPException) and exc.status_code != 500:
            by_status = handlers.get(exc.status_code)
            if by_status is not None:
                return by_status
        for cls in type(exc).__mro__:
            if cls is Exception:
                return None  # the server-error middleware's
            if cls in handlers:
                return handlers[cls]
        return None

    def check_innermost(self, owner: type) -> None:
        """Fail at start when a middleware sits between `owner` (the middleware that calls this
        route) and the router: the direct route would skip it for POST /classify alone."""
        stack: list[Any] = [m.cls for m in self.app.user_middleware]  # outermost first
        if owner in stack and stack[-1] is not owner:
            inside = [getattr(c, "__name__", str(c)) for c in stack[stack.index(owner) + 1 :]]
            raise RuntimeError(
                f"{', '.join(inside)} sits inside {owner.__name__}, which serves POST "
                f"{self.route.path} past the router and would skip it: add it after "
                f"{owner.__name__} (outside it)"
            )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        scope["route"] = self.route
        scope["endpoint"] = self.endpoint
        scope["path_params"] = {}
        started = False

        async def sending(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        request = Request(scope, receive, sending)
        try:
            response = await self.endpoint(request)
        except Exception as exc:
            handler = self._handler(exc)
            if handler is None:
                raise
            if started:  # as Starlette's own wrapper: no second answer after the first began
                raise RuntimeError(
                    "Caught handled exception, but response already started."
                ) from exc
            answer = handler(request, exc)
            response = await answer if inspect.isawaitable(answer) else answer
        await response(scope, receive, sending)
