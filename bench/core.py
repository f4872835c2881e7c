"""The first benchmark: raw ONNX Runtime img/s of a graph, then the service at concurrency 1 and 16.

    .venv/bin/python -m bench.core
    .venv/bin/python -m bench.core --model demo-shapes --requests 400 --out bench/results/core.json

Raw: `session.run` at batch 1, 8 and 32 on the native grid, in this process. Service: img/s and
p50/p99 latency under the closed-loop client with the photos. Writes bench/results/core.json.
"""

from __future__ import annotations

import argparse
import asyncio
from dataclasses import dataclass
from pathlib import Path

import onnxruntime as ort

from bench.harness import (
    DEMO_MODEL,
    DEMO_REPO,
    RESULTS,
    LoadResult,
    RawResult,
    find_model,
    load_images,
    raw_throughput,
    run_levels,
    service,
    write_results,
)


@dataclass
class CoreReport:
    model: str
    version: int
    grid: tuple[int, int]
    images: str
    raw: list[RawResult]
    service: list[LoadResult]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--repo", type=Path, default=DEMO_REPO)
    p.add_argument("--model", default=DEMO_MODEL)
    p.add_argument("--requests", type=int, default=300, help="per concurrency level")
    p.add_argument("--raw-seconds", type=float, default=3.0, help="per batch size")
    p.add_argument("--out", type=Path, default=RESULTS / "core.json")
    a = p.parse_args(argv)

    model = find_model(a.repo, a.model)
    session = ort.InferenceSession(str(model.graph), providers=["CPUExecutionProvider"])
    raw = [raw_throughput(session, model.spec, b, a.raw_seconds) for b in (1, 8, 32)]
    del session
    for r in raw:
        print(
            f"raw onnxruntime  batch {r.batch:>2}: {r.img_per_s:8.1f} img/s "
            f"({r.ms_per_batch_p50:.2f} ms/batch)"
        )
    images = load_images()
    print(f"service load with {images.source}")
    with service(a.repo, a.model) as server:
        levels = asyncio.run(
            run_levels([server.target()], images.bodies, [1, 16], a.requests, 60, rounds=1)
        )
    report = CoreReport(
        a.model, model.version, model.spec.architecture.grid, images.source, raw, levels["service"]
    )
    write_results(a.out, report)


if __name__ == "__main__":
    main()
