"""The demo hybrid beside the demo ViT, and what the introspection outputs cost the rollout graph.

    .venv/bin/python -m bench.paper                  # about 3 minutes on 2 cores
    git show 3ba3cc1:model_repo/demo-shapes/1/model.rollout.onnx > build/old.rollout.onnx
    .venv/bin/python -m bench.paper --old-rollout build/old.rollout.onnx

1. Accuracy of each bundled model's default-version graph on the demo evaluation split (seed
   4242, 1000 images: `export.demo.evaluate`, the figure the README quotes).
2. CPU per image of each bundled version's model.onnx at batch 1 and 8, sessions as the
   service makes them (CPU provider, no spinning), in alternating rounds; the median of rounds.
3. With --old-rollout (a demo rollout graph exported before introspection): it against the
   current one, both fetching `logits` and `rollout` as the service's rollout path does.

Writes bench/results/paper.json. Nothing here asserts on time.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnxruntime as ort

from app.models.spec import GRAPH_FILENAME, ROLLOUT_GRAPH_FILENAME, SPEC_FILENAME, ModelSpec
from app.runtime.backends import open_session
from bench.harness import DEMO_REPO, RESULTS, batch_times, native_patches, write_results
from export.demo.evaluate import evaluate

MODELS = ("demo-shapes", "demo-shapes-hybrid")


@dataclass
class GraphCost:
    model: str
    version: int
    form: str
    batch: int
    cpu_ms_per_image: float
    ms_per_batch_p50: float


@dataclass
class Report:
    accuracy: dict[str, float] = field(default_factory=dict)  # model -> top-1 (1000 images)
    graphs: list[GraphCost] = field(default_factory=list)
    rollout: list[GraphCost] = field(default_factory=list)  # old and new rollout graphs


def _cost(
    session: ort.InferenceSession,
    feeds: Mapping[str, object],
    batch: int,
    seconds: float,
    outputs: list[str] | None = None,
) -> tuple[float, float]:
    """(CPU ms per image, median ms per batch) of `session.run`."""
    run_feeds = dict(feeds)
    batch_times(session, run_feeds, 0.0, min_runs=3)
    cpu0, times = time.process_time(), list[float]()
    stop = time.perf_counter() + seconds
    while time.perf_counter() < stop or len(times) < 5:
        t0 = time.perf_counter()
        session.run(outputs, run_feeds)
        times.append(time.perf_counter() - t0)
    cpu = (time.process_time() - cpu0) * 1e3 / (batch * len(times))
    return cpu, statistics.median(times) * 1e3


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--repo", type=Path, default=DEMO_REPO)
    p.add_argument("--seconds", type=float, default=3.0, help="per graph, batch and round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--old-rollout", type=Path, default=None)
    p.add_argument("--out", type=Path, default=RESULTS / "paper.json")
    args = p.parse_args(argv)
    report = Report()
    specs = {m: ModelSpec.load(args.repo / m / SPEC_FILENAME) for m in MODELS}
    for model in MODELS:
        report.accuracy[model] = evaluate(args.repo, model, 1000).top1
        print(f"{model}: top-1 {report.accuracy[model]:.4f} (1000 images)")
    sessions = {
        (m, v): open_session(args.repo / m / str(v) / GRAPH_FILENAME, ["CPUExecutionProvider"])[0]
        for m, spec in specs.items()
        for v in spec.versions
    }
    samples: dict[tuple[str, int, int], list[tuple[float, float]]] = {}
    for r in range(args.rounds):
        keys = list(sessions)
        keys = keys[r % len(keys) :] + keys[: r % len(keys)]  # rotate the order per round
        for m, v in keys:
            for batch in (1, 8):
                feeds = {"patches": native_patches(specs[m], batch)}
                samples.setdefault((m, v, batch), []).append(
                    _cost(sessions[(m, v)], feeds, batch, args.seconds)
                )
    for (m, v, batch), got in samples.items():
        cost = GraphCost(
            m,
            v,
            specs[m].versions[v].optimization.level,
            batch,
            statistics.median(c for c, _ in got),
            statistics.median(t for _, t in got),
        )
        report.graphs.append(cost)
        print(cost)
    if args.old_rollout is not None:
        spec = specs["demo-shapes"]
        graphs = {
            "before introspection": args.old_rollout,
            "with introspection outputs": args.repo / "demo-shapes" / "1" / ROLLOUT_GRAPH_FILENAME,
        }
        opened = {k: open_session(g, ["CPUExecutionProvider"])[0] for k, g in graphs.items()}
        costs: dict[tuple[str, int], list[tuple[float, float]]] = {}
        for r in range(args.rounds):
            order = list(opened) if r % 2 == 0 else list(reversed(opened))
            for name in order:
                for batch in (1, 8):
                    feeds = {
                        "patches": native_patches(spec, batch),
                        "head_fusion": np.array(0, np.int64),
                        "discard_ratio": np.array(0.0, np.float32),
                    }
                    costs.setdefault((name, batch), []).append(
                        _cost(opened[name], feeds, batch, args.seconds, ["logits", "rollout"])
                    )
        for (name, batch), got in costs.items():
            cost = GraphCost(
                "demo-shapes",
                1,
                name,
                batch,
                statistics.median(c for c, _ in got),
                statistics.median(t for _, t in got),
            )
            report.rollout.append(cost)
            print(cost)
    write_results(args.out, report)


if __name__ == "__main__":
    main()
