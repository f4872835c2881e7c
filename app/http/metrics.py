"""Prometheus metrics: one registry per app, fed by small hooks on the request path.

With several processes (app/server.py's supervisor: front ends and an engine), every process
writes its counters and histograms to files in one folder (prometheus_client's multiprocess
mode), and any front end's GET /metrics adds them all up: one /metrics per replica. What the
replica is now (ready, queue depth, the models served) is read from the engine when scraped,
the same from every front end.

Latencies are histograms (never summaries) so quantiles aggregate across replicas in PromQL
(`histogram_quantile(0.99, sum by (le) (rate(..._bucket[5m])))`). Request-scoped facts (which
model a request resolved to, how long its preprocessing took) arrive in each request's record
(app/core/records.py) when the middleware reports it; batch facts (queue wait, inference time,
batch size) through the batcher's observer hook, which app/main.py connects.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

from app.core.records import RequestRecord

if TYPE_CHECKING:
    from app.engine import BatchKey, EngineClient

NAMESPACE = "vit_serve"
# The folder of a replica's metrics files, set for each of its processes before
# prometheus_client is imported (prometheus_client reads it then).
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

# Seconds, ~1.5x apart from 1 ms to 10 s: p99 interpolated inside a bucket is off by at most
# one step, and a CPU demo model's few-millisecond batches still land in distinct buckets.
LATENCY_BUCKETS_S: tuple[float, ...] = (
    0.001, 0.0015, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075,
    0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 7.5, 10.0,
)  # fmt: skip
# Stages (queue wait, preprocessing, one batch) are often sub-millisecond on an idle server.
STAGE_BUCKETS_S: tuple[float, ...] = (0.0001, 0.00025, 0.0005, *LATENCY_BUCKETS_S)
BATCH_SIZE_BUCKETS: tuple[float, ...] = (1, 2, 4, 8, 16, 32, 64, 128, 256)
BATCH_TOKEN_BUCKETS: tuple[float, ...] = tuple(float(2**i) for i in range(4, 18))  # 16..131072

# Probes and scrapes are not traffic: they stay out of the request metrics and the in-flight
# gauge (a scrape would always count itself), and out of the access log at INFO.
QUIET_PATHS = frozenset({"/metrics", "/healthz", "/readyz"})
UNMATCHED_ROUTE = "unmatched"  # every path no route serves: bounded label values

# The front door a request came through (the `protocol` label): the service's own HTTP API
# (/classify, /models, ...), the Open Inference Protocol over HTTP (/v2/...) or over gRPC.
HTTP = "http"
V2_HTTP = "v2-http"
V2_GRPC = "v2-grpc"


def protocol_of(route: str) -> str:
    """The protocol of an HTTP route (gRPC requests name theirs)."""
    return V2_HTTP if route == "/v2" or route.startswith("/v2/") else HTTP


_CAMEL = re.compile(r"(?<!^)(?=[A-Z])")


def error_reason(exc: BaseException) -> str:
    """A short, bounded label for an error: `OverloadedError` -> "overloaded"."""
    status = getattr(exc, "status_code", None)  # Starlette's HTTPException (404, 405, ...)
    if isinstance(status, int):
        return f"http_{status}"
    name = type(exc).__name__
    for suffix in ("Error", "Exception"):
        if name.endswith(suffix) and name != suffix:
            name = name[: -len(suffix)]
    return _CAMEL.sub("_", name).lower()


class Metrics:
    """Every metric of one app, on its own registry (tests build many apps in one process)."""

    def __init__(
        self, registry: CollectorRegistry | None = None, multiprocess_dir: str | None = None
    ) -> None:
        """`multiprocess_dir`: this process is one of several of a replica, whose metrics
        files are in that folder (PROMETHEUS_MULTIPROC_DIR, set before prometheus_client was
        first imported)."""
        # No `_created` series beside every counter and histogram: twice the series, and
        # Prometheus reads resets from the counters themselves. (A process-wide switch.)
        disable_created_metrics()  # type: ignore[no-untyped-call]
        self.registry = registry or CollectorRegistry(auto_describe=True)
        self.multiprocess_dir = multiprocess_dir
        self._children: dict[tuple[object, ...], Any] = {}  # see `_labelled`
        r = self.registry
        ns = NAMESPACE
        self.replica = ReplicaState()
        if multiprocess_dir is None:
            ProcessCollector(registry=r)  # one process's: meaningless summed over several
            r.register(self.replica)
        # `protocol`: http, v2-http or v2-grpc. gRPC requests are counted under their method
        # (route "/inference.GRPCInferenceService/ModelInfer") with the HTTP status the same
        # answer gets over REST, so one query covers every front door.
        self.request_duration = Histogram(
            "request_duration_seconds",
            "request duration, from the first byte in to the last byte out",
            ["route", "status", "model", "protocol"],
            namespace=ns,
            buckets=LATENCY_BUCKETS_S,
            registry=r,
        )
        self.requests = Counter(
            "requests",
            "requests answered",
            ["route", "status", "model", "protocol"],
            namespace=ns,
            registry=r,
        )
        self.images = Counter(
            "images",
            "images answered with a classification",
            ["model", "protocol"],
            namespace=ns,
            registry=r,
        )
        self.errors = Counter(
            "errors",
            "requests answered with an error status, by reason (the error's kind)",
            ["route", "status", "reason", "protocol"],
            namespace=ns,
            registry=r,
        )
        # Each image once, by the path that decoded it and why (app/pipeline/routing.py's
        # REASONS): path "gpu" in the engine's device decoder, "cpu" in a front end's threads.
        self.decode_images = Counter(
            "decode_images",
            "images decoded, by path (gpu: on the device in the engine; cpu: Pillow in a front "
            "end) and reason (why that path; cpu/refused: the device decoder refused it)",
            ["model", "path", "reason"],
            namespace=ns,
            registry=r,
        )
        self.in_flight = Gauge(
            "requests_in_flight",
            "HTTP requests being served (probes excluded)",
            namespace=ns,
            registry=r,
            multiprocess_mode="livesum",
        )
        self.queue_wait = Histogram(
            "queue_wait_seconds",
            "time an image waited in the batcher's queue before its batch started",
            ["model"],
            namespace=ns,
            buckets=STAGE_BUCKETS_S,
            registry=r,
        )
        self.preprocess = Histogram(
            "preprocess_seconds",
            "a request's decode, resize and patchify time, all its images",
            ["model"],
            namespace=ns,
            buckets=STAGE_BUCKETS_S,
            registry=r,
        )
        self.inference = Histogram(
            "inference_seconds",
            "one batch's run on the runtime (graph: plain or rollout)",
            ["model", "graph"],
            namespace=ns,
            buckets=STAGE_BUCKETS_S,
            registry=r,
        )
        self.batch_size = Histogram(
            "batch_size",
            "images per batch",
            ["model"],
            namespace=ns,
            buckets=BATCH_SIZE_BUCKETS,
            registry=r,
        )
        self.batch_tokens = Histogram(
            "batch_tokens",
            "patches per batch, summed over its images",
            ["model"],
            namespace=ns,
            buckets=BATCH_TOKEN_BUCKETS,
            registry=r,
        )

    # --- hooks -----------------------------------------------------------------------------

    def watch(self, engine: EngineClient, ready: Callable[[], bool]) -> None:
        """The replica's gauges, read from the engine at scrape time; `ready`: the front
        doors' readiness answer."""
        self.replica.engine = engine
        self.replica.ready = ready

    async def refresh(self) -> None:
        """Read what the engine alone knows now (its queue), before an exposition."""
        engine = self.replica.engine
        if engine is not None:
            try:
                self.replica.queue = await engine.stats()
            except Exception:  # an engine away: no queue to show
                self.replica.queue = None

    def _labelled(self, metric: Histogram | Counter, *values: str) -> Any:
        """`metric.labels(*values)`, kept: prometheus_client checks and locks on every call, and
        these run on the event loop for every request and batch. The label values are bounded
        (routes, statuses, served models), and these metrics never drop a child."""
        key = (id(metric), *values)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*values)
        return child

    def batch_done(self, key: BatchKey, images: int, run_s: float) -> None:
        """The batcher ran one batch of `key` (the batcher's observer protocol)."""
        self._labelled(self.inference, key.model, key.graph).observe(run_s)
        self._labelled(self.batch_size, key.model).observe(images)
        self._labelled(self.batch_tokens, key.model).observe(images * key.tokens)

    def request_done(
        self,
        route: str,
        status: int,
        seconds: float,
        record: RequestRecord,
        protocol: str | None = None,
    ) -> None:
        """One request answered (called by the request middleware, and by the gRPC front door
        with its `protocol`)."""
        code = str(status)
        protocol = protocol or protocol_of(route)
        model = record.model
        self._labelled(self.request_duration, route, code, model, protocol).observe(seconds)
        self._labelled(self.requests, route, code, model, protocol).inc()
        if record.preprocess_s is not None:
            self._labelled(self.preprocess, model).observe(record.preprocess_s)
        if record.queue_waits_s:
            queue_wait = self._labelled(self.queue_wait, model)
            for wait in record.queue_waits_s:
                queue_wait.observe(wait)
        for (path, reason), images in record.decodes.items():
            self._labelled(self.decode_images, model, path, reason).inc(images)
        if status < 400:
            if record.images:
                self._labelled(self.images, model, protocol).inc(record.images)
        else:
            reason = record.error_reason or f"http_{status}"
            self._labelled(self.errors, route, code, reason, protocol).inc()

    def decode_counts(self) -> dict[str, dict[str, int]]:
        """Images decoded so far by model, then "path/reason" (every process's, summed)."""
        if self.multiprocess_dir is None:
            families = list(self.decode_images.collect())
        else:
            summed = CollectorRegistry()
            MultiProcessCollector(summed, path=self.multiprocess_dir)  # type: ignore[no-untyped-call]
            families = [f for f in summed.collect() if f.name == f"{NAMESPACE}_decode_images"]
        counts: dict[str, dict[str, int]] = {}
        for family in families:
            for sample in family.samples:
                if not sample.name.endswith("_total"):
                    continue
                labels = sample.labels
                per_model = counts.setdefault(labels["model"], {})
                key = f"{labels['path']}/{labels['reason']}"
                per_model[key] = per_model.get(key, 0) + int(sample.value)
        return counts

    def exposition(self) -> bytes:
        if self.multiprocess_dir is None:
            return generate_latest(self.registry)
        # Every process's counters and histograms, summed; then the replica's state.
        summed = CollectorRegistry()
        MultiProcessCollector(summed, path=self.multiprocess_dir)  # type: ignore[no-untyped-call]
        state = CollectorRegistry()
        state.register(self.replica)
        return generate_latest(summed) + generate_latest(state)


class ReplicaState(Collector):
    """The gauges of what the replica is now, made at each scrape from the engine's answers."""

    def __init__(self) -> None:
        self.engine: EngineClient | None = None
        self.ready: Callable[[], bool] = lambda: False
        self.queue: tuple[int, int] | None = None  # (queued, capacity), from `refresh`

    def collect(self) -> Iterator[Metric]:
        ns = NAMESPACE
        queued, capacity = self.queue or (0, 0)
        yield GaugeMetricFamily(
            f"{ns}_queue_depth", "images admitted and waiting for a batch", value=queued
        )
        yield GaugeMetricFamily(
            f"{ns}_queue_capacity", "images the queue admits before answering 503", value=capacity
        )
        yield GaugeMetricFamily(
            f"{ns}_ready",
            "1 while /readyz answers 200 (loaded, not draining)",
            value=float(self.ready()),
        )
        described = None if self.engine is None else self.engine.describe()
        yield GaugeMetricFamily(
            f"{ns}_models_not_ready",
            "models and model versions in the repository that cannot serve (see GET /models)",
            value=0 if described is None else len(described.not_ready),
        )
        info = GaugeMetricFamily(
            f"{ns}_model_info",
            "1 for each served model version, with the provider that runs its graph (from ONNX "
            "Runtime's node assignment), the provider wanted for it (they differ after a "
            "fallback), native grid and graph form (optimization: none, fused, fp16, int8)",
            labels=["model", "version", "provider", "wanted", "grid", "optimization"],
        )
        for model in () if described is None else described.models:
            for version in model.versions:
                grid = version.spec.architecture.grid
                placement = version.placement
                info.add_metric(
                    [
                        model.name,
                        str(version.version),
                        placement.provider,
                        placement.wanted or placement.provider,
                        f"{grid[0]}x{grid[1]}",
                        version.form,
                    ],
                    1,
                )
        yield info
