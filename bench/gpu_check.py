"""The GPU check: one command, at most 6 minutes on one GPU, that says whether the GPU path works
and what it delivers.

    PYTHONPATH=/tmp/site:. python3 -m bench.gpu_check --photos /tmp/gpu/photos --out "$OUT"
    .venv/bin/python -m bench.gpu_check --cpu-smoke --out build/gpu_check  # the same code, a CPU

(the first on a machine with a GPU, with what bench.gpu_bundle made: docs/performance.md,
"Running it on a lent GPU machine").

Needs onnxruntime-gpu, numpy, Pillow and the service's own packages; no PyTorch, no `onnx`, no
TensorRT (used where it loads). The ViT-B/16 graphs are made here from bench/graphs/
(bench/gpu_graphs.py: the export's own graphs, random weights written at run time). Phases,
each skipped (and said so) when the time budget (--budget-s) no longer allows it:

1. environment: Python, ONNX Runtime, the CUDA it is built for, its providers, the driver and
   GPU (name, compute capability), TensorRT's version, and for the CUDA and TensorRT providers
   every library they link against and whether it loads (app.runtime.native);
2. placement and parity: the demo model and ViT-B/16 (forms fused and fp16 on CUDA, the plain
   form on TensorRT) in sessions made as the service makes them
   (app.runtime.sessions.open_backend), where ONNX Runtime put their nodes, and their logits
   against the same graph on the CPU at 3 grids: fp32 within 1e-3; fp16 the same top-1 and
   within 1% of the largest logit; fp32 both ways, as served (CUDA's TF32 matrix products) and
   with VIT_SERVE_CUDA_TF32=false (exact float32), which tells TF32 from a fault;
3. raw throughput: ViT-B/16 img/s at batch 1, 8, 32, 64, 128, 256 (native grid), fp32 and fp16,
   on CUDA, and on TensorRT where it loads, built with the service's own settings (its profile
   covers the batches the service sends; larger ones run where the service runs them, on CUDA)
   in a subprocess limited to the time left; the engine build's time apart;
4. the service end to end: `python -m app.server` over ViT-B/16 fp16, the 100 shared photos
   (--photos) posted one per request by a client of several processes (bench.loadgen): at
   VIT_SERVE_WORKERS=1 at concurrency 64 and 256, then the workers sweep (4, 8, 14) at 256, each
   its own service: img/s, p50, p99, errors, the server's CPU per image by process and the
   client's; beside them the CPU decode ceiling (decode + resize + patchify img/s on one core x
   the cores) and the target, at least 70% of min(raw fp16 at its best batch, that ceiling) at
   c=256 with 0 errors; and one level with VIT_SERVE_DECODE=gpu where the checkout has that
   setting (skipped, with the reason, where not);
5. one JSON and one PNG (--out), and a summary on stdout.

`--cpu-smoke` runs every phase on the CPU with a tiny encoder over the same 224 px input, small
batches, low concurrency and the sweep at workers 1 and 2, in well under a minute: what the test
suite runs (tests/unit/test_gpu_check.py). Nothing here asserts on speed; parity failures are
reported, and the exit status is 0 when every phase ran or was skipped (for time, or with a
stated reason), 2 when there is no usable GPU (the environment is still written), 1 on an error.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from app.core.settings import Settings
from app.models.repository import ModelVersion, scan_repository
from app.runtime import decodemode, native
from app.runtime import placement as plan
from app.runtime.backends import OnnxBackend
from app.runtime.providers import CPU, CUDA, TENSORRT, Placement
from app.runtime.sessions import open_backend
from bench import gpu_decode, harness
from bench.gpu_graphs import GraphKit, model_repository
from bench.loadgen import Clients, SpreadResult

ROOT = Path(__file__).resolve().parent.parent
DEMO_REPO = ROOT / "model_repo"
DEMO_MODEL = "demo-shapes"
RESULTS = ROOT / "bench" / "results"

FP32_ATOL = 1e-3  # fp32 logits: GPU against the CPU
FP16_RTOL = 0.01  # fp16 logits: within 1% of the largest |logit|, and the same top-1
TARGET_SHARE = 0.7  # the service end to end: of min(raw fp16 at its best batch, decode ceiling)


@dataclass(frozen=True)
class Plan:
    """What one run measures: a GPU run, or the smoke run on the CPU."""

    smoke: bool
    size: str  # bench/gpu_graphs.SIZES
    batches: tuple[int, ...]
    concurrency: tuple[int, ...]  # the service at workers=1
    seconds_per_batch: float
    seconds_per_level: float
    parity_batch: int
    parity_grids: tuple[tuple[int, int], ...]
    budget_s: float
    workers: tuple[int, ...]  # the sweep of VIT_SERVE_WORKERS, at `sweep_concurrency`
    sweep_concurrency: int
    client_processes: int  # the load client's (bench.loadgen)
    warmup_s: float  # each service's warm-up, at `sweep_concurrency`

    @classmethod
    def make(cls, smoke: bool, budget_s: float | None) -> Plan:
        if smoke:
            return cls(
                True, "vit-smoke", (1, 8), (4, 16), 0.3, 2.0, 2, ((14, 14), (8, 24), (18, 18)),
                budget_s or 150.0, (1, 2), 16, 2, 1.0,
            )  # fmt: skip
        # 4 client processes: at 3,000 img/s and 0.18 ms of client CPU a request, each is at
        # about 14% of a core, far from being the limit, and 12 of the 16 cores stay the
        # service's. Levels of 10 s keep the sweep's 4 services (and a GPU-decode one) within
        # the budget; see `end_to_end` for the arithmetic.
        return cls(
            False, "vit-b16", (1, 8, 32, 64, 128, 256), (64, 256), 1.5, 10.0, 8,
            ((14, 14), (8, 24), (18, 18)), budget_s or 330.0, (1, 4, 8, 14), 256, 4, 3.0,
        )  # fmt: skip

    @classmethod
    def of_json(cls, fields: dict[str, Any]) -> Plan:
        """A plan from `vars(plan)` gone through JSON (lists back to tuples)."""

        def tupled(value: Any) -> Any:
            return tuple(tupled(v) for v in value) if isinstance(value, list) else value

        return cls(**{k: tupled(v) for k, v in fields.items()})

    @property
    def device(self) -> str:
        """The provider the check runs on: CUDA, or the CPU in the smoke run."""
        return CPU if self.smoke else CUDA


class Clock:
    """The run's time budget."""

    def __init__(self, budget_s: float) -> None:
        self.start = time.monotonic()
        self.budget_s = budget_s

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.start

    @property
    def left(self) -> float:
        return self.budget_s - self.elapsed


@dataclass
class Report:
    plan: Plan
    environment: dict[str, Any] = field(default_factory=dict)
    placement: dict[str, Any] = field(default_factory=dict)  # session -> where its nodes run
    parity: list[dict[str, Any]] = field(default_factory=list)
    raw: list[dict[str, Any]] = field(default_factory=list)  # one per (provider, precision)
    end_to_end: dict[str, Any] = field(default_factory=dict)
    device_decode: dict[str, Any] = field(default_factory=dict)  # bench.gpu_decode's report
    skipped: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def as_json(self) -> dict[str, Any]:
        return {
            "plan": {k: v for k, v in vars(self.plan).items()},
            "environment": self.environment,
            "placement": self.placement,
            "parity": self.parity,
            "raw": self.raw,
            "end_to_end": self.end_to_end,
            "device_decode": self.device_decode,
            "skipped": self.skipped,
            "errors": self.errors,
            "seconds": round(self.seconds, 1),
        }


def say(line: str) -> None:
    print(line, flush=True)


def point_line(name: str, p: dict[str, Any]) -> str:
    where = f"  (on {p['runs_on']})" if "runs_on" in p else ""
    rate, ms = p["img_per_s"], p["ms_per_batch"]
    return f"   {name} batch {p['batch']:>4}: {rate:>9.1f} img/s  {ms:.2f} ms{where}"


def level_line(level: dict[str, Any]) -> str:
    counts = f"{level['ok']} ok, {level['errors']} errors, {level['lost']} lost"
    line = (
        f"   workers {level.get('workers', 1):>2} concurrency {level['concurrency']:>3}: "
        f"{level['img_per_s']:>8.1f} img/s  p50 {level['p50_ms']:.1f} ms  "
        f"p99 {level['p99_ms']:.1f} ms  ({counts})"
    )
    return line + "\n" + cpu_line(level) if "client_processes" in level else line


def cpu_line(level: dict[str, Any]) -> str:
    """CPU per image: the server's by process (main: the supervisor or the one process), the
    client's over all its processes, and how busy its busiest process was."""
    by_process = level.get("server_cpu_ms_per_image_by_process") or {}
    roles = ", ".join(f"{role} {ms:.2f}" for role, ms in by_process.items())
    client = level.get("client_cpu_ms_per_image")
    return (
        f"      CPU ms/img: server {level.get('server_cpu_ms_per_image')} ({roles}); client "
        f"{client} over {level['client_processes']} processes (busiest at "
        f"{level['client_busiest_core']} of a core)"
    )


# --- 1. environment ------------------------------------------------------------------------------


def environment() -> dict[str, Any]:
    """What this machine's GPU path has, each fact read from its source."""
    gpu = native.gpu()
    libraries: dict[str, dict[str, Any]] = {}
    for provider, probe in ((CUDA, native.cuda_provider), (TENSORRT, native.tensorrt_provider)):
        if provider not in ort.get_available_providers():
            libraries[provider] = {"problem": "not in this ONNX Runtime build"}
            continue
        problem = plan.provider_problem(provider)
        found = probe()
        libraries[provider] = {
            "needs": list(found.needed),
            "missing": [m.soname for m in found.missing],
            "problem": problem,
        }
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "onnxruntime": ort.__version__,
        "onnxruntime_path": str(Path(ort.__file__).parent),
        "built_for_cuda": native.wheel_cuda_version(),
        "providers_in_build": list(ort.get_available_providers()),
        "driver": native.driver_present(),
        "gpu": gpu.name if gpu else None,
        "compute_capability": ".".join(map(str, gpu.capability)) if gpu else None,
        "tensorrt": native.tensorrt_version() if native.driver_present() else None,
        "libraries": libraries,
        "nvidia_wheel_dirs": [str(d) for d in native.wheel_directories()],
    }


def gpu_missing(env: dict[str, Any]) -> str | None:
    """Why this machine cannot run the GPU check, or None."""
    if CUDA not in env["providers_in_build"]:
        return "this ONNX Runtime has no CUDA provider: install onnxruntime-gpu"
    problem = env["libraries"][CUDA]["problem"]
    return str(problem) if problem else None


def tensorrt_usable(env: dict[str, Any]) -> bool:
    return bool(TENSORRT in env["providers_in_build"] and not env["libraries"][TENSORRT]["problem"])


# --- sessions as the service makes them ------------------------------------------------------


def settings_for(repo: Path, provider: str, cache: Path, **overrides: Any) -> Settings:
    """The service's settings (from the environment, VIT_SERVE_*), on `provider` alone."""
    return Settings(
        model_repo=repo, providers=[provider], trt_cache_dir=cache, warmup=True, **overrides
    )


def open_on(
    repo: Path,
    model: str,
    provider: str,
    cache: Path,
    version: int | None = None,
    **overrides: Any,
) -> OnnxBackend:
    found = scan_repository(repo).resolve(model, version)
    backend, _ = open_backend(settings_for(repo, provider, cache, **overrides), found)
    return backend


def plain_version(repo: Path, model: str) -> ModelVersion:
    """A model's highest version exported plain (`none`: what every provider takes), else its
    default."""
    entry = scan_repository(repo).resolve(model, None)
    plain = [v for v, files in entry.spec.versions.items() if files.optimization.level == "none"]
    return scan_repository(repo).resolve(model, max(plain)) if plain else entry


def placement_json(placement: Placement) -> dict[str, Any]:
    return {
        "provider": placement.provider,
        "wanted": placement.wanted,
        "fallback": placement.fallback,
        "nodes": placement.node_counts(),
        "compute_nodes": dict(placement.compute),
    }


def patches(version: ModelVersion, batch: int, grid: tuple[int, int], seed: int) -> np.ndarray:
    shape = (batch, *grid, version.spec.architecture.patch_dim)
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def compare(
    label: str, got: np.ndarray, expected: np.ndarray, fp16: bool, grid: tuple[int, int]
) -> dict[str, Any]:
    """One grid's parity: fp32 within FP32_ATOL; fp16 the same top-1, within FP16_RTOL."""
    diff = float(np.abs(got - expected).max())
    top1 = int((got.argmax(axis=1) == expected.argmax(axis=1)).sum())
    bound = FP16_RTOL * float(np.abs(expected).max()) if fp16 else FP32_ATOL
    passed = diff <= bound and (not fp16 or top1 == len(got))
    return {
        "graph": label,
        "grid": f"{grid[0]}x{grid[1]}",
        "batch": len(got),
        "max_abs_diff": diff,
        "bound": bound,
        "top1_agree": f"{top1}/{len(got)}",
        "passed": passed,
    }


def parity_of(
    label: str,
    device: OnnxBackend,
    reference: OnnxBackend,
    version: ModelVersion,
    plan: Plan,
    fp16: bool,
    grids: tuple[tuple[int, int], ...] | None = None,
) -> list[dict[str, Any]]:
    rows = []
    for i, grid in enumerate(grids or plan.parity_grids):
        x = patches(version, plan.parity_batch, grid, seed=i)
        rows.append(compare(label, device.run(x), reference.run(x), fp16, grid))
    return rows


TF32_OFF = "(VIT_SERVE_CUDA_TF32=false)"


def tf32_label(label: str, tf32: bool | None) -> str:
    """A parity row's graph label: as served, or with exact float32 asked for."""
    return f"{label} {TF32_OFF}" if tf32 is False else label


def tf32_rows(rows: list[dict[str, Any]], tf32: bool | None) -> list[dict[str, Any]]:
    """Parity rows marked with the session's `cuda_tf32` (None: an fp16 graph, not marked)."""
    return rows if tf32 is None else [{**row, "cuda_tf32": tf32} for row in rows]


# --- raw throughput ----------------------------------------------------------------------------


def throughput(
    backend: OnnxBackend, version: ModelVersion, batch: int, seconds: float
) -> dict[str, Any]:
    """img/s at the native grid: two runs untimed, then runs for `seconds` (at least 3); the
    median batch time. Each run copies its logits back, so each is complete when timed."""
    x = patches(version, batch, version.spec.architecture.grid, seed=batch)
    for _ in range(2):
        backend.run(x)
    times: list[float] = []
    stop_at = time.perf_counter() + seconds
    while time.perf_counter() < stop_at or len(times) < 3:
        t0 = time.perf_counter()
        backend.run(x)
        times.append(time.perf_counter() - t0)
    p50 = statistics.median(times)
    return {"batch": batch, "img_per_s": round(batch / p50, 1), "ms_per_batch": round(p50 * 1e3, 3)}


def sweep(
    backend: OnnxBackend, version: ModelVersion, plan: Plan, clock: Clock, reserve_s: float
) -> tuple[list[dict[str, Any]], list[int]]:
    """Every batch of the plan while the budget (less `reserve_s`) lasts; the batches left."""
    points, left = [], []
    for batch in plan.batches:
        if clock.left - reserve_s < plan.seconds_per_batch * 2:
            left.append(batch)
            continue
        point = throughput(backend, version, batch, plan.seconds_per_batch)
        profile = getattr(backend, "_profile", None)
        if profile is not None:  # TensorRT: batches beyond its profile run on CUDA, as served
            shape = (batch, *version.spec.architecture.grid, version.spec.architecture.patch_dim)
            point["runs_on"] = TENSORRT if profile.covers(shape) else CUDA
        points.append(point)
    return points, left


# --- TensorRT, in a subprocess -------------------------------------------------------------------


def tensorrt_worker(args: dict[str, Any]) -> dict[str, Any]:
    """In a subprocess: the plain graph on TensorRT as the service builds it (its settings from
    the environment), the build timed, parity against the CPU, throughput at each batch."""
    plan = Plan.of_json(args["plan"])
    repo, model, fp16 = Path(args["repo"]), args["model"], bool(args["fp16"])
    clock = Clock(float(args["seconds"]))
    version = scan_repository(repo).resolve(model, None)
    started = time.perf_counter()
    backend = open_on(repo, model, TENSORRT, Path(args["cache"]), trt_fp16=fp16)
    build_s = time.perf_counter() - started
    out: dict[str, Any] = {
        "build_s": round(build_s, 1),
        "placement": placement_json(backend.placement),
        "profile": vars(backend._profile) if backend._profile is not None else None,
    }
    if backend.provider != TENSORRT:
        out["skipped"] = f"TensorRT did not take the graph: {backend.placement.fallback}"
        return out
    reference = OnnxBackend(version.graph_path, version.spec, [CPU])
    out["parity"] = parity_of(
        f"{model} TensorRT fp{16 if fp16 else 32}", backend, reference, version, plan, fp16
    )
    del reference
    out["points"], out["not_measured"] = sweep(backend, version, plan, clock, reserve_s=2.0)
    return out


def run_tensorrt(
    repo: Path, model: str, fp16: bool, plan: Plan, limit_s: float, workdir: Path
) -> dict[str, Any]:
    """`tensorrt_worker` in a subprocess killed after `limit_s` (an engine build can take
    minutes): what it measured, or why not."""
    result = workdir / f"tensorrt-fp{16 if fp16 else 32}.json"
    args = {
        "plan": vars(plan),
        "repo": str(repo),
        "model": model,
        "fp16": fp16,
        "cache": str(workdir / "trt_cache"),
        "seconds": max(10.0, limit_s - 5.0),
    }
    cmd = [
        sys.executable,
        "-m",
        "bench.gpu_check",
        "--worker",
        json.dumps(args),
        "--worker-out",
        str(result),
    ]
    started = time.monotonic()
    try:
        done = subprocess.run(cmd, cwd=ROOT, timeout=limit_s, capture_output=True, text=True)
    except subprocess.TimeoutExpired:
        return {"skipped": f"no result within {limit_s:.0f} s (engine build and measurement)"}
    if done.returncode != 0 or not result.exists():
        tail = (done.stderr or done.stdout).strip().splitlines()[-5:]
        return {"error": f"exit {done.returncode}: " + " | ".join(tail)}
    out: dict[str, Any] = json.loads(result.read_text())
    out["subprocess_s"] = round(time.monotonic() - started, 1)
    return out


# --- 4. end to end ----------------------------------------------------------------------------


def decode_ceiling(bodies: list[bytes], version: ModelVersion, seconds: float) -> dict[str, Any]:
    """Decode + resize + patchify img/s on one core (this thread), as the service does it
    (`app.pipeline.preprocess.prepare`, crop), and that times the machine's cores."""
    from app.pipeline.preprocess import prepare

    settings = Settings()
    fit = settings.fit_max_tokens or 2 * version.spec.architecture.native_tokens
    done = 0
    cpu0, t0 = time.thread_time(), time.perf_counter()
    while time.perf_counter() - t0 < seconds or done < 5:
        body = bodies[done % len(bodies)]
        prepare(
            body,
            version.spec,
            "crop",
            name="bench",
            max_pixels=settings.image_max_pixels,
            fit_max_tokens=fit,
        )
        done += 1
    per_core = done / (time.thread_time() - cpu0)
    cores = os.cpu_count() or 1
    return {
        "img_per_s_per_core": round(per_core, 1),
        "cores": cores,
        "ceiling_img_per_s": round(per_core * cores, 1),
    }


def level_json(level: SpreadResult, workers: int) -> dict[str, Any]:
    """One level of the service as the report writes it."""
    return {
        "workers": workers,
        "concurrency": level.concurrency,
        "img_per_s": round(level.img_per_s, 1),
        "p50_ms": round(level.latency_ms_p50, 2),
        "p99_ms": round(level.latency_ms_p99, 2),
        "ok": level.ok,
        "errors": level.errors,
        "lost": level.lost,
        "seconds": level.seconds,
        "server_cpu_ms_per_image": level.server_cpu_ms_per_image,
        "server_cpu_ms_per_image_by_process": level.server_cpu_ms_per_image_by_process,
        "client_cpu_ms_per_image": level.client_cpu_ms_per_image,
        "client_processes": level.client_processes,
        "client_busiest_core": level.client_busiest_core,
    }


def service_env(plan: Plan, workers: int) -> dict[str, str]:
    """The service's settings for one step of the sweep: `workers` front ends, the decoding
    threads shared out over them (all cores but two: the engine's and the client's), room to
    queue every request of the largest level twice over."""
    cores = os.cpu_count() or 1
    env = {
        "VIT_SERVE_WORKERS": str(workers),
        "VIT_SERVE_PREPROCESS_THREADS": str(max(1, (cores - 2) // workers)),
        "VIT_SERVE_MAX_QUEUE_IMAGES": str(max(512, 2 * max(plan.concurrency))),
        "VIT_SERVE_PROVIDERS": json.dumps([plan.device])
        if plan.smoke
        else os.environ.get("VIT_SERVE_PROVIDERS", ""),
    }
    return {k: v for k, v in env.items() if v}


@dataclass
class Served:
    """What one service of the end-to-end phase measured."""

    env: dict[str, str]
    start_s: float  # from the process's start to ready
    levels: list[dict[str, Any]]
    models_entry: dict[str, Any]  # its model's entry in GET /models


def serve_levels(
    repo: Path,
    model: str,
    env: dict[str, str],
    levels: tuple[int, ...],
    plan: Plan,
    clients: Clients,
    log: Path,
    ready_timeout_s: float,
) -> Served:
    """`python -m app.server` with `env`, warmed up at the sweep's concurrency (connections to
    every front end, ONNX Runtime's arena at each batch size), then each of `levels`."""
    workers = int(env["VIT_SERVE_WORKERS"])
    started = time.monotonic()
    with harness.service(repo, model, env=env, log=log, ready_timeout_s=ready_timeout_s) as server:
        start_s = time.monotonic() - started
        listed = json.loads(asyncio.run(harness.get(server.port, "/models")).body)
        (entry,) = [m for m in listed["models"] if m["name"] == model]
        target = server.target()
        clients.run(target, plan.sweep_concurrency, 10**9, plan.warmup_s, cpu=False)
        measured = []
        for concurrency in levels:
            level = clients.run(target, concurrency, 10**9, plan.seconds_per_level)
            measured.append(level_json(level, workers))
            say(level_line(measured[-1]))
    return Served(env, round(start_s, 1), measured, entry)


def photos_limit(plan: Plan) -> int:
    return 10 if plan.smoke else 100


def gpu_decode_problem(plan: Plan) -> str | None:
    """Why the end-to-end level with VIT_SERVE_DECODE=gpu cannot run here, or None."""
    if "decode" not in Settings.model_fields:
        return "VIT_SERVE_DECODE is not a setting of this checkout (app/core/settings.py)"
    if plan.smoke:
        return "the smoke run has no GPU"
    return decodemode.unavailable_reason()  # the decoder's wheels are an optional part


def end_to_end(
    repo: Path, model: str, plan: Plan, clock: Clock, workdir: Path, photos: Path | None
) -> dict[str, Any]:
    """The service over `model`: its placement; img/s, p50, p99 at each of the plan's levels at
    workers=1, then at the sweep's concurrency for each other VIT_SERVE_WORKERS; and, where the
    setting exists, once with VIT_SERVE_DECODE=gpu. The load comes from `plan.client_processes`
    client processes (bench.loadgen), so that the client is not the limit.

    Time: each service is started, warmed up and measured only when the time left holds its
    start (the slowest start so far, x1.5; 90 s before the first on a GPU), its warm-up and its
    levels. On the H200 the earlier phases took about 40 s of the 330; then 5 services of about
    20 s to start, 3 s of warm-up and 10 s a level (6 levels) are about 175 s."""
    images = harness.load_images(100, photos)
    version = scan_repository(repo).resolve(model, None)
    result: dict[str, Any] = {"model": model, "images": images.source}
    result["decode"] = decode = decode_ceiling(images.bodies, version, 1.0 if plan.smoke else 3.0)
    say(f"   {images.source}")
    say(
        f"   decode ceiling: {decode['img_per_s_per_core']} img/s per core x "
        f"{decode['cores']} = {decode['ceiling_img_per_s']} img/s"
    )
    slowest_start: float | None = None  # of the services so far

    def start_estimate() -> float:
        # Before the first start, a guess (ONNX Runtime's CUDA session and its warm-up at each
        # batch size); then the slowest measured, with room.
        return 1.5 * (slowest_start or (10.0 if plan.smoke else 60.0))

    def ready_within(needed: float) -> float:
        # What the time left holds beyond the warm-up, the levels and 10 s to stop.
        return max(30.0, clock.left - (needed - start_estimate()) - 10)

    steps = [(w, plan.concurrency if w == 1 else (plan.sweep_concurrency,)) for w in plan.workers]
    result["levels"], result["sweep"], result["not_measured"], result["failed"] = [], [], [], []
    best: tuple[float, int] | None = None  # (img/s, workers) of the sweep
    with Clients(plan.client_processes, images.bodies) as clients:
        result["client_pids"] = list(clients.pids)
        for workers, levels in steps:
            needed = start_estimate() + plan.warmup_s + len(levels) * plan.seconds_per_level
            if clock.left < needed + 10:
                result["not_measured"].append(f"workers={workers} (time budget)")
                continue
            env = service_env(plan, workers)
            threads = env["VIT_SERVE_PREPROCESS_THREADS"]
            say(f"   workers={workers} (decode threads: {threads} per front end)")
            try:
                served = serve_levels(
                    repo,
                    model,
                    env,
                    levels,
                    plan,
                    clients,
                    workdir / f"service-workers{workers}.log",
                    ready_timeout_s=ready_within(needed),
                )
            except Exception as exc:  # reported; the steps measured and the rest still count
                result["failed"].append(f"workers={workers}: {type(exc).__name__}: {exc}")
                say(f"   failed: {result['failed'][-1]}")
                continue
            slowest_start = max(slowest_start or 0.0, served.start_s)
            if "placement" not in result:
                result["placement"] = {
                    k: served.models_entry.get(k)
                    for k in ("provider", "wanted_provider", "fallback", "placement")
                }
            (at_sweep,) = [
                lv for lv in served.levels if lv["concurrency"] == plan.sweep_concurrency
            ]
            result["sweep"].append(
                {**at_sweep, "service_env": served.env, "start_s": served.start_s}
            )
            if workers == 1:
                result["levels"] = served.levels
            if at_sweep["errors"] == at_sweep["lost"] == 0 and (
                best is None or at_sweep["img_per_s"] > best[0]
            ):
                best = (at_sweep["img_per_s"], workers)
        problem = gpu_decode_problem(plan)
        needed = start_estimate() + plan.warmup_s + plan.seconds_per_level
        if problem is None and clock.left < needed + 10:
            problem = "time budget"
        if problem is None:
            workers = best[1] if best is not None else max(plan.workers)
            env = {**service_env(plan, workers), "VIT_SERVE_DECODE": "gpu"}
            say(f"   VIT_SERVE_DECODE=gpu, workers={workers}")
            try:
                served = serve_levels(
                    repo,
                    model,
                    env,
                    (plan.sweep_concurrency,),
                    plan,
                    clients,
                    workdir / "service-gpu-decode.log",
                    ready_timeout_s=ready_within(needed),
                )
                result["gpu_decode"] = {
                    **served.levels[0],
                    "service_env": served.env,
                    "start_s": served.start_s,
                    "models_entry": {k: v for k, v in served.models_entry.items() if "decode" in k},
                }
            except Exception as exc:
                result["failed"].append(f"VIT_SERVE_DECODE=gpu: {type(exc).__name__}: {exc}")
                result["gpu_decode"] = {"failed": result["failed"][-1]}
        else:
            result["gpu_decode"] = {"skipped": problem}
    return result


def target_line(target: dict[str, Any]) -> str:
    """The sweep's target, met or not, in one line."""
    raw, batch = target["raw_fp16_best_img_per_s"], target["raw_fp16_best_batch"]
    head = (
        f"target: >= {TARGET_SHARE:.0%} of min(raw fp16 {raw or 0:,.0f} img/s at batch {batch}, "
        f"decode ceiling {target['decode_ceiling_img_per_s']:,.0f}) = "
        f"{target['bound_img_per_s']:,.0f} img/s at c={target['concurrency']}, 0 errors: "
    )
    if target["best_workers"] is None:
        return head + "missed (no level without errors)"
    return head + (
        f"{'met' if target['met'] else 'missed'}; best workers={target['best_workers']}, "
        f"{target['best_img_per_s']:,.0f} img/s = {target['best_share_of_limit']:.0%} of the min"
    )


def sweep_target(report: Report) -> dict[str, Any] | None:
    """Issue 23's target for the sweep: at the sweep's concurrency with 0 errors and 0 lost, at
    least 70% of min(raw fp16 at its best batch, the decode ceiling on the same photos)."""
    e2e = report.end_to_end
    if not e2e.get("sweep"):
        return None
    provider = e2e.get("placement", {}).get("provider")
    raw = [
        p
        for run in report.raw
        if run["precision"] == "fp16" and run["provider"] == provider
        for p in run.get("points", [])
    ]
    best_raw = max(raw, key=lambda p: p["img_per_s"], default=None)
    ceiling = float(e2e["decode"]["ceiling_img_per_s"])
    limits = [x for x in (best_raw["img_per_s"] if best_raw else 0.0, ceiling) if x > 0]
    limit = min(limits) if limits else 0.0
    bound = TARGET_SHARE * limit
    clean = [lv for lv in e2e["sweep"] if lv["errors"] == lv["lost"] == 0]
    best = max(clean, key=lambda lv: lv["img_per_s"], default=None)
    return {
        "concurrency": report.plan.sweep_concurrency,
        "raw_fp16_best_img_per_s": best_raw["img_per_s"] if best_raw else None,
        "raw_fp16_best_batch": best_raw["batch"] if best_raw else None,
        "decode_ceiling_img_per_s": ceiling,
        "limit_img_per_s": limit,
        "bound_img_per_s": round(bound, 1),
        "best_workers": best["workers"] if best else None,
        "best_img_per_s": best["img_per_s"] if best else None,
        "best_share_of_limit": round(best["img_per_s"] / limit, 3) if best and limit else None,
        "met": bool(best and limit and best["img_per_s"] >= bound),
    }


# --- the run -----------------------------------------------------------------------------------


@contextlib.contextmanager
def phase(report: Report, name: str) -> Iterator[None]:
    """A phase whose error is reported, not raised: the others still run."""
    started = time.monotonic()
    say(f"-- {name}")
    try:
        yield
    except Exception as exc:
        report.errors.append(f"{name}: {type(exc).__name__}: {exc}")
        say(f"   error: {type(exc).__name__}: {exc}")
        traceback.print_exc()
    finally:
        say(f"   ({time.monotonic() - started:.1f} s)")


def check(plan: Plan, workdir: Path, tensorrt: bool, photos: Path | None = None) -> Report:
    report = Report(plan)
    clock = Clock(plan.budget_s)
    cache = workdir / "trt_cache"
    with phase(report, "environment"):
        env = report.environment = environment()
        say(
            f"   Python {env['python']}, ONNX Runtime {env['onnxruntime']} (CUDA "
            f"{env['built_for_cuda']}), GPU {env['gpu']} (sm {env['compute_capability']}), "
            f"TensorRT {env['tensorrt']}"
        )
        for provider, libs in env["libraries"].items():
            say(f"   {provider}: {libs['problem'] or 'every library it links against loads'}")
    if not plan.smoke and (missing := gpu_missing(report.environment)) is not None:
        report.errors.append(f"no usable GPU: {missing}")
        return report
    use_tensorrt = tensorrt and not plan.smoke and tensorrt_usable(report.environment)
    repo = workdir / "repo"
    kits = {form: GraphKit(plan.size, form) for form in ("none", "fused", "fp16")}
    models: dict[str, str] = {}
    with phase(report, f"graphs: {plan.size}, random weights"):
        for form, kit in kits.items():
            models[form], _ = model_repository(kit, repo)

    with phase(report, "placement and parity against the CPU"):
        demo = plain_version(DEMO_REPO, DEMO_MODEL)
        cpu_demo = OnnxBackend(demo.graph_path, demo.spec, [CPU])
        sessions = [(f"{DEMO_MODEL} {plan.device}", DEMO_MODEL, plan.device, False)]
        if use_tensorrt:
            sessions.append((f"{DEMO_MODEL} TensorRT fp16", DEMO_MODEL, TENSORRT, True))
        # fp32 on CUDA both ways: the service's default (ONNX Runtime's TF32 matrix products)
        # and VIT_SERVE_CUDA_TF32=false (exact float32), each a session made as the service makes
        # it. The smoke run goes through both too; on a CPU the setting changes nothing.
        tf32_ways = (True, False)
        for label, model, provider, fp16 in sessions:
            for tf32 in (None,) if fp16 else tf32_ways:
                device = open_on(
                    DEMO_REPO, model, provider, cache, demo.version, cuda_tf32=tf32 is not False
                )
                if tf32 is not False:
                    report.placement[label] = placement_json(device.placement)
                report.parity += tf32_rows(
                    parity_of(
                        tf32_label(label, tf32),
                        device,
                        cpu_demo,
                        demo,
                        plan,
                        fp16,
                        ((8, 8), (5, 13), (12, 12)),
                    ),
                    tf32,
                )
                del device
        for form, fp16 in (("fused", False), ("fp16", True)):
            model = models[form]
            version = scan_repository(repo).resolve(model, None)
            reference = OnnxBackend(version.graph_path, version.spec, [CPU])
            label = f"{model} {plan.device}"
            for tf32 in (None,) if fp16 else tf32_ways:
                device = open_on(repo, model, plan.device, cache, cuda_tf32=tf32 is not False)
                if tf32 is not False:
                    report.placement[label] = placement_json(device.placement)
                rows = parity_of(tf32_label(label, tf32), device, reference, version, plan, fp16)
                report.parity += tf32_rows(rows, tf32)
                del device
            del reference
        for row in report.parity:
            say(
                f"   {row['graph']:<56} {row['grid']:>6}: max |diff| {row['max_abs_diff']:.2e} "
                f"(bound {row['bound']:.1e}), top-1 {row['top1_agree']}  "
                f"{'ok' if row['passed'] else 'FAILED'}"
            )
        for label, placed in report.placement.items():
            say(f"   {label}: runs on {placed['provider']}; nodes {placed['nodes']}")
        gc.collect()

    # Kept for the service end to end, which runs after CUDA: its 4 services of the sweep and the
    # GPU-decode one (see `end_to_end`).
    reserve_e2e = 0.0 if plan.smoke else 190.0
    with phase(report, f"raw throughput on {plan.device}"):
        for form, precision in (("fused", "fp32"), ("fp16", "fp16")):
            model = models[form]
            version = scan_repository(repo).resolve(model, None)
            started = time.perf_counter()
            backend = open_on(repo, model, plan.device, cache)
            points, left = sweep(backend, version, plan, clock, reserve_e2e)
            report.raw.append(
                {
                    "provider": backend.provider,
                    "precision": precision,
                    "graph": form,
                    "session_s": round(time.perf_counter() - started, 1),
                    "io_binding": backend.io_binding,
                    "points": points,
                    "not_measured": left,
                }
            )
            if left:
                report.skipped.append(f"{plan.device} {precision}: batches {left} (time budget)")
            for p in points:
                say(point_line(f"{backend.provider} {precision}", p))
            del backend
        gc.collect()

    with phase(report, "the service end to end"):
        if clock.left < 30:
            report.skipped.append("end to end (time budget)")
        else:
            report.end_to_end = end_to_end(repo, models["fp16"], plan, clock, workdir, photos)
            e2e = report.end_to_end
            if "placement" in e2e:
                placed = e2e["placement"]
                say(f"   service on {placed['provider']} ({placed['placement']})")
            report.skipped += [f"end to end {step}" for step in e2e["not_measured"]]
            report.errors += [f"end to end {step}" for step in e2e["failed"]]
            if "skipped" in e2e["gpu_decode"]:
                report.skipped.append(
                    f"end to end with VIT_SERVE_DECODE=gpu: {e2e['gpu_decode']['skipped']}"
                )
            e2e["target"] = sweep_target(report)
            if e2e["target"] is not None:
                say("   " + target_line(e2e["target"]))

    with phase(report, "the device decoder (bench.gpu_decode)"):
        problem = gpu_decode_problem(plan)
        if problem is not None and not plan.smoke:
            report.skipped.append(f"the device decoder: {problem}")
        elif clock.left < 30:
            report.skipped.append("the device decoder (time budget)")
        else:
            # The smoke run exercises the same code with the Pillow stand-in.
            decoded = gpu_decode.measure(plan.smoke, 0.5 if plan.smoke else 5.0, photos_limit(plan))
            report.device_decode = harness.plain(decoded)
            say(f"   {gpu_decode.summary(decoded)}")

    if use_tensorrt:
        with phase(report, "raw throughput on TensorRT (the service's own settings)"):
            for fp16 in (True, False):
                precision = "fp16" if fp16 else "fp32"
                if clock.left < 30:
                    report.skipped.append(f"TensorRT {precision} (time budget)")
                    continue
                out = run_tensorrt(repo, models["none"], fp16, plan, clock.left - 10, workdir)
                report.raw.append(
                    {"provider": TENSORRT, "precision": precision, "graph": "none", **out}
                )
                report.parity += out.get("parity", [])
                if "points" not in out:
                    say(f"   TensorRT {precision}: {out.get('skipped') or out.get('error')}")
                    continue
                say(f"   TensorRT {precision}: engine build and first run {out['build_s']} s")
                for p in out["points"]:
                    say(point_line(f"TensorRT {precision}", p))
    elif not plan.smoke:
        report.skipped.append(
            "TensorRT: "
            + (report.environment["libraries"].get(TENSORRT, {}).get("problem") or "--no-tensorrt")
        )
    report.seconds = clock.elapsed
    return report


# --- results -------------------------------------------------------------------------------------


def summary(report: Report) -> list[str]:
    """The figures a reader wants first."""
    machine = "CPU smoke run" if report.plan.smoke else report.environment.get("gpu")
    lines = [f"GPU check ({machine}) in {report.seconds:.0f} s"]
    if report.parity:
        failed = [f"{r['graph']} {r['grid']}" for r in report.parity if not r["passed"]]
        passed = len(report.parity) - len(failed)
        lines.append(
            f"parity: {passed}/{len(report.parity)} within bounds"
            + (f"; failed: {', '.join(failed)}" if failed else "")
        )
    best: dict[str, tuple[float, int]] = {}
    for run in report.raw:
        for p in run.get("points", []):
            key = f"{run['provider']} {run['precision']}"
            if p["img_per_s"] > best.get(key, (0.0, 0))[0]:
                best[key] = (p["img_per_s"], p["batch"])
    for key, (rate, batch) in best.items():
        lines.append(f"raw {key}: best {rate:,.0f} img/s at batch {batch}")
    lines += tf32_summary(report.parity)
    e2e = report.end_to_end
    target = e2e.get("target")
    limit = target["limit_img_per_s"] if target else 0.0

    def share(level: dict[str, Any]) -> str:
        return (
            f" = {level['img_per_s'] / limit:.0%} of min(raw fp16, decode ceiling)" if limit else ""
        )

    for level in e2e.get("levels", []):
        lines.append(
            f"service c={level['concurrency']} (workers=1): {level['img_per_s']:,.0f} img/s, "
            f"p50 {level['p50_ms']:.1f} ms, p99 {level['p99_ms']:.1f} ms{share(level)}"
        )
    for level in e2e.get("sweep", []):
        by_process = level["server_cpu_ms_per_image_by_process"] or {}
        lines.append(
            f"sweep workers={level['workers']} c={level['concurrency']}: "
            f"{level['img_per_s']:,.0f} img/s, p50 {level['p50_ms']:.1f} ms, "
            f"p99 {level['p99_ms']:.1f} ms, {level['errors']} errors, {level['lost']} lost"
            f"{share(level)}; CPU ms/img server {level['server_cpu_ms_per_image']} ("
            + ", ".join(f"{role} {ms:.2f}" for role, ms in by_process.items())
            + f"), client {level['client_cpu_ms_per_image']} "
            f"({level['client_processes']} processes, busiest {level['client_busiest_core']} "
            "of a core)"
        )
    decode_gpu = e2e.get("gpu_decode", {})
    if "img_per_s" in decode_gpu:
        lines.append(
            f"VIT_SERVE_DECODE=gpu workers={decode_gpu['workers']} c={decode_gpu['concurrency']}: "
            f"{decode_gpu['img_per_s']:,.0f} img/s, p50 {decode_gpu['p50_ms']:.1f} ms, "
            f"p99 {decode_gpu['p99_ms']:.1f} ms, {decode_gpu['errors']} errors"
        )
    if "decode" in e2e:
        lines.append(
            f"decode ceiling: {e2e['decode']['ceiling_img_per_s']:,.0f} img/s "
            f"({e2e['decode']['img_per_s_per_core']} per core) on {e2e['images']}"
        )
    if target:
        lines.append(target_line(target))
    decoder = report.device_decode
    if decoder:
        parity = decoder["parity"]
        runs = decoder["throughput"]
        speeds = ", ".join(f"{t['decoder']} {t['images_per_s']} img/s" for t in runs)
        lines.append(
            f"device decoder ({decoder['mode']}): patches against Pillow's mean "
            f"{parity['mean_abs']}, p99 {parity['p99_abs']} levels; {speeds}"
        )
    lines += [f"skipped: {s}" for s in report.skipped]
    lines += [f"error: {e}" for e in report.errors]
    return lines


def tf32_summary(parity: list[dict[str, Any]]) -> list[str]:
    """fp32 parity both ways, per graph: the largest difference with TF32 (the default) and with
    VIT_SERVE_CUDA_TF32=false."""
    lines = []
    graphs = dict.fromkeys(r["graph"] for r in parity if r.get("cuda_tf32") is True)
    for graph in graphs:
        on = [r for r in parity if r["graph"] == graph]
        off = [r for r in parity if r["graph"] == tf32_label(graph, False)]
        if not off:
            continue
        lines.append(
            f"fp32 {graph}: max |diff| {max(r['max_abs_diff'] for r in on):.1e} with TF32 "
            f"(default), {max(r['max_abs_diff'] for r in off):.1e} with "
            f"VIT_SERVE_CUDA_TF32=false (bound {on[0]['bound']:.0e})"
        )
    return lines


def draw(report: Report, path: Path) -> None:
    """One PNG: raw img/s against batch per provider and precision (left), the service's img/s
    at each concurrency against the raw best and the decode ceiling (right). Pillow only."""
    from PIL import Image, ImageDraw

    width, height, pad = 1000, 460, 50
    img = Image.new("RGB", (width, height), "white")
    d = ImageDraw.Draw(img)
    colours = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b"]
    title = "GPU check: " + (
        "CPU smoke run" if report.plan.smoke else str(report.environment.get("gpu"))
    )
    d.text((pad, 10), title, fill="black")
    series = [
        (f"{r['provider'].replace('ExecutionProvider', '')} {r['precision']}", r["points"])
        for r in report.raw
        if r.get("points")
    ]
    # Left: raw throughput, log2 batch on x.
    left = (pad, 40, width // 2 - 20, height - pad)
    top = max((p["img_per_s"] for _, pts in series for p in pts), default=1.0)
    batches = sorted({p["batch"] for _, pts in series for p in pts}) or [1]
    span = max(1.0, float(np.log2(max(batches))))

    def xy(batch: int, rate: float) -> tuple[float, float]:
        x = left[0] + (left[2] - left[0]) * (float(np.log2(batch)) / span)
        y = left[3] - (left[3] - left[1]) * rate / (top * 1.1)
        return x, y

    d.rectangle(left, outline="black")
    d.text((left[0], left[3] + 8), "batch (log2): " + ", ".join(map(str, batches)), fill="black")
    d.text((left[0] + 4, left[1] + 4), f"raw img/s (top {top:,.0f})", fill="black")
    for i, (name, pts) in enumerate(series):
        colour = colours[i % len(colours)]
        line = [xy(p["batch"], p["img_per_s"]) for p in pts]
        if len(line) > 1:
            d.line(line, fill=colour, width=2)
        for x, y in line:
            d.ellipse((x - 3, y - 3, x + 3, y + 3), fill=colour)
        d.text((left[2] - 110, left[1] + 8 + 14 * i), name, fill=colour)
    # Right: the service: workers=1 at each concurrency, then the rest of the workers sweep (and
    # GPU decoding where it ran), against the raw best, the decode ceiling and the target.
    right = (width // 2 + 20, 40, width - pad, height - pad)
    d.rectangle(right, outline="black")
    e2e = report.end_to_end
    bars = [(f"c={lv['concurrency']}", lv) for lv in e2e.get("levels", [])]
    bars += [(f"w={lv['workers']}", lv) for lv in e2e.get("sweep", []) if lv["workers"] != 1]
    if "img_per_s" in e2e.get("gpu_decode", {}):
        bars.append((f"gpu w={e2e['gpu_decode']['workers']}", e2e["gpu_decode"]))
    ceiling = float(e2e.get("decode", {}).get("ceiling_img_per_s", 0.0))
    best_fp16 = max(
        (
            p["img_per_s"]
            for r in report.raw
            if r["precision"] == "fp16"
            for p in r.get("points", [])
        ),
        default=0.0,
    )
    target = float((e2e.get("target") or {}).get("bound_img_per_s", 0.0))
    scale = max([ceiling, best_fp16, *(lv["img_per_s"] for _, lv in bars), 1.0]) * 1.1
    title = f"service img/s (c = workers=1; w = workers at c={report.plan.sweep_concurrency})"
    d.text((right[0] + 4, right[1] + 4), title, fill="black")
    for value, name, colour in (
        (best_fp16, "raw fp16 best", "#2ca02c"),
        (ceiling, "decode ceiling", "#d62728"),
        (target, f"target ({TARGET_SHARE:.0%} of the lower)", "#9467bd"),
    ):
        if value:
            y = right[3] - (right[3] - right[1]) * value / scale
            d.line((right[0], y, right[2], y), fill=colour, width=1)
            d.text((right[0] + 6, y - 14), f"{name} {value:,.0f}", fill=colour)
    bar = (right[2] - right[0]) / max(1, 2 * len(bars) + 1)
    for i, (name, level) in enumerate(bars):
        x0 = right[0] + bar * (2 * i + 1)
        y = right[3] - (right[3] - right[1]) * level["img_per_s"] / scale
        d.rectangle((x0, y, x0 + bar, right[3]), fill="#1f77b4")
        d.text(
            (x0, y - 28), f"{level['img_per_s']:,.0f}\np99 {level['p99_ms']:.0f} ms", fill="black"
        )
        d.text((x0, right[3] + 8), name, fill="black")
    img.save(path)


def write(report: Report, out: Path) -> tuple[Path, Path]:
    out.mkdir(parents=True, exist_ok=True)
    name = "gpu_check_smoke" if report.plan.smoke else "gpu_check"
    json_path, png_path = out / f"{name}.json", out / f"{name}.png"
    json_path.write_text(json.dumps(report.as_json(), indent=2, default=str) + "\n")
    draw(report, png_path)
    return json_path, png_path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--cpu-smoke", action="store_true", help="every phase on the CPU, tiny encoder")
    p.add_argument("--out", type=Path, default=RESULTS, help="where the JSON and PNG go")
    p.add_argument("--budget-s", type=float, default=None, help="default 330 (smoke: 150)")
    p.add_argument("--no-tensorrt", action="store_true", help="skip TensorRT even where it loads")
    p.add_argument(
        "--photos",
        type=Path,
        default=None,
        help="the shared photos' folder (default: $VIT_BENCH_PHOTOS, else "
        "../shared/testdata/photos)",
    )
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--worker-out", type=Path, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker is not None:  # the TensorRT subprocess
        a.worker_out.write_text(json.dumps(tensorrt_worker(json.loads(a.worker)), default=str))
        return 0
    plan = Plan.make(a.cpu_smoke, a.budget_s)
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        report = check(plan, Path(tmp), tensorrt=not a.no_tensorrt, photos=a.photos)
    json_path, png_path = write(report, a.out)
    say("")
    for line in summary(report):
        say(line)
    say(f"wrote {json_path} and {png_path}")
    if any(e.startswith("no usable GPU") for e in report.errors):
        return 2
    return 1 if report.errors else 0


if __name__ == "__main__":
    raise SystemExit(main())
