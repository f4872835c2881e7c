"""Raw ONNX Runtime throughput on a GPU: TensorRT (fp16) and CUDA, both through IO binding.

    .venv/bin/python -m bench.export_tiny --variant base --optimize none   # a ViT-B/16 at 224
    .venv/bin/python -m bench.gpu --repo build/bench_repo --model vit-b16
    .venv/bin/python -m bench.gpu                                          # the demo model

Each provider's session is made as the service makes it (`app.models.sessions.open_backend`:
TensorRT with one explicit profile covering every batch measured, engine and timing caches
under build/trt_cache; CUDA with its options), then img/s is measured at batch 1, 2, 4 ... 256
on the native grid: each batch size is run twice untimed, then as often as fits in
`--seconds` (at least 5 times); every run copies its logits back to the host, so each one is
complete when timed. The engine build (session creation plus the first run) is reported
apart. Figures are printed and written to bench/results/gpu_<model>.json. Where there is no
GPU it says so and exits (status 2). Nothing here asserts on time.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from app.core.settings import Settings
from app.models import runtime
from app.models.providers import CUDA, TENSORRT
from app.models.repository import ModelVersion, scan_repository
from app.models.runtime import OnnxBackend
from app.models.sessions import open_backend

ROOT = Path(__file__).resolve().parent.parent
BATCHES = [2**i for i in range(9)]  # 1 .. 256


def gpu_missing() -> str | None:
    """Why this machine cannot run the benchmark, or None."""
    if CUDA not in ort.get_available_providers():
        return "this ONNX Runtime build has no CUDA provider: install onnxruntime-gpu"
    if not runtime._cuda_driver_present():
        return "no NVIDIA driver (libcuda.so.1) on this machine: the GPU benchmark needs a GPU"
    return None


def gpu_name() -> str:
    if shutil.which("nvidia-smi") is None:
        return "unknown GPU"
    query = ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader", "--id=0"]
    return subprocess.run(query, capture_output=True, text=True, check=False).stdout.strip()


def backend(
    version: ModelVersion, provider: str, max_batch: int, fp16: bool, cache: Path
) -> tuple[OnnxBackend, float]:
    """A session as the service would make it for `provider`, built and run once; seconds."""
    arch = version.spec.architecture
    settings = Settings(
        model_repo=version.graph_path.parent.parent.parent,
        providers=[provider],
        max_batch_size=max_batch,
        # Room for every batch measured, whatever grid: the profile's batch is then max_batch.
        max_batch_tokens=max_batch * 4 * arch.native_tokens,
        trt_fp16=fp16,
        trt_cache_dir=cache,
    )
    start = time.perf_counter()
    made, _ = open_backend(settings, version)
    made.warm_up()  # TensorRT builds (or loads) its engine on the first run
    return made, time.perf_counter() - start


def throughput(made: OnnxBackend, batch: int, seconds: float) -> dict[str, float]:
    arch = made.spec.architecture
    rng = np.random.default_rng(batch)
    patches = rng.integers(0, 256, size=(batch, *arch.grid, arch.patch_dim), dtype=np.uint8)
    for _ in range(2):
        made.run(patches)
    runs = 0
    start = time.perf_counter()
    while runs < 5 or time.perf_counter() - start < seconds:
        made.run(patches)
        runs += 1
    elapsed = time.perf_counter() - start
    return {"img_per_s": batch * runs / elapsed, "ms_per_batch": 1000 * elapsed / runs}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--repo", type=Path, default=ROOT / "model_repo")
    p.add_argument("--model", default="demo-shapes")
    p.add_argument("--version", type=int, default=None)
    p.add_argument("--batches", type=int, nargs="+", default=BATCHES)
    p.add_argument("--seconds", type=float, default=2.0, help="per batch size and provider")
    p.add_argument("--no-fp16", action="store_true", help="TensorRT in float32")
    p.add_argument("--cache", type=Path, default=ROOT / "build" / "trt_cache")
    p.add_argument("--out", type=Path, default=None, help="default: bench/results/gpu_<model>.json")
    a = p.parse_args(argv)
    missing = gpu_missing()
    if missing is not None:
        print(f"bench.gpu: {missing}", file=sys.stderr)
        raise SystemExit(2)

    version = scan_repository(a.repo).resolve(a.model, a.version)
    files = version.spec.versions.get(version.version)
    form = files.optimization.level if files is not None else "none"
    providers = [TENSORRT, CUDA]
    if form != "none":
        print(f"graph form {form!r}: TensorRT cannot take it whole (export with --optimize none)")
        providers = [CUDA]
    grid = version.spec.architecture.grid
    print(f"{a.model} v{version.version} ({form}) on {gpu_name()}, grid {grid}")

    results: dict[str, Any] = {}
    for provider in providers:
        made, build_s = backend(version, provider, max(a.batches), not a.no_fp16, a.cache)
        if made.provider != provider:
            print(f"{provider}: not available here (the session runs on {made.provider}); skipped")
            continue
        print(f"{provider}: session and first run {build_s:.1f} s, io binding {made.io_binding}")
        points = {}
        for batch in a.batches:
            points[str(batch)] = throughput(made, batch, a.seconds)
            rate, ms = points[str(batch)]["img_per_s"], points[str(batch)]["ms_per_batch"]
            print(f"  batch {batch:4d}: {rate:9.1f} img/s  {ms:8.2f} ms")
        results[provider] = {
            "build_s": build_s,
            "fp16": (not a.no_fp16) if provider == TENSORRT else False,
            "io_binding": made.io_binding,
            "batches": points,
        }

    out = a.out or ROOT / "bench" / "results" / f"gpu_{a.model}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    record = {
        "model": a.model,
        "version": version.version,
        "graph": form,
        "grid": list(grid),
        "device": gpu_name(),
        "onnxruntime": ort.__version__,
        "python": platform.python_version(),
        "seconds_per_point": a.seconds,
        "providers": results,
    }
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
