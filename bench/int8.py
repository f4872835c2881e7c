"""int8 against fused fp32 on a CPU, side by side in one run: the quantisation methods, raw
img/s, accuracy, and the service serving int8 against the naive server serving fp32.

    .venv/bin/python -m bench.int8                      # both models, about 12 minutes
    .venv/bin/python -m bench.int8 --models demo-shapes --no-serve
    .venv/bin/python -m bench.int8 --serve-only --serve-seconds 20 --serve-rounds 2  # ~5 min

For each model (ViT-Ti/16 at 224 with random weights, head N(0, 0.1); the trained demo model
from export/demo/checkpoint.pt) it writes, under build/int8/:
- `fp32/<model>`: version 1, the fused fp32 graph (`python -m export --optimize fused`);
- `both/<model>`: the same version 1 and version 2, int8 (`--optimize int8`: the demo model
  through the export's accuracy gate; ViT-Ti's random weights have no accuracy to keep, so its
  int8 graph is made by the same `export.quantize.quantize` and its gate figures only recorded).

Then, per model:
1. methods: the fused fp32 graph and every int8 method tried (dynamic with QAttention per
   tensor: the export's; per channel; MatMul only; static QDQ calibrated on held-apart inputs,
   per tensor and per channel), each against fp32 on held-out inputs (demo: accuracy on the
   evaluation split, seed 4242, 1000 images; ViT-Ti: top-1 agreement on 50 photos the static
   calibration did not see) and raw img/s at batch 1, 8 and 32 in alternating rounds (their
   order rotating; figures: the median over rounds, ratios: the median of per-round ratios to
   fp32), sessions made as the service makes them;
2. serving (unless --no-serve): the service over `both/` (its default version is the int8 one,
   version 2; version 1 is asked for as a third target) against the naive server over `fp32/`
   at concurrency 16 and 64, in alternating rounds (bench.harness), with each server's CPU per
   image;
3. CPU per image against the raw graph at the service's mean batch plus one image's decode,
   resize and patchify (the 100 photos through `app.pipeline.preprocess.prepare`, one thread).

Writes bench/results/int8.json. Nothing here asserts on time.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from numpy.typing import NDArray

from app.core.settings import Settings
from app.models.repository import sha256_of
from app.models.spec import (
    GRAPH_FILENAME,
    ROLLOUT_GRAPH_FILENAME,
    SPEC_FILENAME,
    GraphFiles,
    GraphOptimization,
    ModelSpec,
    Preprocess,
    Source,
)
from app.pipeline.preprocess import prepare
from app.runtime.backends import CPU, open_session
from bench.harness import (
    PHOTOS,
    RESULTS,
    LoadResult,
    batch_times,
    load_images,
    naive_server,
    native_patches,
    run_levels,
    service,
    write_results,
)
from bench.optimize import demo_model, ti16_model
from export.demo.evaluate import EVAL_SEED
from export.demo.shapes import generate
from export.onnx_export import export_to_repository
from export.quantize import (
    DEFAULT_METHOD,
    Gate,
    HeldOut,
    Int8Method,
    demo_held_out,
    int8_op_counts,
    measure_gate,
    photo_held_out,
    quantize,
)
from export.vit import VisionTransformer

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / "build" / "int8"
MODELS = ("vit-ti16", "demo-shapes")
FP32 = "fp32 fused"
CHOSEN = "int8 dynamic, QAttention, per tensor (export)"
# Every method tried: name -> how its graph is made from the fused fp32 graph.
DYNAMIC_METHODS = {
    CHOSEN: DEFAULT_METHOD,
    "int8 dynamic, QAttention, per channel": Int8Method(per_channel=True),
    "int8 dynamic, MatMul only": Int8Method(attention=False),
}
SOURCE = Source(framework="vit-serve", notes="bench.int8")
STATIC_METHODS = {
    "int8 static QDQ, per tensor": False,
    "int8 static QDQ, per channel": True,
}


@dataclass
class Accuracy:
    method: str
    held_out: str
    top1_agreement: float
    max_abs_logit_diff: float
    accuracy: float | None  # labelled inputs only
    accuracy_fp32: float | None
    graph_mb: float
    int8_ops: dict[str, int]


@dataclass
class RawForm:
    method: str
    batch: int
    img_per_s: float  # median over rounds
    ms_per_batch: float
    speedup: float  # median over rounds of (this / fp32)
    cpu_ms_per_image: float  # this process's CPU (every ORT thread) per image, median


@dataclass
class CpuBudget:
    """A server's CPU per image against what the work itself costs."""

    server: str
    concurrency: int
    server_cpu_ms_per_image: float | None
    mean_batch: float
    raw_cpu_ms_per_image: float  # its graph alone at that batch
    preprocess_ms_per_image: float
    ratio: float | None  # server / (raw + preprocess): 1.05 is the target
    # The server's CPU per image by thread group (bench.harness.THREAD_GROUPS): its inference
    # threads against `raw_cpu_ms_per_image`, its preprocessing threads against
    # `preprocess_ms_per_image`, the event loop and the rest against nothing.
    by_group: dict[str, float] | None = None


@dataclass
class ModelReport:
    model: str
    weights: str
    grid: tuple[int, int]
    accuracy: list[Accuracy]
    raw: list[RawForm]
    serving: list[LoadResult] = field(default_factory=list)
    cpu: list[CpuBudget] = field(default_factory=list)
    targets: dict[str, float | None] = field(default_factory=dict)


@dataclass
class Report:
    method: dict[str, object]
    models: list[ModelReport]
    tables: dict[str, str]


# --- the two repositories -------------------------------------------------------------------


def _labels_and_preprocess(name: str, model: VisionTransformer) -> tuple[list[str], Preprocess]:
    if name == "demo-shapes":
        bundled = ModelSpec.load(ROOT / "model_repo" / name / SPEC_FILENAME)
        return bundled.labels, bundled.preprocess
    return [f"class_{i}" for i in range(model.cfg.num_classes)], Preprocess()


def export_fp32(name: str, model: VisionTransformer) -> ModelSpec:
    """fp32/<name>: version 1, the fused fp32 graph (kept from an earlier run)."""
    spec_path = WORK / "fp32" / name / SPEC_FILENAME
    if not spec_path.exists():
        labels, preprocess = _labels_and_preprocess(name, model)
        export_to_repository(
            model, WORK / "fp32", name, labels, preprocess, SOURCE, optimize="fused"
        )
    return ModelSpec.load(spec_path)


def add_int8(name: str, model: VisionTransformer, held_out: HeldOut, gated: bool) -> None:
    """both/<name>: fp32's version 1 and version 2, int8 (kept from an earlier run)."""
    fp32, both = WORK / "fp32" / name, WORK / "both" / name
    if (both / SPEC_FILENAME).exists() and 2 in ModelSpec.load(both / SPEC_FILENAME).versions:
        return
    shutil.rmtree(both, ignore_errors=True)
    shutil.copytree(fp32, both)
    if gated:  # as `python -m export --optimize int8` does it, gate and all
        labels, preprocess = _labels_and_preprocess(name, model)
        export_to_repository(
            model, both.parent, name, labels, preprocess, SOURCE, optimize="int8", held_out=held_out
        )
        return
    # Random weights have no accuracy to keep: the same quantiser, its gate figures recorded.
    fused, int8 = both / "1" / GRAPH_FILENAME, both / "2" / GRAPH_FILENAME
    int8.parent.mkdir()
    quantize(fused, int8)
    shutil.copy(both / "1" / ROLLOUT_GRAPH_FILENAME, both / "2" / ROLLOUT_GRAPH_FILENAME)
    spec = ModelSpec.load(both / SPEC_FILENAME)
    record = measure_gate(fused, int8, held_out, Gate(), DEFAULT_METHOD.describe())
    v1 = spec.versions[1]
    v2 = GraphFiles(
        model=sha256_of(int8),
        rollout=v1.rollout,
        optimization=GraphOptimization(
            level="int8",
            fused_ops=int8_op_counts(int8),
            class_token_tail=v1.optimization.class_token_tail,
            max_abs_diff=record.max_abs_logit_diff,
            int8=record,
        ),
    )
    spec.model_copy(update={"versions": {**spec.versions, 2: v2}}).dump(both / SPEC_FILENAME)


# --- methods: accuracy and raw speed --------------------------------------------------------


class _Reader:
    """quantize_static's calibration data: batches of 8."""

    def __init__(self, patches: NDArray[np.uint8]) -> None:
        self._batches = iter([{"patches": patches[i : i + 8]} for i in range(0, len(patches), 8)])

    def get_next(self) -> dict[str, NDArray[np.uint8]] | None:
        return next(self._batches, None)


def quantize_static_qdq(
    fused: Path, dst: Path, calibration: NDArray[np.uint8], per_channel: bool
) -> None:
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    quantize_static(
        str(fused),
        str(dst),
        _Reader(calibration),
        quant_format=QuantFormat.QDQ,
        op_types_to_quantize=["MatMul"],
        per_channel=per_channel,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
    )


def method_graphs(fused: Path, folder: Path, calibration: NDArray[np.uint8]) -> dict[str, Path]:
    graphs = {FP32: fused}
    folder.mkdir(parents=True, exist_ok=True)
    for i, (name, method) in enumerate(DYNAMIC_METHODS.items()):
        graphs[name] = folder / f"dynamic{i}.onnx"
        if not graphs[name].exists():
            quantize(fused, graphs[name], method)
    for i, (name, per_channel) in enumerate(STATIC_METHODS.items()):
        graphs[name] = folder / f"static{i}.onnx"
        if not graphs[name].exists():
            quantize_static_qdq(fused, graphs[name], calibration, per_channel)
    return graphs


def accuracy(graphs: dict[str, Path], held_out: HeldOut) -> list[Accuracy]:
    out = []
    for name, graph in graphs.items():
        r = measure_gate(graphs[FP32], graph, held_out, Gate(), name)
        ops = {**int8_op_counts(graph), **_count(graph, ("QuantizeLinear", "DequantizeLinear"))}
        out.append(
            Accuracy(
                name,
                held_out.description,
                r.top1_agreement,
                r.max_abs_logit_diff,
                r.accuracy_int8,
                r.accuracy_fp32,
                round(graph.stat().st_size / 2**20, 2),
                {k: v for k, v in ops.items() if k not in ("LayerNormalization", "BiasGelu")},
            )
        )
        print(
            f"  {name}: agreement {r.top1_agreement:.3f}, max |diff| {r.max_abs_logit_diff:.3f}"
            + (
                f", accuracy {r.accuracy_int8:.4f} (fp32 {r.accuracy_fp32:.4f})"
                if r.accuracy_int8 is not None and r.accuracy_fp32 is not None
                else ""
            ),
            flush=True,
        )
    return out


def _patchify(images: NDArray[np.uint8], patch: int) -> NDArray[np.uint8]:
    n, h, w, c = images.shape
    x = images.reshape(n, h // patch, patch, w // patch, patch, c).transpose(0, 1, 3, 2, 4, 5)
    return np.ascontiguousarray(x.reshape(n, h // patch, w // patch, patch * patch * c))


def _count(graph: Path, ops: tuple[str, ...]) -> dict[str, int]:
    nodes = onnx.load(str(graph), load_external_data=False).graph.node
    counts = {op: sum(n.op_type == op for n in nodes) for op in ops}
    return {op: n for op, n in counts.items() if n}


def raw(
    graphs: dict[str, Path], spec: ModelSpec, batches: list[int], rounds: int, seconds: float
) -> list[RawForm]:
    sessions = {name: open_session(g, [CPU])[0] for name, g in graphs.items()}
    results = []
    for batch in batches:
        feeds = {spec.input_name: native_patches(spec, batch)}
        for s in sessions.values():  # warm-up: arenas, kernel choice
            batch_times(s, feeds, 0.0, min_runs=2)
        rates: dict[str, list[float]] = {n: [] for n in sessions}
        cpu: dict[str, list[float]] = {n: [] for n in sessions}
        names = list(sessions)
        for r in range(rounds):
            for name in names[r % len(names) :] + names[: r % len(names)]:
                cpu0 = time.process_time()
                times = batch_times(sessions[name], feeds, seconds, min_runs=3)
                cpu[name].append((time.process_time() - cpu0) * 1e3 / (batch * len(times)))
                rates[name].append(batch / statistics.median(times))
        for name in names:
            ratios = [a / b for a, b in zip(rates[name], rates[FP32], strict=True)]
            rate = statistics.median(rates[name])
            results.append(
                RawForm(
                    name,
                    batch,
                    round(rate, 1),
                    round(1e3 * batch / rate, 3),
                    round(statistics.median(ratios), 3),
                    round(statistics.median(cpu[name]), 3),
                )
            )
            print(
                f"  batch {batch:>2} {name}: {rate:8.1f} img/s "
                f"({statistics.median(ratios):.2f}x)  cpu {statistics.median(cpu[name]):.2f} "
                "ms/img",
                flush=True,
            )
    return results


# --- serving and CPU per image --------------------------------------------------------------


def preprocess_ms(spec: ModelSpec, bodies: list[bytes]) -> float:
    """One thread's CPU per image to decode, resize and patchify the photos (`crop`)."""
    settings = Settings()
    fit = 2 * spec.architecture.native_tokens
    for body in bodies[:5]:  # warm-up
        prepare(
            body, spec, "crop", name="x", max_pixels=settings.image_max_pixels, fit_max_tokens=fit
        )
    cpu0 = time.thread_time()
    for body in bodies:
        prepare(
            body, spec, "crop", name="x", max_pixels=settings.image_max_pixels, fit_max_tokens=fit
        )
    return (time.thread_time() - cpu0) * 1e3 / len(bodies)


def raw_cpu_ms(graph: Path, spec: ModelSpec, batch: int, seconds: float, rounds: int = 7) -> float:
    """CPU per image (every ORT thread) of the graph alone at `batch`, the service's session:
    the median of `rounds` short runs (one long run is at the mercy of a noisy neighbour)."""
    session = open_session(graph, [CPU])[0]
    feeds = {spec.input_name: native_patches(spec, batch)}
    batch_times(session, feeds, 0.0, min_runs=3)
    per_round = []
    for _ in range(rounds):
        cpu0 = time.process_time()
        times = batch_times(session, feeds, seconds / rounds, min_runs=3)
        per_round.append((time.process_time() - cpu0) * 1e3 / (batch * len(times)))
    return statistics.median(per_round)


async def serve(
    name: str, concurrencies: list[int], seconds: float, rounds: int, env: dict[str, str]
) -> list[LoadResult]:
    images = load_images().bodies
    with (
        service(WORK / "both", name, env) as svc,
        naive_server(WORK / "fp32", name) as naive,
    ):
        targets = [
            svc.target("service int8"),
            svc.target("service fp32", path=f"/classify?model={name}&version=1&top_k=5"),
            naive.target("naive fp32"),
        ]
        levels = await run_levels(targets, images, concurrencies, 100_000, seconds, rounds)
    return [r for results in levels.values() for r in results]


def cpu_budgets(
    name: str, serving: list[LoadResult], preprocess: float, seconds: float
) -> list[CpuBudget]:
    both = WORK / "both" / name
    spec = ModelSpec.load(both / SPEC_FILENAME)
    graphs = {"service int8": both / "2" / "model.onnx", "service fp32": both / "1" / "model.onnx"}
    graphs["naive fp32"] = WORK / "fp32" / name / "1" / "model.onnx"
    out = []
    for r in serving:
        batch = max(1, round(r.mean_batch_size or 1.0)) if r.server != "naive fp32" else 1
        if r.server == "service fp32":
            continue  # its batches share the service's histogram with int8's: no mean batch
        raw_ms = raw_cpu_ms(graphs[r.server], spec, batch, seconds)
        total = raw_ms + preprocess
        server = r.server_cpu_ms_per_image
        out.append(
            CpuBudget(
                r.server,
                r.concurrency,
                server,
                r.mean_batch_size or 1.0,
                round(raw_ms, 3),
                round(preprocess, 3),
                round(server / total, 3) if server is not None else None,
                r.server_cpu_ms_per_image_by_group,
            )
        )
    return out


# --- tables ---------------------------------------------------------------------------------


def raw_table(reports: list[ModelReport]) -> str:
    lines = [
        "| model | method | top-1 agreement | held-out accuracy (fp32) | max abs logit diff "
        "| MB | batch 1: img/s; CPU/img | batch 8 | batch 32 |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for rep in reports:
        for acc in rep.accuracy:
            cells = []
            for b in (1, 8, 32):
                found = [r for r in rep.raw if r.method == acc.method and r.batch == b]
                base = [r for r in rep.raw if r.method == FP32 and r.batch == b]
                cells.append(
                    f"{found[0].img_per_s:,.0f} ({found[0].speedup:.2f}x); "
                    f"{found[0].cpu_ms_per_image:.2f} ms CPU "
                    f"({base[0].cpu_ms_per_image / found[0].cpu_ms_per_image:.2f}x)"
                    if found and base
                    else "-"
                )
            accuracy = (
                f"{100 * acc.accuracy:.2f}% ({100 * (acc.accuracy_fp32 or 0):.2f}%)"
                if acc.accuracy is not None
                else "-"
            )
            lines.append(
                f"| {rep.model} | {acc.method} | {100 * acc.top1_agreement:.1f}% | {accuracy} "
                f"| {acc.max_abs_logit_diff:.3f} | {acc.graph_mb} | " + " | ".join(cells) + " |"
            )
    return "\n".join(lines)


def serving_table(reports: list[ModelReport]) -> str:
    lines = [
        "| model | server | c | img/s | p50 ms | p99 ms | mean batch | CPU ms/img (loop) |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for rep in reports:
        for r in rep.serving:
            batch = f"{r.mean_batch_size:.1f}" if r.mean_batch_size else "-"
            cpu = (
                f"{r.server_cpu_ms_per_image:.2f} ({r.event_loop_cpu_ms_per_image:.2f})"
                if r.server_cpu_ms_per_image is not None
                and r.event_loop_cpu_ms_per_image is not None
                else "-"
            )
            lines.append(
                f"| {rep.model} | {r.server} | {r.concurrency} | {r.img_per_s:.1f} | "
                f"{r.latency_ms_p50:.1f} | {r.latency_ms_p99:.1f} | {batch} | {cpu} |"
            )
    return "\n".join(lines)


def cpu_table(reports: list[ModelReport]) -> str:
    """Each server's CPU per image against the work's own, and by thread group beside the raw
    figure it compares with: inference threads / the raw graph at the mean batch,
    preprocessing threads / one thread's decode+resize+patchify, then the event loop and the
    rest, which the raw figures do not have."""
    lines = [
        "| model | server | c | server CPU ms/img | raw graph at mean batch | inference threads "
        "| decode+resize+patchify | preprocessing threads | event loop | other "
        "| ratio (target <= 1.05) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]

    def ms(value: float | None) -> str:
        return "-" if value is None else f"{value:.2f}"

    for rep in reports:
        for c in rep.cpu:
            g = c.by_group or {}
            lines.append(
                f"| {rep.model} | {c.server} | {c.concurrency} | "
                f"{ms(c.server_cpu_ms_per_image)} | "
                f"{c.raw_cpu_ms_per_image:.2f} @{c.mean_batch:.1f} | {ms(g.get('inference'))} | "
                f"{c.preprocess_ms_per_image:.2f} | {ms(g.get('preprocessing'))} | "
                f"{ms(g.get('event_loop'))} | {ms(g.get('other'))} | "
                f"{'-' if c.ratio is None else f'{c.ratio:.3f}'} |"
            )
    return "\n".join(lines)


def targets(rep: ModelReport) -> dict[str, float | None]:
    def speedup(b: int) -> float | None:
        found = [r.speedup for r in rep.raw if r.method == CHOSEN and r.batch == b]
        return found[0] if found else None

    def cpu_speedup(b: int) -> float | None:
        cpu = {r.method: r.cpu_ms_per_image for r in rep.raw if r.batch == b}
        return round(cpu[FP32] / cpu[CHOSEN], 3) if FP32 in cpu and CHOSEN in cpu else None

    out: dict[str, float | None] = {f"raw_speedup_batch_{b}": speedup(b) for b in (1, 8, 32)}
    out.update({f"raw_cpu_per_image_ratio_batch_{b}": cpu_speedup(b) for b in (1, 8, 32)})
    by = {(r.server, r.concurrency): r for r in rep.serving}
    for c in (16, 64):
        s, n = by.get(("service int8", c)), by.get(("naive fp32", c))
        if s is not None and n is not None:
            out[f"service_int8_over_naive_fp32_c{c}"] = round(s.img_per_s / n.img_per_s, 3)
            out[f"p99_ms_service_int8_c{c}"] = round(s.latency_ms_p99, 1)
            out[f"p99_ms_naive_fp32_c{c}"] = round(n.latency_ms_p99, 1)
    return out


# --- main -----------------------------------------------------------------------------------


def model_and_calibration(name: str) -> tuple[VisionTransformer, str, NDArray[np.uint8] | None]:
    """The model, its weights' story, and static QDQ's calibration inputs (demo: generator
    images of a seed neither training nor the evaluation used; ViT-Ti: None, photos later)."""
    if name == "demo-shapes":
        model, weights = demo_model()
        images = generate(256, seed=EVAL_SEED + 1, size=64).images
        return model, weights, _patchify(images, 8)
    model, weights = ti16_model()
    return model, weights, None


def serve_and_budget(
    rep: ModelReport, spec: ModelSpec, a: argparse.Namespace, env: dict[str, str]
) -> None:
    """The serving side by side, then each server's CPU per image against the raw figures."""
    print(f"{rep.model}: serving", flush=True)
    rep.serving = asyncio.run(serve(rep.model, a.concurrency, a.serve_seconds, a.serve_rounds, env))
    bodies = load_images().bodies
    rep.cpu = cpu_budgets(rep.model, rep.serving, preprocess_ms(spec, bodies), 7.0)


def serve_only(name: str, a: argparse.Namespace, env: dict[str, str]) -> ModelReport:
    """--serve-only: the serving and CPU figures over the repositories an earlier run made."""
    if not (WORK / "both" / name / SPEC_FILENAME).exists():
        raise SystemExit(f"no {WORK / 'both' / name}: run bench.int8 without --serve-only first")
    spec = ModelSpec.load(WORK / "both" / name / SPEC_FILENAME)
    rep = ModelReport(name, "(--serve-only)", spec.architecture.grid, [], [])
    serve_and_budget(rep, spec, a, env)
    return rep


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--rounds", type=int, default=7, help="alternating raw rounds per batch")
    p.add_argument("--seconds", type=float, default=0.4, help="raw: per graph per round")
    p.add_argument("--concurrency", type=int, nargs="+", default=[16, 64])
    p.add_argument("--serve-seconds", type=float, default=60.0, help="per server per level")
    p.add_argument("--serve-rounds", type=int, default=4)
    p.add_argument("--no-serve", action="store_true")
    p.add_argument(
        "--serve-only",
        action="store_true",
        help="skip the methods (accuracy and raw img/s): serving and CPU per image only, over "
        "build/int8's repositories from an earlier run",
    )
    p.add_argument(
        "--service-env",
        nargs="*",
        default=[],
        metavar="VAR=VALUE",
        help="VIT_SERVE_* settings for the service, e.g. VIT_SERVE_WORKER_NICE=0 on a machine "
        "shared with other work (niced workers yield to it; the naive server's do not)",
    )
    p.add_argument("--out", type=Path, default=RESULTS / "int8.json")
    a = p.parse_args(argv)
    service_env = dict(kv.split("=", 1) for kv in a.service_env)
    torch.set_num_threads(1)
    load_before = os.getloadavg()
    reports = []
    for name in a.models:
        if a.serve_only:
            reports.append(serve_only(name, a, service_env))
            continue
        model, weights, calibration = model_and_calibration(name)
        print(f"{name}: fp32 and int8 repositories under {WORK}", flush=True)
        spec = export_fp32(name, model)
        if name == "demo-shapes":
            held_out = demo_held_out(spec)
        else:
            # Static calibration on the even photos; every method judged on the odd ones.
            photos = photo_held_out(spec, PHOTOS)
            calibration = photos.patches[0::2]
            held_out = HeldOut(
                photos.patches[1::2], None, f"{len(photos.patches[1::2])} photos (odd ones), crop"
            )
        assert calibration is not None
        add_int8(name, model, held_out, gated=name == "demo-shapes")
        fused = WORK / "fp32" / name / "1" / GRAPH_FILENAME
        graphs = method_graphs(fused, WORK / "methods" / name, calibration)
        print(f"{name}: accuracy against fp32 on {held_out.description}", flush=True)
        acc = accuracy(graphs, held_out)
        print(f"{name}: raw img/s", flush=True)
        raw_forms = raw(graphs, spec, a.batches, a.rounds, a.seconds)
        rep = ModelReport(name, weights, spec.architecture.grid, acc, raw_forms)
        if not a.no_serve:
            serve_and_budget(rep, spec, a, service_env)
        rep.targets = targets(rep)
        print(rep.targets, flush=True)
        reports.append(rep)
    tables = {
        "raw": raw_table(reports),
        "serving": serving_table(reports),
        "cpu": cpu_table(reports),
    }
    for text in tables.values():
        print(text)
    load_after = os.getloadavg()
    write_results(
        a.out,
        Report(
            method={
                "raw_rounds": a.rounds,
                "raw_seconds_per_graph_per_round": a.seconds,
                "serve_rounds": a.serve_rounds,
                "serve_seconds_per_server_per_level": a.serve_seconds,
                "onnxruntime": ort.__version__,
                "service_env": service_env,
            },
            models=reports,
            tables=tables,
        ),
        {"load_average_before": load_before, "load_average_after": load_after},
    )


if __name__ == "__main__":
    main()
