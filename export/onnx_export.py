"""Export a reference ViT to ONNX with a dynamic patch grid, check parity, write the model repo.

The graph takes `patches` uint8 (batch, grid_h, grid_w, P*P*C) and returns `logits`; it reads
the grid from its input's shape. Nothing is written to the model repository until ONNX Runtime
agrees with PyTorch at the native grid and at smaller, larger and non-square grids.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from app.spec import (
    GRAPH_FILENAME,
    ROLLOUT_GRAPH_FILENAME,
    SPEC_FILENAME,
    Architecture,
    GraphFiles,
    ModelSpec,
    Preprocess,
    Source,
    contract_tensors,
    rollout_contract,
)
from export.rollout import HeadFusion, RolloutViT
from export.vit import VisionTransformer

log = logging.getLogger(__name__)

OPSET = 18
PARITY_ATOL = 1e-4
ROLLOUT_ATOL = 1e-5
# Discarding is a threshold: entries within float error of it may fall either side in the two
# runtimes, so the strict check runs without it (tests/export/test_rollout.py covers it).
PARITY_DISCARD_RATIOS = (0.0,)


class ParityError(RuntimeError):
    """ONNX Runtime and PyTorch disagree: the graph is not written."""


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
            dynamo=False,
        )


def check_parity(
    model: VisionTransformer,
    graph: Path,
    grids: list[tuple[int, int]],
    atol: float = PARITY_ATOL,
    batch: int = 2,
    seed: int = 0,
) -> ParityReport:
    """Max |logits_torch - logits_onnx| per grid on random uint8 patches."""
    session = ort.InferenceSession(str(graph), providers=["CPUExecutionProvider"])
    gen = torch.Generator().manual_seed(seed)
    report = ParityReport(atol=atol)
    for gh, gw in grids:
        patches = torch.randint(
            0, 256, (batch, gh, gw, model.cfg.patch_dim), dtype=torch.uint8, generator=gen
        )
        with torch.no_grad():
            expected = model(patches).numpy()
        (got,) = session.run(["logits"], {"patches": patches.numpy()})
        report.max_abs_diff[f"{gh}x{gw}"] = float(np.abs(expected - got).max())
    return report


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
            RolloutViT(model).eval(),
            example,
            str(path),
            input_names=["patches", "head_fusion", "discard_ratio"],
            output_names=["logits", "rollout"],
            dynamic_axes={
                "patches": {0: "batch", 1: "grid_h", 2: "grid_w"},
                "logits": {0: "batch"},
                "rollout": {0: "batch", 1: "grid_h", 2: "grid_w"},
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


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def build_spec(
    name: str,
    model: VisionTransformer,
    labels: list[str],
    preprocess: Preprocess,
    source: Source,
    versions: dict[int, GraphFiles],
) -> ModelSpec:
    cfg = model.cfg
    arch = Architecture(
        patch_size=cfg.patch_size,
        grid=cfg.grid,
        embed_dim=cfg.embed_dim,
        depth=cfg.depth,
        heads=cfg.heads,
        num_classes=cfg.num_classes,
    )
    inputs, outputs = contract_tensors(arch)
    return ModelSpec(
        name=name,
        architecture=arch,
        preprocess=preprocess,
        labels=labels,
        inputs=inputs,
        outputs=outputs,
        rollout=rollout_contract(arch),
        source=source,
        versions=versions,
    )


@dataclass
class ExportResult:
    spec_path: Path
    graph_path: Path
    version: int
    parity: ParityReport
    rollout_parity: ParityReport


def export_to_repository(
    model: VisionTransformer,
    repo: Path,
    name: str,
    labels: list[str],
    preprocess: Preprocess,
    source: Source,
    version: int | None = None,
    atol: float = PARITY_ATOL,
) -> ExportResult:
    """Export, check parity at several grids, then write `<repo>/<name>/{model.json,<v>/...}`.

    Raises ParityError (and writes nothing) when the graph disagrees with PyTorch.
    """
    spec_path = repo / name / SPEC_FILENAME
    versions: dict[int, GraphFiles] = {}
    if spec_path.exists():
        versions = dict(ModelSpec.load(spec_path).versions)
    if version is None:
        version = max(versions, default=0) + 1
    folded = model.folded()
    with tempfile.TemporaryDirectory() as tmp:
        staged, staged_rollout = Path(tmp) / GRAPH_FILENAME, Path(tmp) / ROLLOUT_GRAPH_FILENAME
        grids = parity_grids(model.cfg.grid)
        export_graph(folded, staged)
        parity = check_parity(model.eval(), staged, grids, atol=atol)
        export_rollout_graph(folded, staged_rollout)
        rollout_parity = check_rollout_parity(model.eval(), staged_rollout, grids)
        for what, report in (("logits", parity), ("rollout", rollout_parity)):
            for grid, diff in report.max_abs_diff.items():
                log.info("%s parity at grid %s: max |diff| %.2e", what, grid, diff)
            if not report.passed:
                raise ParityError(
                    f"ONNX Runtime {what} differ from PyTorch by {report.worst:.2e} > "
                    f"{report.atol:.0e} ({report.max_abs_diff}); nothing written"
                )
        version_dir = repo / name / str(version)
        version_dir.mkdir(parents=True, exist_ok=True)
        graph_path = version_dir / GRAPH_FILENAME
        rollout_path = version_dir / ROLLOUT_GRAPH_FILENAME
        shutil.move(staged, graph_path)
        shutil.move(staged_rollout, rollout_path)
    versions[version] = GraphFiles(model=sha256_of(graph_path), rollout=sha256_of(rollout_path))
    spec = build_spec(name, model, labels, preprocess, source, versions)
    spec.dump(spec_path)
    log.info("wrote %s (version %d) and %s", graph_path, version, spec_path)
    return ExportResult(
        spec_path=spec_path,
        graph_path=graph_path,
        version=version,
        parity=parity,
        rollout_parity=rollout_parity,
    )
