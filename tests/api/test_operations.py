"""Request ids, JSON access logs, and draining for shutdown (readiness off, in-flight finishes)."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import re
import signal
from collections.abc import Iterator

import httpx
import pytest
import uvicorn
from fastapi import FastAPI

from app.core.logs import JsonFormatter, request_id_var
from app.core.settings import Settings
from app.http.frontdoor import DRAINING_MESSAGE
from app.http.middleware import Lifecycle
from app.main import create_app
from app.server import DrainingServer
from tests.fakes import FakeBackends
from tests.images import png
from tests.support import ClientFactory, TinyRepo

pytestmark = pytest.mark.anyio

PNG = {"content-type": "image/png"}


@pytest.fixture
def access_lines() -> Iterator[io.StringIO]:
    """What the access logger writes, as the JSON lines a container would print."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("app.access")
    logger.addHandler(handler)
    try:
        yield stream
    finally:
        logger.removeHandler(handler)


async def test_a_clients_request_id_is_echoed_and_logged(
    make_client: ClientFactory, access_lines: io.StringIO
) -> None:
    async with make_client() as client:
        response = await client.post(
            "/classify?top_k=1", content=png(), headers={**PNG, "x-request-id": "abc-123"}
        )
    assert response.status_code == 200
    assert response.headers["x-request-id"] == "abc-123"
    (line,) = [json.loads(text) for text in access_lines.getvalue().splitlines()]
    assert line["request_id"] == "abc-123"
    assert line["message"] == "POST /classify 200"
    assert (line["route"], line["status"], line["model"], line["images"]) == (
        "/classify",
        200,
        "tiny",
        1,
    )
    assert line["query"] == "top_k=1"
    assert line["duration_ms"] > 0


@pytest.mark.parametrize("given", [None, "", "has space", "x" * 129, "semi;colon"])
async def test_a_missing_or_odd_request_id_is_replaced_by_a_fresh_one(
    make_client: ClientFactory, given: str | None
) -> None:
    headers = {} if given is None else {"x-request-id": given}
    async with make_client() as client:
        first = await client.get("/models", headers=headers)
        second = await client.get("/models", headers=headers)
    ids = [first.headers["x-request-id"], second.headers["x-request-id"]]
    assert all(re.fullmatch("[0-9a-f]{32}", i) for i in ids)
    assert ids[0] != ids[1]


def test_json_log_lines_carry_the_current_request_id_and_extra_fields() -> None:
    record = logging.LogRecord("app.x", logging.WARNING, __file__, 1, "hello %s", ("you",), None)
    record.model = "tiny"
    token = request_id_var.set("rid-1")
    try:
        line = json.loads(JsonFormatter().format(record))
    finally:
        request_id_var.reset(token)
    assert line["message"] == "hello you"
    assert (line["level"], line["logger"], line["request_id"], line["model"]) == (
        "WARNING",
        "app.x",
        "rid-1",
        "tiny",
    )
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", line["time"])


async def test_draining_turns_readiness_off_and_serves_on_closing_each_connection(
    tiny_repo: TinyRepo,
) -> None:
    """While load balancers notice (readiness off), requests are served as usual, each answer
    with `Connection: close` so kept-alive connections move to other replicas."""
    fakes = FakeBackends()
    app = create_app(Settings(model_repo=tiny_repo.root), backend_factory=fakes)
    lifecycle: Lifecycle = app.state.lifecycle
    transport = httpx.ASGITransport(app=app)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=transport, base_url="http://test") as client,
    ):
        backend = fakes.made[("tiny", 2)]
        backend.gate.clear()
        running = asyncio.create_task(client.post("/classify", content=png(), headers=PNG))
        await asyncio.to_thread(backend.started.wait, 5)
        queued = asyncio.create_task(client.post("/classify", content=png(seed=1), headers=PNG))
        await asyncio.sleep(0.1)  # admitted and waiting behind the running batch

        lifecycle.begin_drain()
        ready = await client.get("/readyz")
        assert (ready.status_code, ready.json()) == (503, {"detail": DRAINING_MESSAGE})
        assert ready.headers["retry-after"] == "1"
        assert ready.headers["connection"] == "close"
        new = asyncio.create_task(client.post("/classify", content=png(seed=2), headers=PNG))
        healthz = await client.get("/healthz")
        assert (healthz.status_code, healthz.headers["connection"]) == (200, "close")
        metrics = (await client.get("/metrics")).text
        assert "vit_serve_ready 0.0" in metrics
        assert 'reason="shutting_down"' not in metrics  # nothing refused but readiness

        backend.gate.set()
        for answer in (await running, await queued, await new):
            assert (answer.status_code, answer.headers["connection"]) == (200, "close")


def _server(app: FastAPI, delay_s: float) -> DrainingServer:
    config = uvicorn.Config(app, log_config=None)
    return DrainingServer(config, app.state.lifecycle, delay_s)


async def test_sigterm_drains_for_the_delay_before_the_server_stops(tiny_repo: TinyRepo) -> None:
    app = create_app(Settings(model_repo=tiny_repo.root))
    server = _server(app, delay_s=0.2)
    server.handle_exit(signal.SIGTERM, None)
    assert app.state.lifecycle.draining
    assert not await server.on_tick(1)  # still listening and serving
    await asyncio.sleep(0.25)
    assert await server.on_tick(2)


@pytest.mark.parametrize("second", [signal.SIGTERM, signal.SIGINT])
async def test_a_second_signal_or_ctrl_c_stops_without_the_delay(
    tiny_repo: TinyRepo, second: signal.Signals
) -> None:
    app = create_app(Settings(model_repo=tiny_repo.root))
    server = _server(app, delay_s=60)
    if second == signal.SIGTERM:
        server.handle_exit(signal.SIGTERM, None)
        assert not server.should_exit
    server.handle_exit(second, None)
    assert server.should_exit
    assert app.state.lifecycle.draining
