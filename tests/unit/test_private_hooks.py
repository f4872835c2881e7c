"""What the server relies on inside uvicorn, httptools, Starlette and FastAPI beyond their
public APIs, each checked, so that an upgrade that changes one fails here, naming it, rather
than in production.

- app/transport/httptools.py subclasses uvicorn's `HttpToolsProtocol` (a private module): it extends
  some of its methods through super(), replaces others whole, calls its private helpers, reads
  and writes its attributes and those of its `RequestResponseCycle`, imports `uvicorn._types`,
  and relies on httptools putting a callback's exception in `HttpParserError.__context__`.
- app/http/direct.py serves POST /classify past Starlette's router: it writes the scope keys
  the router would (FastAPI's `route`, Starlette's `endpoint` and `path_params`) and chooses an
  exception's handler as Starlette's exception wrapper does.

A method that is replaced whole is pinned by a fingerprint of its code: when uvicorn changes
it, compare it with the override, bring the override in line, then update the fingerprint.

HOOKS below is the whole list, one entry per hook.
"""

from __future__ import annotations

import ast
import asyncio
import hashlib
import importlib
import inspect
import textwrap
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httptools
import httpx
import pytest
import uvicorn
from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from starlette import _exception_handler
from starlette.exceptions import HTTPException
from starlette.middleware.exceptions import ExceptionMiddleware
from starlette.types import Receive, Scope, Send
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle
from uvicorn.server import ServerState

import app.main  # noqa: F401 (every module that defines one of the service's errors)
from app.core.errors import service_errors
from app.http.direct import DirectRoute
from app.http.errors import install_error_handlers
from tests.unit.test_connections import GET, FakeTransport, Server

STATUS_OF = list(service_errors().values())  # every error the service answers with a status
PROTOCOL = "app/transport/httptools.py"
DIRECT = "app/http/direct.py"


@dataclass(frozen=True)
class Hook:
    library: str
    name: str
    user: str  # the module that relies on it
    check: Callable[[], None]  # raises AssertionError saying what changed

    @property
    def id(self) -> str:
        return f"{self.library}:{self.name}"


# --- kinds of check ---------------------------------------------------------------------------


def importable(module: str, name: str) -> Callable[[], None]:
    def check() -> None:
        try:
            found = importlib.import_module(module)
        except ImportError as exc:
            raise AssertionError(f"module {module} is gone ({exc})") from exc
        assert hasattr(found, name), f"{module} no longer defines {name}"

    return check


def _method(owner: type, name: str) -> Callable[..., Any]:
    method: Callable[..., Any] | None = owner.__dict__.get(name)
    assert callable(method), f"{owner.__name__} no longer defines {name}"
    return method


def signature(owner: Any, name: str, expected: str) -> Callable[[], None]:
    """`owner.name` exists (defined on `owner` itself when it is a class) with these parameters
    (names and defaults: annotations are strings or types depending on the library's imports)."""

    def check() -> None:
        target = _method(owner, name) if isinstance(owner, type) else getattr(owner, name, None)
        assert callable(target), f"{name} is gone"
        shown = ", ".join(
            p.name if p.default is inspect.Parameter.empty else f"{p.name}={p.default!r}"
            for p in inspect.signature(target).parameters.values()
        )
        assert f"({shown})" == expected, f"changed signature: now ({shown}), was {expected}"

    return check


def fingerprint(function: Callable[..., Any]) -> str:
    """sha256 of a function's code (unparsed: formatting and comments do not count), less its
    docstring."""
    node = ast.parse(textwrap.dedent(inspect.getsource(function))).body[0]
    assert isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
    body = node.body
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
        node.body = body[1:] or [ast.Pass()]
    return hashlib.sha256(ast.unparse(node).encode()).hexdigest()[:16]


def unchanged(owner: Any, name: str, expected: str) -> Callable[[], None]:
    def check() -> None:
        target = _method(owner, name) if isinstance(owner, type) else getattr(owner, name, None)
        assert callable(target), f"{name} is gone"
        got = fingerprint(target)
        assert got == expected, (
            f"changed (fingerprint {got}, was {expected}); the override replaces it whole: "
            "compare the two, bring the override in line, then update the fingerprint"
        )

    return check


# --- behaviour, where it is cheap -------------------------------------------------------------

PROTOCOL_ATTRIBUTES = (
    "app", "client", "connections", "cycle", "expect_100_continue", "flow", "headers", "loop",
    "parser", "server_state", "timeout_keep_alive_task", "transport", "url",
)  # fmt: skip
CYCLE_ATTRIBUTES = (
    "disconnected", "keep_alive", "message_event", "more_body", "response_complete",
    "response_started",
)  # fmt: skip


def protocol_and_cycle_attributes() -> None:
    """One request through uvicorn's own protocol: the attributes the subclass reads and
    writes are there, of the kinds it uses them as."""

    async def run() -> None:
        config = uvicorn.Config(_ok_app, log_config=None)
        state = ServerState()
        protocol = HttpToolsProtocol(config, state, {}, asyncio.get_running_loop())
        protocol.connection_made(FakeTransport(protocol))
        protocol.data_received(GET)
        cycle = protocol.cycle
        for name in PROTOCOL_ATTRIBUTES:
            assert hasattr(protocol, name), f"HttpToolsProtocol has no attribute {name}"
        assert isinstance(cycle, RequestResponseCycle), "no RequestResponseCycle in .cycle"
        for name in CYCLE_ATTRIBUTES:
            assert hasattr(cycle, name), f"RequestResponseCycle has no attribute {name}"
        assert isinstance(cycle.message_event, asyncio.Event), "cycle.message_event"
        assert protocol in protocol.connections, "the protocol is not in .connections"
        assert protocol.url == b"/x", "on_url does not build .url"
        assert callable(protocol.flow.resume_reading), "flow.resume_reading"
        assert isinstance(state.default_headers, list), "ServerState.default_headers"
        for _ in range(100):
            if cycle.response_complete:
                break
            await asyncio.sleep(0)
        assert cycle.response_complete, "the cycle never completed its response"
        assert protocol.timeout_keep_alive_task is not None, "no keep-alive timer after it"
        protocol.transport.close()

    asyncio.run(run())


async def _ok_app(scope: Scope, receive: Receive, send: Send) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})


class _RefusedError(Exception):
    pass


def parser_error_context() -> None:
    """A callback's exception reaches data_received as the HttpParserError's __context__
    (that is how a 431 is told from a 400)."""

    class Callbacks:
        def on_header(self, name: bytes, value: bytes) -> None:
            raise _RefusedError

    parser = httptools.HttpRequestParser(Callbacks())
    try:
        parser.feed_data(b"GET / HTTP/1.1\r\nx: y\r\n\r\n")
    except httptools.HttpParserError as exc:
        assert isinstance(exc.__context__, _RefusedError), f"__context__ is {exc.__context__!r}"
    else:
        raise AssertionError("a callback's exception no longer stops the parser")


# Keys the router adds that DirectRoute does not: Starlette's router and exception middleware
# and FastAPI's exit stacks for dependencies with `yield`, which /classify does not declare.
ROUTER_ONLY_KEYS = {
    "router",
    "starlette.exception_handlers",
    "fastapi_middleware_astack",
    "fastapi_inner_astack",
    "fastapi_function_astack",
}


def _probe_app(direct: bool, seen: dict[str, dict[str, Any]]) -> FastAPI:
    app = FastAPI()

    @app.post("/probe")
    async def probe(request: Request) -> Response:
        seen["endpoint"] = dict(request.scope)
        return Response(b"ok")

    route = next(r for r in app.routes if isinstance(r, APIRoute))
    shortcut = DirectRoute(app, route, "POST")

    class Outermost:  # where RequestMiddleware sits
        def __init__(self, app: Any) -> None:
            self.app = app

        async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
            seen["entry"] = dict(scope)
            if direct and scope["type"] == "http" and shortcut.matches(scope):
                await shortcut(scope, receive, send)
            else:
                await self.app(scope, receive, send)

    app.add_middleware(Outermost)
    return app


def route_scope_keys() -> None:
    """The keys DirectRoute writes are the router's, with the same values, and the router
    writes no other that it does not know of."""

    async def added(direct: bool) -> dict[str, Any]:
        seen: dict[str, dict[str, Any]] = {}
        app = _probe_app(direct, seen)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            assert (await client.post("/probe")).status_code == 200
        return {k: v for k, v in seen["endpoint"].items() if k not in seen["entry"]}

    routed, direct = asyncio.run(added(False)), asyncio.run(added(True))
    assert set(direct) == {"route", "endpoint", "path_params"}, f"DirectRoute wrote {direct}"
    assert set(direct) <= set(routed), f"the router no longer writes {set(direct) - set(routed)}"
    new = set(routed) - set(direct) - ROUTER_ONLY_KEYS
    assert not new, f"the router now also writes {sorted(new)}, which DirectRoute does not"
    assert isinstance(routed["route"], APIRoute), "scope['route'] is not the APIRoute"
    assert routed["endpoint"] is routed["route"].endpoint, "scope['endpoint'] is not its endpoint"
    assert routed["path_params"] == direct["path_params"] == {}, "path_params"
    assert isinstance(routed["route"].path, str), "APIRoute.path (the metrics read it)"


def _exception_middleware(app: FastAPI) -> ExceptionMiddleware:
    layer: Any = app.build_middleware_stack()
    while not isinstance(layer, ExceptionMiddleware):
        layer = getattr(layer, "app", None)
        assert layer is not None, "no ExceptionMiddleware in the middleware stack"
    return layer


def exception_middleware_tables() -> None:
    """The tables exception_handler_choice compares DirectRoute's choice with."""
    middleware = _exception_middleware(FastAPI())
    for name in ("_exception_handlers", "_status_handlers"):
        assert isinstance(getattr(middleware, name, None), dict), f"ExceptionMiddleware.{name}"


def exception_handler_choice() -> None:
    """For the service's own handlers, DirectRoute picks the handler Starlette's wrapper would
    (its status table for an HTTPException, then the exception's MRO; none for what the
    server-error middleware handles)."""
    app = FastAPI()
    install_error_handlers(app)
    app.post("/probe")(_probe_endpoint)
    route = next(r for r in app.routes if isinstance(r, APIRoute))
    middleware = _exception_middleware(app)
    handlers = middleware._exception_handlers
    by_status = middleware._status_handlers
    own = [cls.__new__(cls) for cls in STATUS_OF]
    subclasses: list[type[Exception]] = [type("Sub", (cls,), {}) for cls in STATUS_OF]
    subclassed = [cls.__new__(cls) for cls in subclasses]
    others: list[Exception] = [
        HTTPException(404), HTTPException(500), HTTPException(418), RequestValidationError([]),
        ValueError("unexpected"), KeyError("unexpected"),
    ]  # fmt: skip
    shortcut = DirectRoute(app, route, "POST")
    for exc in [*own, *subclassed, *others]:
        expected = None
        if isinstance(exc, HTTPException):
            expected = by_status.get(exc.status_code)
        if expected is None:
            expected = _exception_handler._lookup_exception_handler(handlers, exc)
        got = shortcut._handler(exc)
        assert got is expected, f"for {type(exc).__mro__[:2]} Starlette picks {expected}, not {got}"


async def _probe_endpoint(request: Request) -> Response:
    return Response(b"ok")


# --- the hooks --------------------------------------------------------------------------------

HOOKS: list[Hook] = [
    # app/transport/httptools.py: names it imports
    Hook("uvicorn", "uvicorn._types.ASGIReceiveCallable", PROTOCOL,
         importable("uvicorn._types", "ASGIReceiveCallable")),
    Hook("uvicorn", "uvicorn._types.ASGISendCallable", PROTOCOL,
         importable("uvicorn._types", "ASGISendCallable")),
    Hook("uvicorn", "uvicorn._types.Scope", PROTOCOL, importable("uvicorn._types", "Scope")),
    Hook("uvicorn", "httptools_impl.HttpToolsProtocol", PROTOCOL,
         importable("uvicorn.protocols.http.httptools_impl", "HttpToolsProtocol")),
    Hook("uvicorn", "uvicorn.server.ServerState", PROTOCOL,
         importable("uvicorn.server", "ServerState")),
    # ... methods it extends through super()
    Hook("uvicorn", "HttpToolsProtocol.__init__", PROTOCOL,
         signature(HttpToolsProtocol, "__init__",
                   "(self, config, server_state, app_state, _loop=None)")),
    Hook("uvicorn", "HttpToolsProtocol.connection_made", PROTOCOL,
         signature(HttpToolsProtocol, "connection_made", "(self, transport)")),
    Hook("uvicorn", "HttpToolsProtocol.connection_lost", PROTOCOL,
         signature(HttpToolsProtocol, "connection_lost", "(self, exc)")),
    Hook("uvicorn", "HttpToolsProtocol.on_message_begin", PROTOCOL,
         signature(HttpToolsProtocol, "on_message_begin", "(self)")),
    Hook("uvicorn", "HttpToolsProtocol.on_headers_complete", PROTOCOL,
         signature(HttpToolsProtocol, "on_headers_complete", "(self)")),
    Hook("uvicorn", "HttpToolsProtocol.on_message_complete", PROTOCOL,
         signature(HttpToolsProtocol, "on_message_complete", "(self)")),
    Hook("uvicorn", "HttpToolsProtocol.on_response_complete", PROTOCOL,
         signature(HttpToolsProtocol, "on_response_complete", "(self)")),
    # ... private helpers it calls
    Hook("uvicorn", "HttpToolsProtocol._unset_keepalive_if_required", PROTOCOL,
         signature(HttpToolsProtocol, "_unset_keepalive_if_required", "(self)")),
    Hook("uvicorn", "HttpToolsProtocol._should_upgrade", PROTOCOL,
         signature(HttpToolsProtocol, "_should_upgrade", "(self)")),
    Hook("uvicorn", "HttpToolsProtocol.handle_websocket_upgrade", PROTOCOL,
         signature(HttpToolsProtocol, "handle_websocket_upgrade", "(self)")),
    Hook("uvicorn", "HttpToolsProtocol._unsupported_upgrade_warning", PROTOCOL,
         signature(HttpToolsProtocol, "_unsupported_upgrade_warning", "(self)")),
    # ... methods it replaces whole (fingerprints of uvicorn 0.55.0's code)
    Hook("uvicorn", "HttpToolsProtocol.data_received", PROTOCOL,
         unchanged(HttpToolsProtocol, "data_received", "8583b7d501b5b5dd")),
    Hook("uvicorn", "HttpToolsProtocol.on_url", PROTOCOL,
         unchanged(HttpToolsProtocol, "on_url", "381560766601b143")),
    Hook("uvicorn", "HttpToolsProtocol.on_header", PROTOCOL,
         unchanged(HttpToolsProtocol, "on_header", "cb8f2a9bd8fe324d")),
    Hook("uvicorn", "HttpToolsProtocol.send_400_response", PROTOCOL,
         unchanged(HttpToolsProtocol, "send_400_response", "65982634137320d0")),
    Hook("uvicorn", "HttpToolsProtocol.shutdown", PROTOCOL,
         unchanged(HttpToolsProtocol, "shutdown", "7fa717a61d60e60d")),
    # ... attributes it reads and writes, its own and its RequestResponseCycle's
    Hook("uvicorn", "HttpToolsProtocol and RequestResponseCycle attributes", PROTOCOL,
         protocol_and_cycle_attributes),
    Hook("httptools", "HttpParserError.__context__", PROTOCOL, parser_error_context),
    # app/http/direct.py
    Hook("starlette/fastapi", "the route scope keys", DIRECT, route_scope_keys),
    Hook("starlette", "the exception wrapper's choice of handler", DIRECT,
         exception_handler_choice),
    Hook("starlette", "_exception_handler._lookup_exception_handler", DIRECT,
         signature(_exception_handler, "_lookup_exception_handler", "(exc_handlers, exc)")),
    # ... the wrapper it re-implements (starlette 1.10.0's), pinned like a replaced method
    Hook("starlette", "_exception_handler.wrap_app_handling_exceptions", DIRECT,
         unchanged(_exception_handler, "wrap_app_handling_exceptions",
                   "0a591f473a18ed5d")),
    Hook("starlette", "ExceptionMiddleware._exception_handlers and _status_handlers", DIRECT,
         exception_middleware_tables),
]  # fmt: skip


@pytest.mark.parametrize("hook", HOOKS, ids=[h.id for h in HOOKS])
def test_the_private_hook_still_holds(hook: Hook) -> None:
    try:
        hook.check()
    except AssertionError as exc:
        what = str(exc).split("\n")[0]  # the check's message, without pytest's comparison
        pytest.fail(f"{hook.library} hook: {hook.name} {what}; {hook.user} relies on it")


def test_every_override_of_uvicorns_protocol_is_a_listed_hook() -> None:
    # A new override in app/transport/httptools.py must be added to HOOKS (it relies on the base).
    from app.transport.httptools import GuardedHttpToolsProtocol

    named = {h.name.split(".", 1)[1] for h in HOOKS if h.name.startswith("HttpToolsProtocol.")}
    overrides = {
        name
        for name in vars(GuardedHttpToolsProtocol)
        if callable(getattr(HttpToolsProtocol, name, None)) and name not in vars(object)
    }
    overrides.add("__init__")
    assert overrides <= named, f"not in HOOKS: {sorted(overrides - named)}"


def test_a_changed_hook_fails_naming_it(monkeypatch: pytest.MonkeyPatch) -> None:
    # The checks can fail: a signature and a body that are not uvicorn's.
    def on_headers_complete(self: Any, extra: int) -> None:
        pass

    monkeypatch.setattr(HttpToolsProtocol, "on_headers_complete", on_headers_complete)
    monkeypatch.setattr(HttpToolsProtocol, "on_url", on_headers_complete)
    hooks = {h.name: h for h in HOOKS}
    with pytest.raises(
        pytest.fail.Exception,
        match=r"uvicorn hook: HttpToolsProtocol\."
        r"on_headers_complete changed signature.*app/transport/httptools.py relies",
    ):
        test_the_private_hook_still_holds(hooks["HttpToolsProtocol.on_headers_complete"])
    with pytest.raises(pytest.fail.Exception, match=r"HttpToolsProtocol\.on_url changed"):
        test_the_private_hook_still_holds(hooks["HttpToolsProtocol.on_url"])


def test_the_guarded_protocol_parses_headers_as_uvicorn_does() -> None:
    request = b"GET /x HTTP/1.1\r\nhost: t\r\nx-padded: value \t\r\n\r\n"

    async def headers(guarded: bool) -> list[tuple[bytes, bytes]]:
        if guarded:
            protocol: HttpToolsProtocol = Server().connect()[0]
        else:
            config = uvicorn.Config(_ok_app, log_config=None)
            protocol = HttpToolsProtocol(config, ServerState(), {}, asyncio.get_running_loop())
            protocol.connection_made(FakeTransport(protocol))
        protocol.data_received(request)
        got = list(protocol.headers)
        protocol.transport.close()
        await asyncio.sleep(0)
        return got

    assert asyncio.run(headers(True)) == asyncio.run(headers(False))
