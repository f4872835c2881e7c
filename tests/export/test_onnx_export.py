"""Export to ONNX: dynamic grids, parity with PyTorch, and the model repository it writes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from app.models.repository import sha256_of
from app.models.spec import GRAPH_FILENAME, SPEC_FILENAME, ModelSpec, Preprocess, Source
from export.onnx_export import (
    ParityError,
    check_parity,
    export_graph,
    export_to_repository,
    parity_grids,
)
from export.vit import VisionTransformer, ViTConfig


def _model(seed: int = 0) -> VisionTransformer:
    torch.manual_seed(seed)
    cfg = ViTConfig.variant(
        "test",
        patch_size=4,
        grid=(6, 6),
        num_classes=7,
        mean=(0.485, 0.456, 0.406),
        std=(0.229, 0.224, 0.225),
    )
    model = VisionTransformer(cfg).eval()
    torch.nn.init.normal_(model.head.weight, std=0.5)
    return model


def _export(model: VisionTransformer, repo: Path, atol: float = 1e-4) -> ModelSpec:
    export_to_repository(
        model,
        repo,
        "toy",
        [f"c{i}" for i in range(7)],
        Preprocess(),
        Source(framework="vit-serve"),
        atol=atol,
    )
    return ModelSpec.load(repo / "toy" / SPEC_FILENAME)


def test_parity_grids_cover_native_smaller_larger_and_non_square() -> None:
    grids = parity_grids((14, 14))
    assert grids[0] == (14, 14)
    assert any(h * w < 196 for h, w in grids)
    assert any(h * w > 196 for h, w in grids)
    assert any(h != w for h, w in grids)


def test_exported_graph_matches_pytorch_at_native_and_other_grids(tmp_path: Path) -> None:
    model = _model()
    graph = tmp_path / "m.onnx"
    export_graph(model.folded(), graph)
    grids = [(6, 6), (3, 4), (9, 9), (5, 11), (1, 1)]
    report = check_parity(model, graph, grids)
    assert set(report.max_abs_diff) == {"6x6", "3x4", "9x9", "5x11", "1x1"}
    assert report.worst <= 1e-4, report.max_abs_diff


def test_graph_input_and_output_follow_the_contract(tmp_path: Path) -> None:
    graph = tmp_path / "m.onnx"
    export_graph(_model().folded(), graph)
    session = ort.InferenceSession(str(graph), providers=["CPUExecutionProvider"])
    (inp,) = session.get_inputs()
    (out,) = session.get_outputs()
    assert (inp.name, inp.type) == ("patches", "tensor(uint8)")
    assert inp.shape[3] == 4 * 4 * 3 and all(isinstance(d, str) for d in inp.shape[:3])
    assert (out.name, out.type) == ("logits", "tensor(float)")
    (logits,) = session.run(None, {"patches": np.zeros((3, 2, 5, 48), np.uint8)})
    assert logits.shape == (3, 7)


def test_export_writes_the_graph_and_a_model_json_with_its_sha256(tmp_path: Path) -> None:
    spec = _export(_model(), tmp_path)
    graph = tmp_path / "toy" / "1" / GRAPH_FILENAME
    assert spec.versions[1].model == sha256_of(graph)
    assert spec.architecture.grid == (6, 6) and spec.architecture.patch_size == 4
    assert spec.inputs[0].name == "patches" and spec.inputs[0].dtype == "uint8"
    assert spec.labels == [f"c{i}" for i in range(7)]


def test_a_second_export_adds_the_next_version_and_keeps_the_first(tmp_path: Path) -> None:
    _export(_model(0), tmp_path)
    spec = _export(_model(1), tmp_path)
    assert sorted(spec.versions) == [1, 2]
    assert spec.versions[1].model != spec.versions[2].model
    assert (tmp_path / "toy" / "1" / GRAPH_FILENAME).exists()


def test_export_refuses_to_write_a_graph_that_fails_parity(tmp_path: Path) -> None:
    with pytest.raises(ParityError, match="nothing written"):
        _export(_model(), tmp_path, atol=0.0)
    assert not (tmp_path / "toy").exists()
