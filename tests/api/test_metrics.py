"""GET /metrics: every family the dashboard reads, labelled by route, status, model and reason."""

from __future__ import annotations

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from app.http.metrics import LATENCY_BUCKETS_S, error_reason
from app.models.repository import UnknownModelError
from tests.images import png
from tests.support import ClientFactory

pytestmark = pytest.mark.anyio


async def scrape(client: httpx.AsyncClient) -> dict[str, list[Sample]]:
    """Samples by family name (as the parser names families: counters without `_total`)."""
    response = await client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    return {f.name: f.samples for f in text_string_to_metric_families(response.text)}


def value(samples: list[Sample], name: str, **labels: str) -> float:
    """The one sample called `name` whose labels include `labels`."""
    found = [s.value for s in samples if s.name == name and labels.items() <= s.labels.items()]
    assert len(found) == 1, (name, labels, [s for s in samples if s.name == name])
    return found[0]


async def test_a_classification_is_seen_in_every_stage_metric(make_client: ClientFactory) -> None:
    async with make_client() as client:
        image = png(64, 64)
        response = await client.post(
            "/classify", content=image, headers={"content-type": "image/png"}
        )
        assert response.status_code == 200
        families = await scrape(client)

    duration = families["vit_serve_request_duration_seconds"]
    count = "vit_serve_request_duration_seconds_count"
    assert value(duration, count, route="/classify", status="200", model="tiny") == 1
    requests = families["vit_serve_requests"]
    assert value(requests, "vit_serve_requests_total", route="/classify", model="tiny") == 1
    assert value(families["vit_serve_images"], "vit_serve_images_total", model="tiny") == 1
    for stage in ("queue_wait", "preprocess", "batch_size", "batch_tokens"):
        samples = families[f"vit_serve_{stage}" + ("" if "batch" in stage else "_seconds")]
        name = samples[0].name.rsplit("_", 1)[0] + "_count"
        assert value(samples, name, model="tiny") == 1, stage
    inference = families["vit_serve_inference_seconds"]
    assert value(inference, "vit_serve_inference_seconds_count", model="tiny", graph="plain") == 1
    # One image of the native 8x8 grid: a batch of 1 image and 64 tokens.
    sizes = families["vit_serve_batch_tokens"]
    assert value(sizes, "vit_serve_batch_tokens_sum", model="tiny") == 64
    assert value(families["vit_serve_queue_depth"], "vit_serve_queue_depth") == 0
    assert value(families["vit_serve_queue_capacity"], "vit_serve_queue_capacity") == 256
    assert value(families["vit_serve_ready"], "vit_serve_ready") == 1
    assert value(families["vit_serve_requests_in_flight"], "vit_serve_requests_in_flight") == 0
    info = families["vit_serve_model_info"]
    for version in ("1", "2"):
        labels = {"model": "tiny", "version": version, "grid": "8x8", "optimization": "fused"}
        assert value(info, "vit_serve_model_info", provider="CPUExecutionProvider", **labels) == 1
    # The scrape and the probes are not traffic.
    assert not [s for s in requests if s.labels["route"] in ("/metrics", "/healthz", "/readyz")]


async def test_request_latency_buckets_resolve_milliseconds(make_client: ClientFactory) -> None:
    async with make_client() as client:
        await client.get("/models")
        families = await scrape(client)
    bounds = [
        float(s.labels["le"])
        for s in families["vit_serve_request_duration_seconds"]
        if s.name.endswith("_bucket") and s.labels["route"] == "/models"
    ]
    assert bounds[:3] == [0.001, 0.0015, 0.002]
    assert bounds[-2:] == [10.0, float("inf")]
    assert tuple(bounds[:-1]) == LATENCY_BUCKETS_S


async def test_errors_are_counted_by_reason_route_and_status(make_client: ClientFactory) -> None:
    async with make_client() as client:
        headers = {"content-type": "image/png"}
        assert (
            await client.post("/classify", content=b"not a png", headers=headers)
        ).status_code == 400
        unknown = await client.post("/classify?model=nope", content=png(), headers=headers)
        assert unknown.status_code == 404
        assert (
            await client.post("/classify?top_k=0", content=png(), headers=headers)
        ).status_code == 422
        assert (await client.get("/no/such/route")).status_code == 404
        families = await scrape(client)
    errors = families["vit_serve_errors"]
    total = "vit_serve_errors_total"
    assert value(errors, total, route="/classify", status="400", reason="image_decode") == 1
    assert value(errors, total, route="/classify", status="404", reason="unknown_model") == 1
    assert value(errors, total, route="/classify", status="422", reason="request_validation") == 1
    # Unknown paths share one label value: a scanner cannot grow the series without bound.
    assert value(errors, total, route="unmatched", status="404", reason="http_404") == 1
    # A model name from the query string is never a label; a resolved one is.
    models = {s.labels["model"] for s in families["vit_serve_requests"]}
    assert models == {"", "tiny"}


def test_error_reasons_are_short_snake_case_kinds() -> None:
    assert error_reason(UnknownModelError("x")) == "unknown_model"
    assert error_reason(ValueError("x")) == "value"
    assert error_reason(Exception("x")) == "exception"


async def test_each_app_has_its_own_registry(make_client: ClientFactory) -> None:
    async with make_client() as first, make_client() as second:
        await first.get("/models")
        one = await scrape(first)
        other = await scrape(second)
    requests = "vit_serve_requests_total"
    assert value(one["vit_serve_requests"], requests, route="/models") == 1
    assert not [s for s in other["vit_serve_requests"] if s.name == requests]
