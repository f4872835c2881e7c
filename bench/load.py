"""The service against the raw graph's limit and the naive server, side by side, in one run.

    .venv/bin/python -m bench.load                    # the demo model, about 4 minutes
    .venv/bin/python -m bench.load --repo build/bench_repo --model vit-ti16 --soak-minutes 10

Raw `session.run` at batch 1..64 (before and after the servers), then both servers at each
concurrency in alternating rounds (figures: medians), then an optional soak. Writes
bench/results/load_<model>.json and a PNG plot beside it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import onnxruntime as ort

from app.models.spec import ModelSpec
from bench.harness import (
    DEMO_MODEL,
    DEMO_REPO,
    RESULTS,
    LoadResult,
    RawResult,
    Target,
    closed_loop,
    find_model,
    load_images,
    naive_server,
    raw_throughput,
    rss_bytes,
    run_levels,
    service,
    write_results,
)

CONCURRENCY = (1, 4, 16, 64)
RAW_BATCHES = (1, 4, 8, 16, 32, 64)


@dataclass
class SweptRaw(RawResult):
    spinning: bool
    when: str  # "before" or "after" the servers ran


def raw_sweep(graph: Path, spec: ModelSpec, seconds: float, when: str) -> list[SweptRaw]:
    """Every batch size, with ORT's threads spinning between runs and without (the service's
    default): alone on a machine spinning is a little faster, beside other work much slower;
    the machine's limit is the better of the two."""
    results = []
    for spinning in (True, False):
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.add_session_config_entry(
            "session.intra_op.allow_spinning", "1" if spinning else "0"
        )
        session = ort.InferenceSession(str(graph), options, providers=["CPUExecutionProvider"])
        for batch in RAW_BATCHES:
            r = SweptRaw(
                **vars(raw_throughput(session, spec, batch, seconds)), spinning=spinning, when=when
            )
            results.append(r)
            print(
                f"    raw ({when}, spinning {'on ' if spinning else 'off'}) batch {batch:>2}: "
                f"{r.img_per_s:8.1f} img/s ({r.ms_per_batch_p50:.2f} ms, "
                f"{r.cpu_ms_per_image:.2f} ms CPU per image)"
            )
    return results


@dataclass
class Soak:
    minutes: float
    concurrency: int
    load: LoadResult
    rss_mib_first: float
    rss_mib_settled_start: float
    rss_mib_end: float
    rss_mib_max: float
    rss_growth_pct: float
    lost: int
    non_200: int
    rss_samples: list[tuple[float, float]]  # seconds, MiB


async def soak(target: Target, images: list[bytes], minutes: float, concurrency: int) -> Soak:
    """Saturate for `minutes`, sampling RSS every few seconds; RSS growth and requests lost."""
    assert target.pid is not None
    seconds = minutes * 60
    samples: list[tuple[float, int]] = []
    t0 = time.monotonic()
    task = asyncio.create_task(closed_loop(target, images, concurrency, 10**9, seconds))
    while not task.done():
        samples.append((round(time.monotonic() - t0, 1), rss_bytes(target.pid)))
        await asyncio.wait({task}, timeout=5)
    result = task.result()
    # The first samples include the arena growing to its working set: start after 10% of the run.
    settled = [rss for t, rss in samples if t >= 0.1 * seconds] or [rss for _, rss in samples]
    start, end = statistics.median(settled[:3]), statistics.median(settled[-3:])
    found = Soak(
        minutes=minutes,
        concurrency=concurrency,
        load=result,
        rss_mib_first=round(samples[0][1] / 2**20, 1),
        rss_mib_settled_start=round(start / 2**20, 1),
        rss_mib_end=round(end / 2**20, 1),
        rss_mib_max=round(max(rss for _, rss in samples) / 2**20, 1),
        rss_growth_pct=round(100 * (end - start) / start, 2),
        lost=result.lost,
        non_200=result.errors,
        rss_samples=[(t, round(rss / 2**20, 1)) for t, rss in samples],
    )
    print(
        f"soak {minutes} min at concurrency {concurrency}: {result.img_per_s:.1f} img/s, "
        f"RSS {found.rss_mib_settled_start} -> {found.rss_mib_end} MiB "
        f"({found.rss_growth_pct:+.2f}%), {result.lost} lost, {result.errors} non-200"
    )
    return found


def plot(path: Path, model: str, results: list[LoadResult], raw_limit: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_tp, ax_p99) = plt.subplots(1, 2, figsize=(11, 4.2))
    for server, marker in (("service", "o"), ("naive", "s")):
        rows = [r for r in results if r.server == server]
        if not rows:
            continue
        xs = [r.concurrency for r in rows]
        ax_tp.plot(xs, [r.img_per_s for r in rows], marker=marker, label=server)
        ax_p99.plot(xs, [r.latency_ms_p99 for r in rows], marker=marker, label=server)
    ax_tp.axhline(raw_limit, color="grey", linestyle="--", label="raw ONNX Runtime limit")
    for ax, label in ((ax_tp, "images / s"), (ax_p99, "p99 latency (ms)")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(list(CONCURRENCY), [str(c) for c in CONCURRENCY])
        ax.set_xlabel("concurrent clients")
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
        ax.legend()
    ax_p99.set_yscale("log")
    fig.suptitle(f"{model}: throughput and p99 against concurrency ({os.cpu_count()} CPUs)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


@dataclass
class Goal:
    """One of the issue's targets: the figure beside its bound (reported, never asserted)."""

    value: float | list[float]
    target: str


def goals(raw: list[SweptRaw], by: dict[tuple[str, int], LoadResult]) -> dict[str, Goal]:
    limit = max(r.img_per_s for r in raw)
    single_ms = min(r.ms_per_batch_p50 for r in raw if r.batch == 1)
    found: dict[str, Goal] = {}
    if s64 := by.get(("service", 64)):
        found["c64_throughput_vs_raw_limit"] = Goal(round(s64.img_per_s / limit, 3), ">= 0.95")
    if s1 := by.get(("service", 1)):
        found["c1_p50_minus_raw_single_ms"] = Goal(
            round(s1.latency_ms_p50 - single_ms, 2), "<= 2.0"
        )
    s16, n16 = by.get(("service", 16)), by.get(("naive", 16))
    if s16 and n16:
        found["c16_throughput_vs_naive"] = Goal(round(s16.img_per_s / n16.img_per_s, 2), ">= 1.2")
        found["c16_p99_ms_service_vs_naive"] = Goal(
            [round(s16.latency_ms_p99, 1), round(n16.latency_ms_p99, 1)], "service lower"
        )
    return found


@dataclass
class CpuSplit:
    """CPU ms per answered image at a server's highest concurrency."""

    server: float | None
    event_loop: float | None
    client: float | None


def cpu_use(limit: SweptRaw, levels: dict[str, list[LoadResult]]) -> dict[str, float | CpuSplit]:
    """Where the cores go per image: the raw limit spends them on inference alone; the servers
    also on HTTP, decoding and resizing, and share them with the client. With every core busy,
    throughput is about cores / CPU per image."""
    found: dict[str, float | CpuSplit] = {"raw_limit": round(limit.cpu_ms_per_image, 3)}
    for results in levels.values():
        if results:
            r = max(results, key=lambda r: r.concurrency)
            found[f"{r.server}_c{r.concurrency}"] = CpuSplit(
                r.server_cpu_ms_per_image,
                r.event_loop_cpu_ms_per_image,
                r.client_cpu_ms_per_image,
            )
    return found


@dataclass
class LoadReport:
    model: str
    version: int
    grid: tuple[int, int]
    images: str
    raw: list[SweptRaw]
    raw_limit: SweptRaw
    raw_single_image_ms: float
    service: list[LoadResult]
    naive: list[LoadResult]
    soak: Soak | None
    service_env: list[str]
    targets: dict[str, Goal]
    cpu_ms_per_image: dict[str, float | CpuSplit]
    plot: Path


async def bench_servers(
    a: argparse.Namespace, images: list[bytes]
) -> tuple[dict[str, list[LoadResult]], Soak | None]:
    """Both servers run at once (the idle one costs nothing), each level alternating between
    them; then, with `--soak-minutes`, the service alone at the highest concurrency."""
    env = dict(setting.split("=", 1) for setting in a.service_env)
    with contextlib.ExitStack() as stack:
        servers = [stack.enter_context(service(a.repo, a.model, env))]
        if not a.skip_naive:
            servers.append(stack.enter_context(naive_server(a.repo, a.model)))
        targets = [s.target() for s in servers]
        levels = await run_levels(
            targets, images, a.concurrency, a.requests, a.max_seconds, a.rounds
        )
        found = None
        if a.soak_minutes > 0:
            soaking = Target("soak", targets[0].port, targets[0].path, targets[0].pid)
            found = await soak(soaking, images, a.soak_minutes, max(a.concurrency))
    return {"service": [], "naive": [], **levels}, found


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--repo", type=Path, default=DEMO_REPO)
    p.add_argument("--model", default=DEMO_MODEL)
    p.add_argument("--concurrency", type=int, nargs="+", default=list(CONCURRENCY))
    p.add_argument("--requests", type=int, default=2000, help="per level (bounded by time too)")
    p.add_argument("--max-seconds", type=float, default=20.0, help="per level and server")
    p.add_argument(
        "--rounds", type=int, default=4, help="per level: alternating rounds, medians reported"
    )
    p.add_argument("--raw-seconds", type=float, default=3.0, help="per batch size")
    p.add_argument("--skip-naive", action="store_true")
    p.add_argument(
        "--service-env",
        nargs="*",
        default=[],
        metavar="NAME=VALUE",
        help="settings for the service, e.g. VIT_SERVE_RUNTIME_INSTANCES=2 "
        "VIT_SERVE_INTRA_OP_THREADS=1 (one single-threaded session per core)",
    )
    p.add_argument("--soak-minutes", type=float, default=0.0, help="0: no soak")
    p.add_argument("--out", type=Path, help="default: bench/results/load_<model>.json")
    a = p.parse_args(argv)
    out = a.out or RESULTS / f"load_{a.model}.json"

    model = find_model(a.repo, a.model)
    # The service's session options (ORT_ENABLE_ALL, ORT's default thread count), before the
    # servers run and again after: other work on the machine shows as a difference.
    raw = raw_sweep(model.graph, model.spec, a.raw_seconds, "before")
    images = load_images()
    print(f"load with {images.source}")
    levels, soaked = asyncio.run(bench_servers(a, images.bodies))
    raw += raw_sweep(model.graph, model.spec, a.raw_seconds, "after")
    best = max(raw, key=lambda r: r.img_per_s)
    by = {(r.server, r.concurrency): r for results in levels.values() for r in results}
    found = goals(raw, by)
    for name, goal in found.items():
        print(f"target {name}: {goal.value} (target {goal.target})")
    cpu = cpu_use(best, levels)
    print(f"CPU ms per image: {cpu}")
    png = out.with_suffix(".png")
    out.parent.mkdir(parents=True, exist_ok=True)
    plot(png, a.model, [*levels["service"], *levels["naive"]], best.img_per_s)
    report = LoadReport(
        model=a.model,
        version=model.version,
        grid=model.spec.architecture.grid,
        images=images.source,
        raw=raw,
        raw_limit=best,
        raw_single_image_ms=min(r.ms_per_batch_p50 for r in raw if r.batch == 1),
        service=levels["service"],
        naive=levels["naive"],
        soak=soaked,
        service_env=a.service_env,
        targets=found,
        cpu_ms_per_image=cpu,
        plot=png,
    )
    write_results(out, report)
    print(f"plotted {png}")


if __name__ == "__main__":
    main()
