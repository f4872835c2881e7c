"""bench/harness.py: the Prometheus parser, the results writer, and one short run of the real
server under its closed-loop client."""

from __future__ import annotations

import asyncio
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from bench.harness import (
    DEMO_MODEL,
    DEMO_REPO,
    NOT_WRITTEN,
    ROOT,
    Histogram,
    Target,
    batch_histogram,
    closed_loop,
    load_images,
    parse_metrics,
    service,
    thread_cpu,
    thread_cpu_between,
    thread_groups,
    total,
    write_results,
)

METRICS = """\
# HELP vit_serve_batch_size images per batch
# TYPE vit_serve_batch_size histogram
vit_serve_batch_size_bucket{le="1.0",model="a"} 2.0
vit_serve_batch_size_bucket{le="2.0",model="a"} 3.0
vit_serve_batch_size_bucket{le="4.0",model="a"} 7.0
vit_serve_batch_size_bucket{le="+Inf",model="a"} 7.0
vit_serve_batch_size_bucket{model="b",le="1.0"} 1.0
vit_serve_batch_size_bucket{model="b",le="2.0"} 1.0
vit_serve_batch_size_bucket{model="b",le="4.0"} 1.0
vit_serve_batch_size_bucket{model="b",le="+Inf"} 1.0
vit_serve_batch_size_sum{model="a"} 19.0
vit_serve_batch_size_sum{model="b"} 1.0
vit_serve_batch_size_count{model="a"} 7.0
vit_serve_batch_size_count{model="b"} 1.0

vit_serve_queue_depth 3.0
vit_serve_requests_total{route="/classify",detail="say \\"hi\\"\\n"} 1.5e+03 1712345678000
"""


def test_prometheus_samples_with_labels_escapes_and_timestamps() -> None:
    samples = parse_metrics(METRICS)
    assert len(samples) == 14
    assert total(samples, "vit_serve_queue_depth") == 3.0
    assert total(samples, "vit_serve_missing") is None
    (requests,) = [s for s in samples if s.name == "vit_serve_requests_total"]
    assert requests.labels == {"route": "/classify", "detail": 'say "hi"\n'}
    assert requests.value == 1500.0
    assert total(samples, "vit_serve_batch_size_count", model="b") == 1.0


def test_prometheus_histogram_summed_over_labels_and_between_scrapes() -> None:
    samples = parse_metrics(METRICS)
    both = Histogram.of(samples, "vit_serve_batch_size")
    assert both.buckets == {"1.0": 3.0, "2.0": 4.0, "4.0": 8.0, "+Inf": 8.0}
    assert (both.sum, both.count) == (20.0, 8.0)
    assert both.ranges() == {"1": 3, "2": 1, "3-4": 4}
    assert both.at_most(0.25) == 1.0
    assert both.at_most(0.5) == 2.0  # 4 of 8 at most 2
    assert both.at_most(0.6) == 4.0

    a = Histogram.of(samples, "vit_serve_batch_size", model="a")
    since = both.since(a)
    assert since.buckets == {"1.0": 1.0, "2.0": 1.0, "4.0": 1.0, "+Inf": 1.0}
    assert (since.sum, since.count) == (1.0, 1.0)
    over = Histogram({"1.0": 0.0, "+Inf": 2.0}, 10.0, 2.0)
    assert over.at_most(0.5) is None  # above the largest finite bucket


def test_prometheus_rejects_what_is_not_a_sample() -> None:
    with pytest.raises(ValueError, match="not a Prometheus sample"):
        parse_metrics("vit_serve_queue_depth\n")


@dataclass
class Inner:
    grid: tuple[int, int]
    where: Path


@dataclass
class Report:
    name: str
    inner: list[Inner]
    by_status: dict[str, Inner]
    nothing: float | None = None
    kept_in_memory: list[float] = field(default_factory=list, metadata=NOT_WRITTEN)


def test_cpu_by_thread_group_from_the_threads_names() -> None:
    threads = {
        100: ("python", 3.0),  # the main thread: the event loop, whatever its name
        101: ("vit-preprocess", 2.0),
        102: ("vit-preprocess", 1.5),
        103: ("vit-infer-0", 1.0),
        104: ("vit-infer-1", 0.25),
        105: ("vit-ort-session", 4.0),  # ONNX Runtime's threads, named after their maker
        106: ("python", 0.5),
        107: ("grpc_global_tim", 0.125),
    }
    assert thread_groups(threads, main=100) == {
        "event_loop": 3.0,
        "preprocessing": 3.5,
        "inference": 5.25,
        "other": 0.625,
    }
    assert thread_groups({}, main=1) == dict.fromkeys(
        ("event_loop", "preprocessing", "inference", "other"), 0.0
    )


def test_cpu_between_two_readings_of_the_threads() -> None:
    before = {1: ("python", 2.0), 2: ("vit-preprocess", 1.0), 3: ("gone", 9.0)}
    after = {1: ("python", 2.5), 2: ("vit-preprocess", 1.25), 4: ("vit-infer-0", 0.5)}
    assert thread_cpu_between(before, after) == {
        1: ("python", 0.5),
        2: ("vit-preprocess", 0.25),
        4: ("vit-infer-0", 0.5),  # new since: all of it
    }


def test_this_process_threads_with_their_names() -> None:
    found = thread_cpu(os.getpid())
    assert os.getpid() in found
    assert all(isinstance(name, str) and seconds >= 0 for name, seconds in found.values())


def test_results_writer_dataclasses_to_json_under_the_machine_header(tmp_path: Path) -> None:
    report = Report(
        "x",
        [Inner((8, 8), ROOT / "model_repo")],
        {"200": Inner((1, 2), tmp_path)},
        kept_in_memory=[1.0, 2.0],
    )
    out = tmp_path / "deeper" / "r.json"
    write_results(out, report, machine_notes={"load_average": [0.5, 0.4, 0.3]})
    written = json.loads(out.read_text())
    assert list(written)[:2] == ["date", "machine"]
    assert {"cpus", "python", "onnxruntime"} <= set(written["machine"])
    assert written["machine"]["load_average"] == [0.5, 0.4, 0.3]
    assert written["name"] == "x"
    assert written["inner"] == [{"grid": [8, 8], "where": "model_repo"}]
    assert written["by_status"] == {"200": {"grid": [1, 2], "where": str(tmp_path)}}
    assert written["nothing"] is None
    assert "kept_in_memory" not in written


def test_results_writer_takes_a_dataclass_only(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="dataclass"):
        write_results(tmp_path / "r.json", [1, 2])


@pytest.mark.integration
@pytest.mark.slow
def test_the_service_under_the_closed_loop_client() -> None:
    images = load_images(limit=4)

    async def drive(target: Target) -> None:
        result = await closed_loop(target, images.bodies, 2, 6, 60, cpu=True)
        assert (result.requests, result.ok, result.errors, result.lost) == (6, 6, 0, 0)
        assert result.statuses == {"200": 6}
        assert len(result.latencies_ms) == 6
        assert result.img_per_s > 0 and not math.isnan(result.latency_ms_p99)
        assert result.server_cpu_ms_per_image is not None
        assert result.server_cpu_ms_per_image_by_group is not None
        assert list(result.server_cpu_ms_per_image_by_group) == [
            "event_loop",
            "preprocessing",
            "inference",
            "other",
        ]
        # The service names its threads; ONNX Runtime's inherit the session maker's name.
        assert target.pid is not None
        names = {name for name, _ in thread_cpu(target.pid).values()}
        assert {"vit-preprocess", "vit-infer-0", "vit-ort-session"} <= names
        batches = await batch_histogram(target.port)
        assert batches.count >= 1 and batches.sum >= 6  # and the warm-up's

    with service(DEMO_REPO, DEMO_MODEL) as server:
        assert server.alive()
        asyncio.run(drive(server.target()))
    assert not server.alive()
