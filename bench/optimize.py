"""Plain fp32 vs fused fp32 vs fp16 graphs: raw ONNX Runtime img/s, side by side.

    .venv/bin/python -m bench.optimize                   # about 3 minutes on 2 cores
    .venv/bin/python -m bench.optimize --rounds 3 --batches 1 8

ViT-Ti/16 (random weights) and the demo model, each exported in the three forms with the export
step's checks, plus fused + SkipLayerNormalization (left out of the export); per batch size,
rounds rotate between the graphs (figures: medians). Writes bench/results/optimize.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from torch import nn

from app.models.spec import OptimizationLevel
from app.runtime.backends import CPU, open_session
from bench.export_tiny import vit_ti16
from bench.harness import RESULTS, ROOT, batch_times, write_results
from export.checkpoints import load_checkpoint
from export.onnx_export import check_parity, export_graph, parity_grids, stage_graph
from export.optimize import fuse, fused_model
from export.vit import VisionTransformer, ViTConfig

DEMO_CHECKPOINT = ROOT / "export" / "demo" / "checkpoint.pt"
DEMO_SPEC = ROOT / "model_repo" / "demo-shapes" / "model.json"
FORMS: tuple[OptimizationLevel, ...] = ("none", "fused", "fp16")
# Not a form the export writes: the evidence for leaving SkipLayerNormalization out of `fused`.
SKIP_LN = "fused+skipln"


@dataclass
class FormResult:
    form: str
    batch: int
    img_per_s: float  # median over rounds
    ms_per_batch: float
    speedup: float  # median over rounds of (this form's img/s) / (plain's img/s)


@dataclass
class ModelReport:
    model: str
    config: dict[str, object]
    grid: tuple[int, int]
    graph_mb: dict[str, float]
    checks: dict[str, object]
    results: list[FormResult]


@dataclass
class Method:
    rounds: int
    seconds_per_form_per_round: float


@dataclass
class OptimizeReport:
    method: Method
    models: list[ModelReport]
    table_markdown: str


def demo_model() -> tuple[VisionTransformer, str]:
    if DEMO_CHECKPOINT.is_file():
        return load_checkpoint(DEMO_CHECKPOINT).model, f"trained weights ({DEMO_CHECKPOINT.name})"
    arch = json.loads(DEMO_SPEC.read_text())["architecture"]
    cfg = ViTConfig(
        patch_size=arch["patch_size"],
        grid=tuple(arch["grid"]),
        embed_dim=arch["embed_dim"],
        depth=arch["depth"],
        heads=arch["heads"],
        num_classes=arch["num_classes"],
    )
    torch.manual_seed(0)
    return VisionTransformer(cfg).eval(), "random weights (no checkpoint found)"


def ti16_model() -> tuple[VisionTransformer, str]:
    model = vit_ti16()
    # The reference init zeroes the head: every logit would be 0 and top-1 meaningless.
    with torch.no_grad():
        nn.init.normal_(model.head.weight, std=0.1)
    return model, "random weights (seed 0), head N(0, 0.1)"


def export_forms(
    model: VisionTransformer, folder: Path
) -> tuple[dict[str, Path], dict[str, object]]:
    """The three forms, each checked as `python -m export` checks it."""
    grids = parity_grids(model.cfg.grid)
    graphs: dict[str, Path] = {}
    checks: dict[str, object] = {}
    for form in FORMS:
        staging = folder / form
        staging.mkdir(parents=True)
        t0 = time.perf_counter()
        staged = stage_graph(model, staging, form, grids)
        graphs[form] = staged.path
        check: dict[str, object] = {
            "export_s": round(time.perf_counter() - t0, 1),
            "fp32_max_abs_diff_vs_pytorch": staged.parity.max_abs_diff,
            "fused_ops": staged.optimization.fused_ops,
        }
        if staged.fp16 is not None:
            check["fp16_max_abs_diff_vs_fp32"] = staged.fp16.max_abs_diff
            check["fp16_bound"] = staged.fp16.bound
            check["fp16_top1_agreed"] = f"{staged.fp16.agreed}/{staged.fp16.compared}"
            check["fp16_near_ties_excused"] = staged.fp16.excused
        checks[form] = check
    traced, skipln = folder / SKIP_LN / "traced.onnx", folder / SKIP_LN / "skipln.onnx"
    traced.parent.mkdir()
    export_graph(fused_model(model.folded()), traced)
    counts = fuse(traced, skipln, model.cfg, skip_layer_norm=True)
    parity = check_parity(model, skipln, grids)
    checks[SKIP_LN] = {"fp32_max_abs_diff_vs_pytorch": parity.max_abs_diff, "fused_ops": counts}
    graphs[SKIP_LN] = skipln
    return graphs, checks


def _median_batch_s(session: ort.InferenceSession, x: np.ndarray, seconds: float) -> float:
    return statistics.median(batch_times(session, {"patches": x}, seconds, min_runs=3))


def measure(
    graphs: dict[str, Path],
    cfg: ViTConfig,
    batches: list[int],
    rounds: int,
    seconds: float,
) -> list[FormResult]:
    sessions = {form: open_session(path, [CPU])[0] for form, path in graphs.items()}
    gh, gw = cfg.grid
    rng = np.random.default_rng(0)
    results: list[FormResult] = []
    for batch in batches:
        x = rng.integers(0, 256, (batch, gh, gw, cfg.patch_dim), dtype=np.uint8)
        for session in sessions.values():  # warm-up: allocations, kernel choice
            _median_batch_s(session, x, 0.0)
        per_round: dict[str, list[float]] = {form: [] for form in sessions}
        for r in range(rounds):
            order = list(sessions)[r % len(sessions) :] + list(sessions)[: r % len(sessions)]
            for form in order:
                per_round[form].append(batch / _median_batch_s(sessions[form], x, seconds))
        for form, rates in per_round.items():
            ratios = [a / b for a, b in zip(rates, per_round["none"], strict=True)]
            rate = statistics.median(rates)
            results.append(
                FormResult(form, batch, rate, 1000 * batch / rate, statistics.median(ratios))
            )
    return results


def table(reports: list[ModelReport]) -> str:
    """Markdown: one row per model and batch, img/s of each form and its speed-up."""
    lines = [
        "| model | batch | plain fp32 | fused fp32 | fp16 | (fused + SkipLayerNorm) | GPU |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for report in reports:
        by_batch: dict[int, dict[str, FormResult]] = {}
        for r in report.results:
            by_batch.setdefault(r.batch, {})[r.form] = r
        best: dict[str, FormResult] = {
            form: max((b[form] for b in by_batch.values()), key=lambda r: r.img_per_s)
            for form in (*FORMS, SKIP_LN)
        }
        rows = [(str(batch), forms) for batch, forms in sorted(by_batch.items())]
        rows.append(("best", best))
        for label, forms in rows:
            cells = []
            for form in (*FORMS, SKIP_LN):
                r = forms[form]
                cell = f"{r.img_per_s:,.0f}"
                if form != "none":
                    ratio = r.img_per_s / forms["none"].img_per_s if label == "best" else r.speedup
                    cell += f" ({ratio:.2f}x)"
                if label == "best":
                    cell += f" @{r.batch}"
                cells.append(cell)
            lines.append(
                f"| {report.model} | {label} | "
                + " | ".join(cells)
                + " | not measured: no GPU in this session |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--rounds", type=int, default=7, help="alternating rounds per batch size")
    p.add_argument("--seconds", type=float, default=0.4, help="per graph per round")
    p.add_argument("--out", type=Path, default=RESULTS / "optimize.json")
    a = p.parse_args(argv)
    torch.set_num_threads(1)  # the export's parity checks only; timing is ONNX Runtime's

    reports: list[ModelReport] = []
    # Other work on the machine skews every figure; the load average says how much there was.
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        for name, make in (("vit-ti16", ti16_model), ("demo-shapes", demo_model)):
            model, weights = make()
            print(f"{name}: exporting none / fused / fp16 ({weights})", flush=True)
            graphs, checks = export_forms(model, Path(tmp) / name)
            for form, check in checks.items():
                print(f"  {form}: {check}")
            results = measure(graphs, model.cfg, a.batches, a.rounds, a.seconds)
            reports.append(
                ModelReport(
                    model=name,
                    config={**model.cfg.to_dict(), "weights": weights},
                    grid=model.cfg.grid,
                    graph_mb={f: round(g.stat().st_size / 2**20, 2) for f, g in graphs.items()},
                    checks=checks,
                    results=results,
                )
            )
    load_after = os.getloadavg()
    text = table(reports)
    print(text)
    print(f"load average (1, 5, 15 min) before {load_before}, after {load_after}")
    method = Method(a.rounds, a.seconds)
    notes = {"provider": CPU, "load_average_before": load_before, "load_average_after": load_after}
    write_results(a.out, OptimizeReport(method, reports, text), machine_notes=notes)


if __name__ == "__main__":
    main()
