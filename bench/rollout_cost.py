"""What an attention rollout map costs: the rollout graph against the plain one, side by side.

    .venv/bin/python -m bench.rollout_cost
    .venv/bin/python -m bench.rollout_cost --repo /tmp/repo --model tiny --requests 100

Raw: model.onnx and model.rollout.onnx at batch 1 and 8, in alternating runs. Service at
concurrency 1 and 8 in rotating rounds: plain requests, rollout=true, and plain requests to a
server over a copy without rollout graphs (the baseline). Writes bench/results/rollout_cost.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from app.models.spec import (
    GRAPH_FILENAME,
    ROLLOUT_GRAPH_FILENAME,
    SPEC_FILENAME,
    GraphFiles,
    ModelSpec,
)
from app.runtime.backends import open_session
from app.runtime.placement import candidate_providers
from bench.harness import (
    DEMO_MODEL,
    DEMO_REPO,
    RESULTS,
    LoadResult,
    Reply,
    batch_times,
    find_model,
    load_images,
    native_patches,
    run_levels,
    service,
    write_results,
)

TARGET_RATIO = 1.25  # the budget: rollout <= 25% over plain
PLAIN, ROLLOUT, BASELINE = "with-rollout plain", "with-rollout rollout", "baseline plain"


@dataclass
class RawPair:
    batch: int
    plain_img_per_s: float
    rollout_img_per_s: float
    plain_ms_per_batch_p50: float
    rollout_ms_per_batch_p50: float
    rollout_cost_ratio: float  # rollout time / plain time


@dataclass
class ServiceRatio:
    concurrency: int
    rollout_vs_plain_latency_p50: float
    rollout_vs_plain_throughput: float  # plain img/s / rollout img/s: the cost per image
    plain_vs_baseline_latency_p50: float
    plain_vs_baseline_throughput: float


@dataclass
class RolloutReport:
    model: str
    version: int
    grid: tuple[int, int]
    provider: str
    images: str
    target_rollout_vs_plain: float
    raw: list[RawPair]
    service: list[LoadResult]
    service_ratios: list[ServiceRatio]


def raw_pair(
    plain: ort.InferenceSession,
    rollout: ort.InferenceSession,
    spec: ModelSpec,
    batch: int,
    seconds: float,
) -> RawPair:
    x = native_patches(spec, batch)
    assert spec.rollout is not None
    patches, fusion, ratio = (t.name for t in spec.rollout.inputs)
    plain_feeds = {spec.input_name: x}
    # Mean fusion, nothing discarded: the graph runs every node whatever the values.
    rollout_feeds = {patches: x, fusion: np.array(0, np.int64), ratio: np.array(0.0, np.float32)}
    batch_times(plain, plain_feeds, 0.0, min_runs=3)
    batch_times(rollout, rollout_feeds, 0.0, min_runs=3)
    # Alternate short runs until the time is spent: both graphs see the same machine state.
    plain_times: list[float] = []
    rollout_times: list[float] = []
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline or len(plain_times) < 10:
        plain_times += batch_times(plain, plain_feeds, 0.0)
        rollout_times += batch_times(rollout, rollout_feeds, 0.0)
    p, r = statistics.median(plain_times), statistics.median(rollout_times)
    return RawPair(batch, batch / p, batch / r, p * 1e3, r * 1e3, r / p)


def copy_without_rollout(repo: Path, model: str, into: Path) -> Path:
    """The model as an export from before rollout graphs: model.onnx only, nothing in model.json."""
    spec = find_model(repo, model).spec
    versions = {v: GraphFiles(model=files.model) for v, files in spec.versions.items()}
    for version in versions:
        graph = repo / model / str(version) / GRAPH_FILENAME
        if graph.is_file():
            (into / model / str(version)).mkdir(parents=True)
            shutil.copyfile(graph, into / model / str(version) / GRAPH_FILENAME)
    spec.model_copy(update={"rollout": None, "versions": versions}).dump(
        into / model / SPEC_FILENAME
    )
    return into


def answered(with_rollout: bool) -> Callable[[Reply], bool]:
    """A 200 whose result has a rollout map exactly when one was asked for (one answered
    without its map would flatter the figures)."""

    def accept(reply: Reply) -> bool:
        if reply.status != 200:
            return False
        return ("rollout" in json.loads(reply.body)["results"][0]) == with_rollout

    return accept


def ratios(results: list[LoadResult]) -> list[ServiceRatio]:
    out = []
    for c in sorted({r.concurrency for r in results}):
        by = {r.server: r for r in results if r.concurrency == c}
        plain, rollout, base = by[PLAIN], by[ROLLOUT], by[BASELINE]
        out.append(
            ServiceRatio(
                concurrency=c,
                rollout_vs_plain_latency_p50=rollout.latency_ms_p50 / plain.latency_ms_p50,
                rollout_vs_plain_throughput=plain.img_per_s / rollout.img_per_s,
                plain_vs_baseline_latency_p50=plain.latency_ms_p50 / base.latency_ms_p50,
                plain_vs_baseline_throughput=base.img_per_s / plain.img_per_s,
            )
        )
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--repo", type=Path, default=DEMO_REPO)
    p.add_argument("--model", default=DEMO_MODEL)
    p.add_argument("--requests", type=int, default=200, help="per concurrency, mode and round")
    p.add_argument("--rounds", type=int, default=3, help="rotating rounds of the service runs")
    p.add_argument("--raw-seconds", type=float, default=3.0, help="per batch size")
    p.add_argument("--out", type=Path, default=RESULTS / "rollout_cost.json")
    a = p.parse_args(argv)

    model = find_model(a.repo, a.model)
    if not (model.folder / ROLLOUT_GRAPH_FILENAME).is_file():
        sys.exit(f"{model.folder} has no {ROLLOUT_GRAPH_FILENAME}: re-export the model")
    providers = candidate_providers(None)
    plain_session, provider = open_session(model.graph, providers)
    rollout_session, _ = open_session(model.folder / ROLLOUT_GRAPH_FILENAME, providers)
    grid = model.spec.architecture.grid
    print(f"model {a.model} version {model.version}, grid {grid}, on {provider}")
    raw = [raw_pair(plain_session, rollout_session, model.spec, b, a.raw_seconds) for b in (1, 8)]
    del plain_session, rollout_session
    for r in raw:
        print(
            f"raw batch {r.batch}: plain {r.plain_img_per_s:8.1f} img/s "
            f"({r.plain_ms_per_batch_p50:.2f} ms)  rollout {r.rollout_img_per_s:8.1f} img/s "
            f"({r.rollout_ms_per_batch_p50:.2f} ms)  rollout/plain {r.rollout_cost_ratio:.3f}"
        )

    images = load_images()
    print(f"service with {images.source}, {a.rounds} rounds of {a.requests} requests per run")
    with (
        tempfile.TemporaryDirectory() as tmp,
        service(a.repo, a.model) as served,
        service(copy_without_rollout(a.repo, a.model, Path(tmp)), a.model) as baseline,
    ):
        targets = [
            served.target(PLAIN, served.path, answered(False)),
            served.target(ROLLOUT, f"{served.path}&rollout=true", answered(True)),
            baseline.target(BASELINE, baseline.path, answered(False)),
        ]
        levels = asyncio.run(
            run_levels(
                targets, images.bodies, [1, 8], a.requests * a.rounds, 60 * a.rounds, a.rounds
            )
        )
    served_results = [r for level in zip(*levels.values(), strict=True) for r in level]
    compared = ratios(served_results)
    for c in compared:
        print(
            f"c={c.concurrency}: rollout/plain p50 latency {c.rollout_vs_plain_latency_p50:.3f}, "
            f"cost per image {c.rollout_vs_plain_throughput:.3f} (target <= {TARGET_RATIO}); "
            f"plain/baseline p50 {c.plain_vs_baseline_latency_p50:.3f}, "
            f"cost per image {c.plain_vs_baseline_throughput:.3f}"
        )
    report = RolloutReport(
        model=a.model,
        version=model.version,
        grid=grid,
        provider=provider,
        images=images.source,
        target_rollout_vs_plain=TARGET_RATIO,
        raw=raw,
        service=served_results,
        service_ratios=compared,
    )
    write_results(a.out, report)


if __name__ == "__main__":
    main()
