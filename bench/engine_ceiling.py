"""The engine process's own ceiling: its CPU per image when front ends feed it all they can.

    .venv/bin/python -m bench.engine_ceiling
    .venv/bin/python -m bench.engine_ceiling --feeders 2 --concurrency 128 --seconds 10 --rounds 3

An engine process (`python -m app.server --role engine`) serves ViT-B/16 fp16 on the simulated
H200 (`VIT_SERVE_SIMULATED_CURVE`, as `bench.simulated`), and feeder processes stand in for the
front ends: each is a real `RemoteEngine` (the front ends' client: shared memory, the wire)
that admits, infers and releases ready-made patches, with no HTTP and no decoding, so that the
engine, not the front ends, is what is loaded. Its CPU per image is then what the engine
process spends at the batches a fully fed accelerator forms; 1 / that is the ceiling of one
engine process's core. The feeders' CPU per image is reported beside it: the front ends' share
of the round trip. Results: bench/results/engine_ceiling.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from prometheus_client import CollectorRegistry, generate_latest, multiprocess

from app.engine import Job, RemoteEngine
from app.models.repository import scan_repository
from bench import harness
from bench.simulated import CURVE, simulated_repository

ADDRESS_PREFIX = "@vit-serve-engine-ceiling-"
ARENA_BYTES = 256 * 1024 * 1024
FEEDER = (sys.executable, "-m", "bench.engine_ceiling", "--feed")


@dataclass
class Round:
    img_per_s: float
    engine_cpu_ms_per_image: float
    # The engine's CPU by thread group (bench.harness.THREAD_GROUPS): its event loop (the
    # messages, admission, the batcher) and its inference thread (stacking, the softmax, the
    # simulated run).
    engine_by_group: dict[str, float]
    feeders_cpu_ms_per_image: float
    mean_batch_size: float | None
    errors: int


@dataclass
class CeilingReport:
    model: str
    curve: str
    feeders: int
    concurrency: int  # in flight over all feeders
    seconds_per_round: float
    rounds: list[Round]
    img_per_s: float  # medians of the rounds
    engine_cpu_ms_per_image: float
    feeders_cpu_ms_per_image: float
    mean_batch_size: float | None
    engine_ceiling_img_per_s: float  # one core's worth of the engine process


# --- a feeder (its own process) ------------------------------------------------------------


async def feed(address: str, concurrency: int, seconds: float) -> dict[str, Any]:
    engine = RemoteEngine(address, ARENA_BYTES)
    await engine.start(60.0)
    described = engine.describe()
    (model,) = described.models
    arch = model.default.spec.architecture
    grid = arch.grid
    patches = np.random.default_rng(0).integers(
        0, 256, (grid[0], grid[1], arch.patch_dim), dtype=np.uint8
    )
    done = errors = 0
    measuring = False

    async def one_loop(until: float) -> None:
        nonlocal done, errors
        while time.monotonic() < until:
            try:
                permit = await engine.admit(None, None)
                try:
                    await engine.infer(permit, Job([patches], None, time.monotonic() + 30.0))
                finally:
                    permit.release()
            except Exception:
                errors += 1
                await asyncio.sleep(0.01)
                continue
            if measuring:
                done += 1

    warm_until = time.monotonic() + 1.0
    await asyncio.gather(*(one_loop(warm_until) for _ in range(concurrency)))
    print("go", flush=True)
    measuring = True
    cpu0 = time.process_time()
    until = time.monotonic() + seconds
    await asyncio.gather(*(one_loop(until) for _ in range(concurrency)))
    cpu = time.process_time() - cpu0
    await engine.stop()
    return {"images": done, "errors": errors, "cpu_s": cpu}


# --- the run ---------------------------------------------------------------------------------


def batch_mean(folder: Path) -> tuple[float, float]:
    """(batches, images) the engine recorded so far in its multiprocess metrics folder."""
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=str(folder))  # type: ignore[no-untyped-call]
    samples = harness.parse_metrics(generate_latest(registry).decode())
    count = harness.total(samples, "vit_serve_batch_size_count") or 0.0
    total = harness.total(samples, "vit_serve_batch_size_sum") or 0.0
    return count, total


def one_round(
    address: str, engine_pid: int, metrics: Path, feeders: int, concurrency: int, seconds: float
) -> Round:
    each = max(1, concurrency // feeders)
    procs = [
        subprocess.Popen(
            [*FEEDER, address, "--concurrency", str(each), "--seconds", str(seconds)],
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(feeders)
    ]
    for proc in procs:  # every feeder warmed up and measuring
        assert proc.stdout is not None
        line = proc.stdout.readline().strip()
        if line != "go":
            raise RuntimeError(f"a feeder did not start: {line!r}")
    engine0 = harness.cpu_seconds(engine_pid)
    threads0 = harness.thread_cpu(engine_pid)
    batches0, images0 = batch_mean(metrics)
    started = time.monotonic()
    results = []
    for proc in procs:
        out, _ = proc.communicate(timeout=seconds + 120)
        if proc.returncode != 0:
            raise RuntimeError(f"a feeder failed ({proc.returncode})")
        results.append(json.loads(out.strip().splitlines()[-1]))
    elapsed = time.monotonic() - started
    engine_s = harness.cpu_seconds(engine_pid) - engine0
    threads1 = harness.thread_cpu(engine_pid)
    batches1, images1 = batch_mean(metrics)
    images = sum(r["images"] for r in results)
    if images == 0:
        raise RuntimeError("no image was answered")
    return Round(
        img_per_s=round(images / max(elapsed, seconds), 1),
        engine_cpu_ms_per_image=round(1e3 * engine_s / images, 4),
        engine_by_group={
            group: round(1e3 * seconds / images, 4)
            for group, seconds in harness.thread_groups(
                harness.thread_cpu_between(threads0, threads1), engine_pid
            ).items()
        },
        feeders_cpu_ms_per_image=round(1e3 * sum(r["cpu_s"] for r in results) / images, 4),
        mean_batch_size=round((images1 - images0) / (batches1 - batches0), 2)
        if batches1 > batches0
        else None,
        errors=sum(r["errors"] for r in results),
    )


def run(feeders: int, concurrency: int, seconds: float, rounds: int) -> CeilingReport:
    with tempfile.TemporaryDirectory() as tmp:
        repo = Path(tmp) / "repo"
        metrics = Path(tmp) / "metrics"
        metrics.mkdir()
        model = simulated_repository(repo)
        scan_repository(repo).resolve(model, None)
        address = f"{ADDRESS_PREFIX}{os.getpid()}"
        env = {
            **os.environ,
            "VIT_SERVE_MODEL_REPO": str(repo),
            "VIT_SERVE_SIMULATED_CURVE": str(CURVE),
            "VIT_SERVE_MAX_BATCH_TOKENS": "8192",
            "VIT_SERVE_MAX_QUEUE_IMAGES": str(max(512, 2 * concurrency)),
            "PROMETHEUS_MULTIPROC_DIR": str(metrics),
        }
        engine = subprocess.Popen(
            [sys.executable, "-m", "app.server", "--role", "engine", "--engine", address],
            env=env,
            stderr=open(Path(tmp) / "engine.log", "w"),  # noqa: SIM115 (closed with the process)
        )
        try:
            measured = [
                one_round(address, engine.pid, metrics, feeders, concurrency, seconds)
                for _ in range(rounds)
            ]
        finally:
            engine.terminate()
            engine.wait(30)
    engine_ms = statistics.median(r.engine_cpu_ms_per_image for r in measured)
    batches = [r.mean_batch_size for r in measured if r.mean_batch_size is not None]
    return CeilingReport(
        model=f"{model} (ViT-B/16 at 224 px; its graph not run)",
        curve=harness.shown(CURVE) + ' ("raw", fp16)',
        feeders=feeders,
        concurrency=concurrency,
        seconds_per_round=seconds,
        rounds=measured,
        img_per_s=statistics.median(r.img_per_s for r in measured),
        engine_cpu_ms_per_image=engine_ms,
        feeders_cpu_ms_per_image=statistics.median(r.feeders_cpu_ms_per_image for r in measured),
        mean_batch_size=statistics.median(batches) if batches else None,
        engine_ceiling_img_per_s=round(1e3 / engine_ms, 0),
    )


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--feeders", type=int, default=2, help="front-end stand-in processes")
    p.add_argument("--concurrency", type=int, default=256, help="jobs in flight, all feeders")
    p.add_argument("--seconds", type=float, default=10.0, help="per round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", type=Path, default=harness.RESULTS / "engine_ceiling.json")
    p.add_argument("--feed", help=argparse.SUPPRESS)  # a feeder: the engine's address
    args = p.parse_args(argv)
    if args.feed:
        import uvloop

        print(json.dumps(uvloop.run(feed(args.feed, args.concurrency, args.seconds))))
        return
    report = run(args.feeders, args.concurrency, args.seconds, args.rounds)
    for r in report.rounds:
        print(
            f"{r.img_per_s:8.1f} img/s  engine {r.engine_cpu_ms_per_image:.3f} ms/img "
            f"{r.engine_by_group}  "
            f"feeders {r.feeders_cpu_ms_per_image:.3f} ms/img  mean batch {r.mean_batch_size}  "
            f"errors {r.errors}"
        )
    print(
        f"median: engine {report.engine_cpu_ms_per_image:.3f} ms an image, one core's ceiling "
        f"{report.engine_ceiling_img_per_s:.0f} img/s"
    )
    harness.write_results(args.out, report)


if __name__ == "__main__":
    main()
