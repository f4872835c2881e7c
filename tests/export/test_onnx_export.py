"""Export to ONNX: dynamic grids, parity with PyTorch, and the model repository it writes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from app.models.repository import sha256_of
from app.models.spec import GRAPH_FILENAME, SPEC_FILENAME, ModelSpec, Preprocess, Source
from export.onnx_export import (
    ParityError,
    check_parity,
    export_graph,
    export_rollout_graph,
    export_to_repository,
    parity_grids,
    stage_graph,
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


def readers_of(graph: Path, name: str = "patches") -> list[tuple[str, int | None]]:
    """Every node that reads `name`: its op type and, for a Cast, the type it casts to."""
    nodes = onnx.load(str(graph), load_external_data=False).graph.node
    return [
        (n.op_type, next((a.i for a in n.attribute if a.name == "to"), None))
        for n in nodes
        if name in n.input
    ]


def test_the_uint8_patches_feed_one_cast_and_the_grid_is_read_after_it(tmp_path: Path) -> None:
    # TensorRT takes uint8 only as a network input or output: a Shape node reading `patches`
    # itself keeps it from parsing the graph. So `patches` feeds exactly one Cast to float32,
    # in both graphs, and the grid's Shape nodes read the cast tensor.
    plain, rollout = tmp_path / "m.onnx", tmp_path / "r.onnx"
    export_graph(_model().folded(), plain)
    export_rollout_graph(_model().folded(), rollout)
    for graph in (plain, rollout):
        assert readers_of(graph) == [("Cast", onnx.TensorProto.FLOAT)], graph.name
        model = onnx.load(str(graph))
        (cast,) = [n for n in model.graph.node if "patches" in n.input]
        assert any(n.op_type == "Shape" for n in model.graph.node if cast.output[0] in n.input)


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


def test_an_unknown_optimisation_level_is_refused_not_exported_as_fp16(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A level the export does not know used to fall through every branch to fp16.
    traced: list[Path] = []
    monkeypatch.setattr("export.onnx_export.export_graph", lambda _m, path: traced.append(path))
    with pytest.raises(ValueError, match=r"unknown optimisation level 'fp61'.*fp16"):
        stage_graph(_model(), tmp_path, "fp61", parity_grids((6, 6)))  # type: ignore[arg-type]
    assert traced == []  # refused before any graph was traced
    assert list(tmp_path.iterdir()) == []
