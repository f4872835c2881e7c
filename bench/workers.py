"""One process against a supervisor with front-end processes and an engine process, side by side.

    .venv/bin/python -m bench.workers
    .venv/bin/python -m bench.workers --workers 2 --concurrency 16 64 --rounds 4
    .venv/bin/python -m bench.workers --repo build/int8/both --model vit-ti16

Both servers run this checkout over the same model repository, fed the same photos; each level
alternates between them in rounds and reports medians: img/s, latency percentiles and the CPU
per image of the whole server (every process of it). Writes bench/results/workers.json (or
workers_<model>.json).
"""

from __future__ import annotations

import argparse
import asyncio
from dataclasses import dataclass
from pathlib import Path

from bench.harness import (
    DEMO_MODEL,
    DEMO_REPO,
    RESULTS,
    LoadResult,
    load_images,
    run_levels,
    service,
    write_results,
)


@dataclass
class WorkersReport:
    model: str
    images: str
    workers: int
    levels: dict[str, list[LoadResult]]  # "one process" and "workers=N", level by level


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default=DEMO_MODEL)
    p.add_argument("--repo", type=Path, default=DEMO_REPO)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--concurrency", type=int, nargs="+", default=[16, 64])
    p.add_argument("--requests", type=int, default=100_000, help="per level and server, at most")
    p.add_argument("--max-seconds", type=float, default=15.0, help="per level and server")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--out", type=Path)
    a = p.parse_args(argv)
    images = load_images()
    print(f"{a.model}: one process against workers={a.workers}; {images.source}")
    split = {"VIT_SERVE_WORKERS": str(a.workers)}
    with (
        service(a.repo.resolve(), a.model, name="one process") as single,
        service(a.repo.resolve(), a.model, env=split, name=f"workers={a.workers}") as several,
    ):
        levels = asyncio.run(
            run_levels(
                [single.target(), several.target()],
                images.bodies,
                a.concurrency,
                a.requests,
                a.max_seconds,
                a.rounds,
            )
        )
    for one, many in zip(*levels.values(), strict=True):
        print(
            f"c={one.concurrency}: {one.img_per_s:.0f} -> {many.img_per_s:.0f} img/s "
            f"({many.img_per_s / one.img_per_s:.2f}x), p99 {one.latency_ms_p99:.0f} -> "
            f"{many.latency_ms_p99:.0f} ms, server CPU {one.server_cpu_ms_per_image} -> "
            f"{many.server_cpu_ms_per_image} ms/img"
        )
    report = WorkersReport(a.model, images.source, a.workers, levels)
    suffix = "" if a.model == DEMO_MODEL else f"_{a.model}"
    write_results(a.out or RESULTS / f"workers{suffix}.json", report)


if __name__ == "__main__":
    main()
