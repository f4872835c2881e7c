"""Debian's prometheus scraping two replicas: every panel of the Grafana dashboard has data."""

from __future__ import annotations

import asyncio
import json
import math
from pathlib import Path
from typing import Any

import pytest

from tests.integration.stack import (
    DASHBOARD,
    SERVICE_JOB,
    nginx,
    png_bytes,
    prometheus,
    replicas,
    run_load,
    wait_until,
)
from tests.support import TinyRepo

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REQUESTS = 300
BAD_EVERY = 25  # one request in 25 is not an image: the errors panel needs errors
# What Grafana substitutes into a query; a minute covers the whole test.
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$__interval": "1s", "$__range": "5m"}


def panel_queries() -> list[tuple[str, str]]:
    """(panel title, PromQL) for every query of every panel, variables substituted."""
    dashboard: dict[str, Any] = json.loads(DASHBOARD.read_text())
    queries = []
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            expr: str = target["expr"]
            for variable, value in GRAFANA_VARIABLES.items():
                expr = expr.replace(variable, value)
            assert "$" not in expr, f"unsubstituted variable in {panel['title']}: {expr}"
            queries.append((panel["title"], expr))
    return queries


def has_data(result: list[dict[str, Any]]) -> bool:
    return any(math.isfinite(float(series["value"][1])) for series in result)


def body(i: int) -> tuple[bytes, str]:
    if i % BAD_EVERY == 0:
        return b"this is not an image", "image/png"
    return png_bytes(64, i % 8), "image/png"


def test_every_dashboard_panel_query_returns_data_after_a_bounded_load(
    tiny_repo: TinyRepo, tmp_path: Path
) -> None:
    queries = panel_queries()
    assert len(queries) >= 10
    with (
        replicas(tiny_repo.root, tmp_path, 2) as pair,
        nginx([r.address for r in pair], tmp_path / "nginx") as lb,
        prometheus([r.address for r in pair], tmp_path / "prometheus") as prom,
    ):
        up = f'up{{job="{SERVICE_JOB}"}} == 1'
        wait_until(lambda: len(prom.query(up)) == 2, 30, "both replicas scraped")

        # In two halves with scrapes between: a series is born at its first observation, and
        # rate() over samples that all follow the whole load would be 0 (quantiles NaN).
        half = REQUESTS // 2
        first = asyncio.run(run_load(lb.url, half, concurrency=8, make_body=body))
        done = prom.scrapes_done(SERVICE_JOB)
        wait_until(lambda: prom.scrapes_done(SERVICE_JOB) >= done + 2, 30, "scrapes between")
        second = asyncio.run(
            run_load(lb.url, half, concurrency=8, make_body=lambda i: body(half + i))
        )
        bad = len(range(0, REQUESTS, BAD_EVERY))
        assert first.statuses + second.statuses == {200: REQUESTS - bad, 400: bad}

        # Scrapes that began after the load ended see all of it.
        done = prom.scrapes_done(SERVICE_JOB)
        wait_until(lambda: prom.scrapes_done(SERVICE_JOB) >= done + 2, 30, "two more scrapes")

        empty = [(title, expr) for title, expr in queries if not has_data(prom.query(expr))]
        assert not empty, f"panel queries without data: {empty}"
        # Per-replica panels see both replicas: round robin sent each of them work.
        per_replica = prom.query(
            "histogram_quantile(0.99, sum by (instance, le) "
            '(rate(vit_serve_request_duration_seconds_bucket{route="/classify"}[1m])))'
        )
        assert {s["metric"]["instance"] for s in per_replica} == {r.address for r in pair}
