"""Export a reference ViT to ONNX with a dynamic patch grid, check parity, write the model repo.

The graph takes `patches` uint8 (batch, grid_h, grid_w, P*P*C) and returns `logits`; it reads
the grid from its input's shape. Nothing is written to the model repository until ONNX Runtime
agrees with PyTorch at the native grid and at smaller, larger and non-square grids, and, for an
imported model whose library is installed, with that library's own forward (`SourceGate`: timm
at the same four grids, its position embeddings resampled by timm; a source that runs only at
its native size, there), both within the same bound.

`optimize` picks the form of model.onnx (export/optimize.py): `none` (as traced), `fused`
(fused attention, LayerNormalization and BiasGelu, and a last block that computes only the
class token; the default: faster on CPU, and still within the same 1e-4 of PyTorch) or `fp16`
(fused, float16 inside, float32 logits; checked by top-1 agreement and a max-abs bound
against the fused fp32 graph). The rollout graph is always exported as traced: it needs the
attention probabilities of every row of every block, which a fused kernel never materialises,
and its 1e-5 bound.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import get_args

import numpy as np
import onnxruntime as ort
import torch

from app.models.repository import sha256_of
from app.models.spec import (
    GRAPH_FILENAME,
    INTROSPECTION_FILENAME,
    ROLLOUT_GRAPH_FILENAME,
    SPEC_FILENAME,
    Architecture,
    Backbone,
    GraphFiles,
    GraphOptimization,
    ModelSpec,
    OptimizationLevel,
    Preprocess,
    Source,
    contract_tensors,
    rollout_contract,
)
from export.checkpoints import PatchLogits, SourceGate
from export.fused_attention import CONTRIB_DOMAIN, CONTRIB_OPSET, FusedAttention
from export.hybrid import backbone_record
from export.introspection import (
    IntrospectionRolloutViT,
    check_distances,
    introspection_outputs,
    introspection_record,
    write_record,
)
from export.optimize import (
    Fp16Report,
    check_fp16,
    fuse,
    fused_model,
    fused_op_counts,
    has_class_token_tail,
    to_fp16,
)
from export.quantize import Gate, HeldOut, int8_op_counts, stage_int8
from export.rollout import HeadFusion, RolloutViT
from export.vit import VisionTransformer, ViTConfig

log = logging.getLogger(__name__)

OPSET = 18
PARITY_ATOL = 1e-4
ROLLOUT_ATOL = 1e-5
# Discarding is a threshold: entries within float error of it may fall either side in the two
# runtimes, so the strict check runs without it (tests/export/test_rollout.py covers it).
PARITY_DISCARD_RATIOS = (0.0,)
DEFAULT_OPTIMIZATION: OptimizationLevel = "fused"


class ParityError(RuntimeError):
    """ONNX Runtime and PyTorch disagree (or fp16 and fp32 do): the graph is not written."""

    def __init__(self, message: str, report: ParityReport | None = None) -> None:
        super().__init__(message)
        self.report = report  # the figures per grid, where a ParityReport failed


@dataclass
class ParityReport:
    atol: float
    max_abs_diff: dict[str, float] = field(default_factory=dict)  # "gh x gw" -> max |diff|

    @property
    def worst(self) -> float:
        return max(self.max_abs_diff.values())

    @property
    def passed(self) -> bool:
        return self.worst <= self.atol

    @property
    def worst_grid(self) -> str:
        return max(self.max_abs_diff, key=lambda grid: self.max_abs_diff[grid])


def parity_grids(native: tuple[int, int]) -> list[tuple[int, int]]:
    """The native grid, a smaller one, a larger one and a non-square one."""
    gh, gw = native
    return [
        (gh, gw),
        (max(1, gh * 2 // 3), max(1, gw * 2 // 3)),
        (gh * 3 // 2, gw * 3 // 2),
        (max(1, gh - 2), gw + 3),
    ]


def export_graph(model: VisionTransformer, path: Path, opset: int = OPSET) -> None:
    """Trace `model` (normalisation already folded) into an ONNX graph with dynamic grid dims."""
    cfg = model.cfg
    gh, gw = cfg.grid
    example = torch.randint(0, 256, (2, gh, gw, cfg.patch_dim), dtype=torch.uint8)
    fused = any(isinstance(m, FusedAttention) for m in model.modules())
    with warnings.catch_warnings():
        # The TorchScript exporter warns that it is deprecated in favour of dynamo; it is the one
        # that exports plain bicubic resizing with dynamic sizes, which is all we need here.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (example,),
            str(path),
            input_names=["patches"],
            output_names=["logits"],
            dynamic_axes={
                "patches": {0: "batch", 1: "grid_h", 2: "grid_w"},
                "logits": {0: "batch"},
            },
            opset_version=opset,
            # Only a graph with fused attention imports ONNX Runtime's contrib domain.
            custom_opsets={CONTRIB_DOMAIN: CONTRIB_OPSET} if fused else None,
            dynamo=False,
        )


def compare_logits(
    graph: Path,
    expected: PatchLogits,
    grids: list[tuple[int, int]],
    patch_dim: int,
    atol: float = PARITY_ATOL,
    batch: int = 2,
    seed: int = 0,
) -> ParityReport:
    """Max |expected(patches) - logits_onnx| per grid on random uint8 patches: the one
    comparison behind both gates, PyTorch's and the source library's (the same inputs for
    both, as they draw from the same seed)."""
    session = ort.InferenceSession(str(graph), providers=["CPUExecutionProvider"])
    gen = torch.Generator().manual_seed(seed)
    report = ParityReport(atol=atol)
    for gh, gw in grids:
        shape = (batch, gh, gw, patch_dim)
        patches = torch.randint(0, 256, shape, dtype=torch.uint8, generator=gen)
        with torch.no_grad():
            want = expected(patches).numpy()
        (got,) = session.run(["logits"], {"patches": patches.numpy()})
        report.max_abs_diff[f"{gh}x{gw}"] = float(np.abs(want - got).max())
    return report


def check_parity(
    model: VisionTransformer,
    graph: Path,
    grids: list[tuple[int, int]],
    atol: float = PARITY_ATOL,
    batch: int = 2,
    seed: int = 0,
) -> ParityReport:
    """Max |logits_torch - logits_onnx| per grid on random uint8 patches."""
    return compare_logits(graph, model, grids, model.cfg.patch_dim, atol, batch, seed)


def check_source_parity(
    graph: Path,
    source: SourceGate,
    cfg: ViTConfig,
    grids: list[tuple[int, int]],
    atol: float = PARITY_ATOL,
    batch: int = 2,
    seed: int = 0,
) -> ParityReport:
    """Max |logits_source - logits_onnx| per grid: the graph against the source library's own
    forward (timm's, resampling its position embeddings itself), at those of `grids` the
    source runs at (`SourceGate.grids`)."""
    at = source.grids(grids, cfg.grid)
    return compare_logits(graph, source.logits, at, cfg.patch_dim, atol, batch, seed)


def export_rollout_graph(model: VisionTransformer, path: Path, opset: int = OPSET) -> None:
    """The same weights with a `rollout` output; head fusion and discard ratio are inputs."""
    cfg = model.cfg
    gh, gw = cfg.grid
    example = (
        torch.randint(0, 256, (2, gh, gw, cfg.patch_dim), dtype=torch.uint8),
        torch.tensor(int(HeadFusion.MEAN), dtype=torch.int64),
        torch.tensor(0.0, dtype=torch.float32),
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            # With the introspection outputs (export/introspection.py), which cost this graph
            # little: its attentions and resampled position embeddings are computed anyway.
            IntrospectionRolloutViT(model).eval(),
            example,
            str(path),
            input_names=["patches", "head_fusion", "discard_ratio"],
            output_names=["logits", "rollout", "attention_distance", "position_embeddings"],
            dynamic_axes={
                "patches": {0: "batch", 1: "grid_h", 2: "grid_w"},
                "logits": {0: "batch"},
                "rollout": {0: "batch", 1: "grid_h", 2: "grid_w"},
                "attention_distance": {0: "batch"},
                "position_embeddings": {0: "grid_h", 1: "grid_w"},
            },
            opset_version=opset,
            dynamo=False,
        )


def check_rollout_parity(
    model: VisionTransformer,
    graph: Path,
    grids: list[tuple[int, int]],
    atol: float = ROLLOUT_ATOL,
    batch: int = 2,
    seed: int = 0,
) -> ParityReport:
    """Max |rollout_torch - rollout_onnx| per grid, over every head fusion."""
    session = ort.InferenceSession(str(graph), providers=["CPUExecutionProvider"])
    gen = torch.Generator().manual_seed(seed)
    wrapper = RolloutViT(model).eval()
    report = ParityReport(atol=atol)
    for gh, gw in grids:
        patches = torch.randint(
            0, 256, (batch, gh, gw, model.cfg.patch_dim), dtype=torch.uint8, generator=gen
        )
        worst = 0.0
        for fusion in HeadFusion:
            for ratio in PARITY_DISCARD_RATIOS:
                f, r = torch.tensor(int(fusion)), torch.tensor(ratio, dtype=torch.float32)
                with torch.no_grad():
                    _, expected = wrapper(patches, f, r)
                feeds = {
                    "patches": patches.numpy(),
                    "head_fusion": f.numpy(),
                    "discard_ratio": r.numpy(),
                }
                (got,) = session.run(["rollout"], feeds)
                worst = max(worst, float(np.abs(expected.numpy() - got).max()))
        report.max_abs_diff[f"{gh}x{gw}"] = worst
    return report


def architecture_of(cfg: ViTConfig, backbone: Backbone | None = None) -> Architecture:
    """What model.json says of a model's architecture."""
    return Architecture(
        patch_size=cfg.patch_size,
        grid=cfg.grid,
        embed_dim=cfg.embed_dim,
        depth=cfg.depth,
        heads=cfg.heads,
        num_classes=cfg.num_classes,
        backbone=backbone,
    )


def build_spec(
    name: str,
    model: VisionTransformer,
    labels: list[str],
    preprocess: Preprocess,
    source: Source,
    versions: dict[int, GraphFiles],
) -> ModelSpec:
    record = backbone_record(model)
    arch = architecture_of(model.cfg, None if record is None else Backbone(**record))
    inputs, outputs = contract_tensors(arch)
    return ModelSpec(
        name=name,
        architecture=arch,
        preprocess=preprocess,
        labels=labels,
        inputs=inputs,
        outputs=outputs,
        rollout=rollout_contract(arch).model_copy(
            update={"introspection": introspection_outputs(arch.embed_dim, arch.depth, arch.heads)}
        ),
        source=source,
        versions=versions,
    )


@dataclass
class StagedGraph:
    """model.onnx in the form asked for, checked, in a staging folder."""

    path: Path
    parity: ParityReport  # the fp32 graph (fused when optimised) against PyTorch
    optimization: GraphOptimization
    fp16: Fp16Report | None = None
    # The same fp32 graph against the source library's own forward, where it was given one.
    source_parity: ParityReport | None = None


def _log_and_check(what: str, report: ParityReport, against: str = "PyTorch") -> None:
    for grid, diff in report.max_abs_diff.items():
        log.info("%s parity with %s at grid %s: max |diff| %.2e", what, against, grid, diff)
    if not report.passed:
        grid = report.worst_grid
        every = ", ".join(f"{g}: {d:.2e}" for g, d in report.max_abs_diff.items())
        raise ParityError(
            f"ONNX Runtime {what} differ from {against} at grid {grid}: max |diff| "
            f"{report.max_abs_diff[grid]:.2e} > {report.atol:.0e} (per grid: {every}); "
            "nothing written",
            report,
        )


def _check_source(
    graph: Path,
    source: SourceGate | None,
    cfg: ViTConfig,
    grids: list[tuple[int, int]],
    atol: float,
) -> ParityReport | None:
    """The fp32 graph against the source library's forward; ParityError if it differs."""
    if source is None:
        return None
    if not source.any_grid:
        log.warning(
            "%s's forward runs at the native grid only: the graph is compared with it there "
            "(and with PyTorch at every parity grid)",
            source.library,
        )
    report = check_source_parity(graph, source, cfg, grids, atol)
    _log_and_check("logits", report, f"{source.library}'s own forward")
    return report


def stage_graph(
    model: VisionTransformer,
    staging: Path,
    level: OptimizationLevel,
    grids: list[tuple[int, int]],
    atol: float = PARITY_ATOL,
    held_out: HeldOut | None = None,
    gate: Gate | None = None,
    reference: SourceGate | None = None,
) -> StagedGraph:
    """Export model.onnx as `level` asks into `staging` and check it; ParityError if it fails.

    With `reference` the fp32 graph must also meet `atol` against the source library's forward
    (at `grids` where the source takes them, else at the native grid) before any lower
    precision is made from it: the fp16 and int8 forms are gated against that graph.

    `int8` quantises the fused graph and needs `held_out` inputs for its accuracy `gate`
    (export/quantize.py; Int8GateError if it fails).

    Every form's fp32 graph meets the same `atol` against PyTorch at `grids` (the fused graph's
    shapes stay symbolic, so the grids are the proof that fusing baked none in); the fp16
    graph must then agree with it on top-1 within `check_fp16`'s bound.

    ValueError for a level it does not know (before any work): the last branch below is fp16,
    which an unchecked typo would otherwise reach.
    """
    if level not in get_args(OptimizationLevel):
        known = ", ".join(get_args(OptimizationLevel))
        raise ValueError(f"unknown optimisation level {level!r}; known levels: {known}")
    folded = model.folded()
    traced = staging / "traced.onnx"
    if level == "none":
        export_graph(folded, traced)
        parity = check_parity(model, traced, grids, atol=atol)
        _log_and_check("logits", parity)
        versus = _check_source(traced, reference, model.cfg, grids, atol)
        done = GraphOptimization(max_abs_diff=parity.worst)
        return StagedGraph(traced, parity, done, source_parity=versus)
    module = fused_model(folded)
    export_graph(module, traced)
    fused = staging / "fused.onnx"
    counts = fuse(traced, fused, model.cfg)
    parity = check_parity(model, fused, grids, atol=atol)
    _log_and_check("fused logits", parity)
    versus = _check_source(fused, reference, model.cfg, grids, atol)
    tail = has_class_token_tail(module)
    if level == "fused":
        done = GraphOptimization(
            level="fused", fused_ops=counts, class_token_tail=tail, max_abs_diff=parity.worst
        )
        return StagedGraph(fused, parity, done, source_parity=versus)
    if level == "int8":
        if held_out is None:
            raise ValueError("an int8 export needs held-out inputs for its accuracy gate")
        int8 = staging / "int8.onnx"
        record = stage_int8(
            fused, int8, held_out, grids, model.cfg.patch_dim, model.cfg.num_classes, gate
        )
        done = GraphOptimization(
            level="int8",
            fused_ops=int8_op_counts(int8),
            class_token_tail=tail,
            max_abs_diff=record.max_abs_logit_diff,
            int8=record,
        )
        return StagedGraph(int8, parity, done, source_parity=versus)
    half = staging / "fp16.onnx"
    to_fp16(fused, half)
    report = check_fp16(fused, half, grids, model.cfg.patch_dim)
    for grid, diff in report.max_abs_diff.items():
        log.info("fp16 at grid %s: max |diff| %.2e (bound %.2e)", grid, diff, report.bound[grid])
    log.info(
        "fp16 top-1: %d/%d agree with fp32 (%d near-ties excused)",
        report.agreed,
        report.compared,
        report.excused,
    )
    if not report.passed:
        raise ParityError(
            f"the fp16 graph differs from the fp32 one: max |diff| {report.max_abs_diff} "
            f"against bounds {report.bound}, top-1 {report.disagreed} of {report.compared} "
            "disagree; nothing written"
        )
    worst = max(report.max_abs_diff.values())
    done = GraphOptimization(
        level="fp16", fused_ops=fused_op_counts(half), class_token_tail=tail, max_abs_diff=worst
    )
    return StagedGraph(half, parity, done, report, versus)


@dataclass
class ExportResult:
    spec_path: Path
    graph_path: Path
    version: int
    parity: ParityReport
    rollout_parity: ParityReport
    optimization: GraphOptimization
    fp16: Fp16Report | None = None
    source_parity: ParityReport | None = None  # model.onnx's fp32 form against the source's


def export_to_repository(
    model: VisionTransformer,
    repo: Path,
    name: str,
    labels: list[str],
    preprocess: Preprocess,
    source: Source,
    version: int | None = None,
    atol: float = PARITY_ATOL,
    optimize: OptimizationLevel = DEFAULT_OPTIMIZATION,
    held_out: HeldOut | None = None,
    gate: Gate | None = None,
    introspection_held_out: HeldOut | None = None,
    reference: SourceGate | None = None,
) -> ExportResult:
    """Export, check parity at several grids, then write `<repo>/<name>/{model.json,<v>/...}`.

    Raises ParityError (and writes nothing) when a graph disagrees with PyTorch, or model.onnx's
    fp32 form with `reference`, the forward of the library the weights came from
    (export.checkpoints.source_gate).
    """
    spec_path = repo / name / SPEC_FILENAME
    versions: dict[int, GraphFiles] = {}
    if spec_path.exists():
        versions = dict(ModelSpec.load(spec_path).versions)
    if version is None:
        version = max(versions, default=0) + 1
    model = model.eval()
    with tempfile.TemporaryDirectory() as tmp:
        staged_rollout = Path(tmp) / ROLLOUT_GRAPH_FILENAME
        grids = parity_grids(model.cfg.grid)
        staged = stage_graph(model, Path(tmp), optimize, grids, atol, held_out, gate, reference)
        export_rollout_graph(model.folded(), staged_rollout)
        rollout_parity = check_rollout_parity(model, staged_rollout, grids)
        _log_and_check("rollout", rollout_parity)
        check_distances(model, staged_rollout, grids)
        # Fig. 7's panels, on the graph the service runs (the held-out inputs: the int8 gate's
        # unless others are given).
        seen = introspection_held_out or held_out
        record = introspection_record(
            model,
            staged_rollout,
            None if seen is None else seen.patches,
            "" if seen is None else seen.description,
        )
        staged_record = Path(tmp) / INTROSPECTION_FILENAME
        write_record(record, staged_record)
        version_dir = repo / name / str(version)
        version_dir.mkdir(parents=True, exist_ok=True)
        graph_path = version_dir / GRAPH_FILENAME
        rollout_path = version_dir / ROLLOUT_GRAPH_FILENAME
        record_path = version_dir / INTROSPECTION_FILENAME
        shutil.move(staged.path, graph_path)
        shutil.move(staged_rollout, rollout_path)
        shutil.move(staged_record, record_path)
    versions[version] = GraphFiles(
        model=sha256_of(graph_path),
        rollout=sha256_of(rollout_path),
        introspection=sha256_of(record_path),
        optimization=staged.optimization,
    )
    spec = build_spec(name, model, labels, preprocess, source, versions)
    spec.dump(spec_path)
    log.info("wrote %s (version %d, %s) and %s", graph_path, version, optimize, spec_path)
    return ExportResult(
        spec_path=spec_path,
        graph_path=graph_path,
        version=version,
        parity=staged.parity,
        rollout_parity=rollout_parity,
        optimization=staged.optimization,
        fp16=staged.fp16,
        source_parity=staged.source_parity,
    )
