"""What an attention rollout map costs: the rollout graph against the plain one, side by side.

    .venv/bin/python -m bench.rollout_cost                      # the bundled demo model
    .venv/bin/python -m bench.rollout_cost --repo /tmp/repo --model tiny --requests 100

(a) Raw: median `session.run` time of model.onnx and model.rollout.onnx at the native grid,
    batch 1 and 8, measured in alternating rounds so drift hits both alike; img/s and the ratio.
(b) Service: uvicorn on 127.0.0.1 over the model repository, fed real photos (generated JPEGs
    when ../shared/testdata/photos is absent) at concurrency 1 and 8: plain requests, requests
    with rollout=true, and, as the baseline for "plain requests unchanged", plain requests to a
    second server over a copy of the repository without rollout graphs (what a server was before
    rollout existed). The three run in alternating rounds; medians over all rounds.

The issue's targets: a rollout request costs at most 25% more than a plain one, and plain
requests cost what they did. Figures are printed and written to a JSON file; nothing here asserts
on time.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx
import numpy as np
import onnxruntime as ort

from app.models.runtime import candidate_providers, open_session
from app.models.spec import (
    GRAPH_FILENAME,
    ROLLOUT_GRAPH_FILENAME,
    SPEC_FILENAME,
    GraphFiles,
    ModelSpec,
)
from bench.core import _wait_ready, free_port, load_images
from bench.machine import machine_info

ROOT = Path(__file__).resolve().parent.parent
TARGET_RATIO = 1.25  # the budget: rollout <= 25% over plain


@dataclass
class RawPair:
    batch: int
    plain_img_per_s: float
    rollout_img_per_s: float
    plain_ms_per_batch_p50: float
    rollout_ms_per_batch_p50: float
    rollout_cost_ratio: float  # rollout time / plain time


@dataclass
class ServiceResult:
    server: str  # "with-rollout" or "baseline" (no rollout graphs)
    mode: str  # "plain" or "rollout"
    concurrency: int
    requests: int
    errors: int
    img_per_s: float  # median over rounds
    latency_ms_p50: float  # over every request of every round
    latency_ms_p99: float


@dataclass
class ServiceRatio:
    concurrency: int
    rollout_vs_plain_latency_p50: float
    rollout_vs_plain_throughput: float  # plain img/s / rollout img/s: the cost per image
    plain_vs_baseline_latency_p50: float
    plain_vs_baseline_throughput: float


def _time_runs(session: ort.InferenceSession, feeds: Mapping[str, object], n: int) -> list[float]:
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        session.run(None, feeds)
        times.append(time.perf_counter() - t0)
    return times


def raw_pair(
    plain: ort.InferenceSession,
    rollout: ort.InferenceSession,
    spec: ModelSpec,
    batch: int,
    seconds: float,
) -> RawPair:
    gh, gw = spec.architecture.grid
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (batch, gh, gw, spec.architecture.patch_dim), dtype=np.uint8)
    assert spec.rollout is not None
    patches, fusion, ratio = (t.name for t in spec.rollout.inputs)
    plain_feeds = {spec.input_name: x}
    # Mean fusion, nothing discarded: the graph runs every node whatever the values.
    rollout_feeds = {
        patches: x,
        fusion: np.array(0, dtype=np.int64),
        ratio: np.array(0.0, dtype=np.float32),
    }
    _time_runs(plain, plain_feeds, 3)
    _time_runs(rollout, rollout_feeds, 3)
    # Alternate short rounds until the time is spent: both graphs see the same machine state.
    plain_times: list[float] = []
    rollout_times: list[float] = []
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline or len(plain_times) < 10:
        plain_times += _time_runs(plain, plain_feeds, 5)
        rollout_times += _time_runs(rollout, rollout_feeds, 5)
    p, r = statistics.median(plain_times), statistics.median(rollout_times)
    return RawPair(
        batch=batch,
        plain_img_per_s=batch / p,
        rollout_img_per_s=batch / r,
        plain_ms_per_batch_p50=p * 1e3,
        rollout_ms_per_batch_p50=r * 1e3,
        rollout_cost_ratio=r / p,
    )


def copy_without_rollout(repo: Path, model: str, into: Path) -> Path:
    """The model as an export from before rollout graphs: model.onnx only, nothing in model.json."""
    spec = ModelSpec.load(repo / model / SPEC_FILENAME)
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


@contextmanager
def uvicorn(repo: Path) -> Iterator[str]:
    port = free_port()
    env = {**os.environ, "VIT_SERVE_MODEL_REPO": str(repo), "VIT_SERVE_LOG_LEVEL": "WARNING"}
    cmd = [sys.executable, "-m", "uvicorn", "app.main:create_app", "--factory"]
    cmd += ["--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"]
    server = subprocess.Popen(cmd, cwd=ROOT, env=env)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.terminate()
        server.wait(timeout=30)


async def _ready(base: str) -> None:
    async with httpx.AsyncClient(base_url=base) as client:
        await _wait_ready(client, timeout_s=120)


async def load(
    base: str,
    params: dict[str, str],
    images: list[bytes],
    concurrency: int,
    requests: int,
    max_seconds: float,
) -> tuple[list[float], int, float]:
    """(latencies in s, errors, elapsed s) of `requests` POSTs from `concurrency` workers."""
    latencies: list[float] = []
    errors = 0
    sent = 0
    stop_at = time.monotonic() + max_seconds
    want_rollout = params.get("rollout", "false") != "false"
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=base, timeout=60, limits=limits) as client:

        async def worker() -> None:
            nonlocal sent, errors
            while sent < requests and time.monotonic() < stop_at:
                body = images[sent % len(images)]
                sent += 1
                t0 = time.perf_counter()
                r = await client.post(
                    "/classify",
                    params=params,
                    content=body,
                    headers={"content-type": "image/jpeg"},
                )
                latencies.append(time.perf_counter() - t0)
                # A rollout request answered without its map would flatter the figures.
                if r.status_code != 200 or ("rollout" in r.json()["results"][0]) != want_rollout:
                    errors += 1

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - t0
    return latencies, errors, elapsed


async def service_bench(
    repo: Path,
    baseline_repo: Path,
    model: str,
    images: list[bytes],
    requests: int,
    rounds: int,
) -> list[ServiceResult]:
    plain = {"model": model}
    rollout = {"model": model, "rollout": "true"}
    with uvicorn(repo) as served, uvicorn(baseline_repo) as baseline:
        await _ready(served)
        await _ready(baseline)
        runs = [
            ("with-rollout", "plain", served, plain),
            ("with-rollout", "rollout", served, rollout),
            ("baseline", "plain", baseline, plain),
        ]
        results = []
        for concurrency in (1, 8):
            lat: dict[int, list[float]] = {i: [] for i in range(len(runs))}
            rates: dict[int, list[float]] = {i: [] for i in range(len(runs))}
            errs: dict[int, int] = dict.fromkeys(range(len(runs)), 0)
            for _, _, base, params in runs:  # warm-up, not counted
                await load(base, params, images, concurrency, 20, max_seconds=10)
            for r in range(rounds):
                # Each round starts with another run, so none always follows the same one.
                for i in [(r + j) % len(runs) for j in range(len(runs))]:
                    _, _, base, params = runs[i]
                    latencies, errors, elapsed = await load(
                        base, params, images, concurrency, requests, max_seconds=60
                    )
                    lat[i] += latencies
                    rates[i].append(len(latencies) / elapsed)
                    errs[i] += errors
            for i, (server, mode, _, _) in enumerate(runs):
                ms = np.array(lat[i]) * 1e3
                results.append(
                    ServiceResult(
                        server=server,
                        mode=mode,
                        concurrency=concurrency,
                        requests=len(ms),
                        errors=errs[i],
                        img_per_s=statistics.median(rates[i]),
                        latency_ms_p50=float(np.percentile(ms, 50)),
                        latency_ms_p99=float(np.percentile(ms, 99)),
                    )
                )
        return results


def ratios(results: list[ServiceResult]) -> list[ServiceRatio]:
    out = []
    for c in sorted({r.concurrency for r in results}):
        by = {(r.server, r.mode): r for r in results if r.concurrency == c}
        plain, rollout = by[("with-rollout", "plain")], by[("with-rollout", "rollout")]
        base = by[("baseline", "plain")]
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
    p.add_argument("--repo", type=Path, default=ROOT / "model_repo")
    p.add_argument("--model", default="demo-shapes")
    p.add_argument("--requests", type=int, default=200, help="per concurrency, mode and round")
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds of the service runs")
    p.add_argument("--raw-seconds", type=float, default=3.0, help="per batch size")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "rollout_cost.json")
    a = p.parse_args(argv)

    spec = ModelSpec.load(a.repo / a.model / SPEC_FILENAME)
    version = max(spec.versions)
    folder = a.repo / a.model / str(version)
    if not (folder / ROLLOUT_GRAPH_FILENAME).is_file():
        sys.exit(f"{folder} has no {ROLLOUT_GRAPH_FILENAME}: re-export the model")
    providers = candidate_providers(None)
    plain_session, provider = open_session(folder / GRAPH_FILENAME, providers)
    rollout_session, _ = open_session(folder / ROLLOUT_GRAPH_FILENAME, providers)
    print(f"model {a.model} version {version}, grid {spec.architecture.grid}, on {provider}")
    raw = [raw_pair(plain_session, rollout_session, spec, b, a.raw_seconds) for b in (1, 8)]
    del plain_session, rollout_session
    for r in raw:
        print(
            f"raw batch {r.batch}: plain {r.plain_img_per_s:8.1f} img/s "
            f"({r.plain_ms_per_batch_p50:.2f} ms)  rollout {r.rollout_img_per_s:8.1f} img/s "
            f"({r.rollout_ms_per_batch_p50:.2f} ms)  rollout/plain {r.rollout_cost_ratio:.3f}"
        )

    images, source = load_images(100)
    print(f"service with {source}, {a.rounds} rounds of {a.requests} requests per run")
    with tempfile.TemporaryDirectory() as tmp:
        baseline_repo = copy_without_rollout(a.repo, a.model, Path(tmp))
        served = asyncio.run(
            service_bench(a.repo, baseline_repo, a.model, images, a.requests, a.rounds)
        )
    for s in served:
        print(
            f"service c={s.concurrency} {s.server:>12} {s.mode:>7}: {s.img_per_s:8.1f} img/s  "
            f"p50 {s.latency_ms_p50:6.1f} ms  p99 {s.latency_ms_p99:6.1f} ms  "
            f"({s.requests} requests, {s.errors} errors)"
        )
    compared = ratios(served)
    for c in compared:
        print(
            f"c={c.concurrency}: rollout/plain p50 latency {c.rollout_vs_plain_latency_p50:.3f}, "
            f"cost per image {c.rollout_vs_plain_throughput:.3f} (target <= {TARGET_RATIO}); "
            f"plain/baseline p50 {c.plain_vs_baseline_latency_p50:.3f}, "
            f"cost per image {c.plain_vs_baseline_throughput:.3f}"
        )
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(
        json.dumps(
            {
                "model": a.model,
                "version": version,
                "grid": list(spec.architecture.grid),
                "provider": provider,
                "images": source,
                "target_rollout_vs_plain": TARGET_RATIO,
                "machine": machine_info(),
                "raw": [asdict(r) for r in raw],
                "service": [asdict(s) for s in served],
                "service_ratios": [asdict(c) for c in compared],
            },
            indent=2,
        )
        + "\n"
    )
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
