"""The service on the simulated H200 (`VIT_SERVE_SIMULATED_CURVE`): what it costs the CPU per
image when the accelerator is not the limit, measured on a machine without a GPU.

    .venv/bin/python -m bench.simulated
    .venv/bin/python -m bench.simulated --seconds 30 --rounds 3

`python -m app.server` serves ViT-B/16 fp16 (bench/gpu_graphs' kit: its real model.json and
graph, checked by sha256 as usual, its weights left out because the graph is never run) with
every batch a sleep on the H200's measured fp16 curve (`bench/results/gpu_check.json`, "raw").
The shared photos are posted one per request at concurrency 64 and 256 (`bench.harness`); each
level's figures are the median of its rounds: img/s, p50, p99, the server's CPU per image in
all and by thread group, and beside them decode + resize + patchify on one core (the part of the
CPU per image no process layout removes) and what the simulated accelerator could have done at
the batches the service formed. Results: bench/results/simulated.json.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from app.models.repository import scan_repository
from app.models.spec import GRAPH_FILENAME, SPEC_FILENAME
from app.runtime.simulated import SIMULATED, BatchCurve
from bench import harness
from bench.gpu_check import decode_ceiling
from bench.gpu_graphs import GraphKit, spec_of

CURVE = harness.RESULTS / "gpu_check.json"
KIT = GraphKit("vit-b16", "fp16")  # what gpu_check's end-to-end phase served on the H200
CONCURRENCY = (64, 256)


@dataclass
class SimulatedReport:
    curve: str
    model: str
    images: str
    service_env: dict[str, str]
    provider: str  # as GET /models reports it
    # Decode + resize + patchify (crop) on one core, as the service does it: CPU ms an image.
    decode_ms_per_image: float
    levels: list[harness.LoadResult]
    # Per level: what the simulated accelerator alone could do at the mean batch the service
    # formed (batch / the curve's time for it), so that its figures are not the accelerator's.
    accelerator_img_per_s_at_mean_batch: list[float | None]
    # Per level: the server's CPU per image beyond decoding (server - decode_ms_per_image).
    cpu_ms_per_image_beyond_decode: list[float | None]


def simulated_repository(root: Path) -> str:
    """A model repository at `root` with the kit's graph and model.json and no weights."""
    folder = root / KIT.name / "1"
    folder.mkdir(parents=True)
    shutil.copyfile(KIT.skeleton, folder / GRAPH_FILENAME)
    digest = hashlib.sha256((folder / GRAPH_FILENAME).read_bytes()).hexdigest()
    spec_of(KIT, KIT.name, digest).dump(root / KIT.name / SPEC_FILENAME)
    return KIT.name


def run(seconds: float, rounds: int, workers: int = 1) -> SimulatedReport:
    images = harness.load_images(100)
    curve = BatchCurve.load(CURVE)
    cores = os.cpu_count() or 1
    env = {
        "VIT_SERVE_SIMULATED_CURVE": str(CURVE),
        # The GPU's batch budget: the service sees no GPU provider, so it would pick the CPU's.
        "VIT_SERVE_MAX_BATCH_TOKENS": "8192",
        # As gpu_check served it: decoding on all cores but two (at least 2), room to queue 256.
        "VIT_SERVE_PREPROCESS_THREADS": str(max(2, cores - 2)),
        "VIT_SERVE_MAX_QUEUE_IMAGES": "512",
        "VIT_SERVE_WORKERS": str(workers),
    }
    if workers > 1:  # the decoding threads shared out over the front ends
        env["VIT_SERVE_PREPROCESS_THREADS"] = str(max(1, (cores - 2) // workers))
    with tempfile.TemporaryDirectory() as tmp:
        repo = Path(tmp)
        model = simulated_repository(repo)
        version = scan_repository(repo).resolve(model, None)
        decode = decode_ceiling(images.bodies, version, 3.0)
        with harness.service(repo, model, env=env, log=repo / "service.log") as server:
            listed = json.loads(asyncio.run(harness.get(server.port, "/models")).body)
            (info,) = [m for m in listed["models"] if m["name"] == model]
            if info["provider"] != SIMULATED:
                raise RuntimeError(f"the service runs {model} on {info['provider']}")
            results = asyncio.run(
                harness.run_levels(
                    [server.target("simulated")],
                    images.bodies,
                    CONCURRENCY,
                    10**9,
                    seconds,
                    rounds,
                )
            )
    levels = results["simulated"]
    decode_ms = round(1e3 / decode["img_per_s_per_core"], 3)

    def accelerator(level: harness.LoadResult) -> float | None:
        if level.mean_batch_size is None:
            return None
        batch = max(1, round(level.mean_batch_size))
        return round(batch / curve.seconds(batch), 1)

    def beyond(level: harness.LoadResult) -> float | None:
        cpu = level.server_cpu_ms_per_image
        return None if cpu is None else round(cpu - decode_ms, 3)

    return SimulatedReport(
        curve=harness.shown(CURVE) + ' ("raw", fp16)',
        model=f"{model} (ViT-B/16 at 224 px, 196 tokens; its graph not run)",
        images=images.source,
        service_env={
            k: v if k != "VIT_SERVE_SIMULATED_CURVE" else harness.shown(CURVE)
            for k, v in env.items()
        },
        provider=info["provider"],
        decode_ms_per_image=decode_ms,
        levels=levels,
        accelerator_img_per_s_at_mean_batch=[accelerator(level) for level in levels],
        cpu_ms_per_image_beyond_decode=[beyond(level) for level in levels],
    )


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--seconds", type=float, default=40.0, help="per level, all rounds")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--workers", type=int, default=1, help="front-end processes (1: one process)")
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    report = run(args.seconds, args.rounds, args.workers)
    out = args.out or harness.RESULTS / (
        "simulated.json" if args.workers == 1 else f"simulated_workers{args.workers}.json"
    )
    print(f"decode + resize + patchify: {report.decode_ms_per_image} ms of CPU an image")
    for level, ceiling, beyond in zip(
        report.levels,
        report.accelerator_img_per_s_at_mean_batch,
        report.cpu_ms_per_image_beyond_decode,
        strict=True,
    ):
        print(
            f"c={level.concurrency}: the accelerator alone {ceiling} img/s at the mean batch; "
            f"server CPU beyond decoding {beyond} ms an image; by process "
            f"{level.server_cpu_ms_per_image_by_process}"
        )
    extra: dict[str, Any] = {"note": "a shared 2-core machine: figures are medians of rounds"}
    harness.write_results(out, report, extra)


if __name__ == "__main__":
    main()
