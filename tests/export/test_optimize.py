"""Optimised graphs: fused fp32 within 1e-4 of PyTorch at any grid, fp16 agreeing on top-1,
both keeping the ONNX contract, recorded in model.json and served by the service."""

from __future__ import annotations

import collections
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from app.core.settings import Settings
from app.models.repository import sha256_of
from app.models.spec import GRAPH_FILENAME, SPEC_FILENAME, ModelSpec, OptimizationLevel, Source
from app.pipeline.preprocess import prepare
from export.onnx_export import check_parity, export_graph, export_to_repository
from export.optimize import (
    check_fp16,
    fuse,
    fused_model,
    fused_op_counts,
    grid_only_nodes,
    has_class_token_tail,
    to_fp16,
)
from export.vit import VisionTransformer, ViTConfig
from tests.export.tiny import tiny_model
from tests.images import jpeg
from tests.support import DEMO_MODEL, TINY_LABELS, TINY_PREPROCESS, serve

# Native 8x8, smaller, larger, non-square both ways, a single patch.
GRIDS = [(8, 8), (5, 5), (12, 12), (6, 11), (11, 3), (1, 1)]
CPU = ["CPUExecutionProvider"]
SOURCE = Source(framework="vit-serve", notes="test model")


@dataclass(frozen=True)
class Graphs:
    model: VisionTransformer
    fused: Path
    fp16: Path


def _timm_style_model(seed: int) -> VisionTransformer:
    """The tiny model's shape with timm's antialiased resampling (matmuls, not Resize)."""
    torch.manual_seed(seed)
    cfg = ViTConfig.variant(
        "test", patch_size=8, grid=(8, 8), num_classes=10, pos_interp_antialias=True
    )
    model = VisionTransformer(cfg)
    with torch.no_grad():
        model.head.weight.normal_(0.0, 2.0)
    return model.eval()


def _variant(seed: int, pool: Literal["token", "avg"], qkv_bias: bool = True) -> VisionTransformer:
    torch.manual_seed(seed)
    cfg = ViTConfig.variant(
        "test", patch_size=8, grid=(8, 8), num_classes=10, pool=pool, qkv_bias=qkv_bias
    )
    model = VisionTransformer(cfg)
    with torch.no_grad():
        model.head.weight.normal_(0.0, 2.0)
    return model.eval()


# Both ways the graph resamples position embeddings to the grid: ONNX Resize (bicubic, the
# demo model's and Hugging Face's) and timm's antialiased weights computed in the graph.
@pytest.fixture(scope="module", params=["resize", "antialias"])
def graphs(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Graphs:
    torch.set_num_threads(1)
    tmp = tmp_path_factory.mktemp("optimize")
    model = tiny_model(3) if request.param == "resize" else _timm_style_model(3)
    traced, fused, half = tmp / "traced.onnx", tmp / "fused.onnx", tmp / "fp16.onnx"
    export_graph(fused_model(model.folded()), traced)
    fuse(traced, fused, model.cfg)
    to_fp16(fused, half)
    return Graphs(model, fused, half)


@pytest.mark.parametrize(("pool", "qkv_bias"), [("token", True), ("avg", True), ("token", False)])
def test_the_fused_model_computes_what_the_reference_does(
    pool: Literal["token", "avg"], qkv_bias: bool
) -> None:
    model = _variant(4, pool, qkv_bias)
    fused = fused_model(model)
    # Token pooling reads the class token's row only, so the last block computes only it;
    # average pooling reads every row.
    assert has_class_token_tail(fused) == (pool == "token")
    patches = torch.randint(0, 256, (3, 6, 11, model.cfg.patch_dim), dtype=torch.uint8)
    with torch.no_grad():
        torch.testing.assert_close(fused(patches), model(patches))


def test_the_fused_graph_holds_fused_ops(graphs: Graphs) -> None:
    depth = graphs.model.cfg.depth
    counts = fused_op_counts(graphs.fused)
    assert counts["Attention"] == depth - 1  # the last block's one query row is not fused
    assert counts["LayerNormalization"] == 2 * depth + 1
    assert counts["BiasGelu"] == depth
    ops = collections.Counter(n.op_type for n in onnx.load(str(graphs.fused)).graph.node)
    assert ops["Softmax"] == 1 and not ops["Erf"] and not ops["FastGelu"]  # GELU exact


def test_the_fused_graph_matches_pytorch_at_every_grid(graphs: Graphs) -> None:
    report = check_parity(graphs.model, graphs.fused, GRIDS, batch=3)
    assert set(report.max_abs_diff) == {f"{h}x{w}" for h, w in GRIDS}
    assert report.worst <= 1e-4, report.max_abs_diff


@pytest.mark.parametrize(("pool", "qkv_bias"), [("avg", True), ("token", False)])
def test_other_variants_fused_match_pytorch(
    tmp_path: Path, pool: Literal["token", "avg"], qkv_bias: bool
) -> None:
    model = _variant(7, pool, qkv_bias)
    traced, fused = tmp_path / "traced.onnx", tmp_path / "fused.onnx"
    export_graph(fused_model(model.folded()), traced)
    # Average pooling reads every row: every block keeps its fused attention.
    attention = model.cfg.depth if pool == "avg" else model.cfg.depth - 1
    assert fuse(traced, fused, model.cfg)["Attention"] == attention
    report = check_parity(model, fused, [(8, 8), (6, 11), (3, 2)], batch=3)
    assert report.worst <= 1e-4, report.max_abs_diff


def test_the_fp16_graph_agrees_with_fp32_on_top1_within_the_bound(graphs: Graphs) -> None:
    report = check_fp16(graphs.fused, graphs.fp16, GRIDS, graphs.model.cfg.patch_dim, batch=16)
    assert report.compared == 16 * len(GRIDS)
    assert report.passed, (report.max_abs_diff, report.bound, report.disagreed)
    # The check bites: fp16 differs from fp32, and a bound below that difference fails.
    assert max(report.max_abs_diff.values()) > 0.0
    strict = check_fp16(graphs.fused, graphs.fp16, GRIDS[:1], graphs.model.cfg.patch_dim, rtol=1e-7)
    assert not strict.passed


def test_the_fp16_graph_computes_in_float16_but_resamples_in_float32(graphs: Graphs) -> None:
    half = onnx.load(str(graphs.fp16))
    grid_only = set(grid_only_nodes(onnx.load(str(graphs.fused)), "patches"))
    read_by: dict[str, set[bool]] = {}  # initializer -> {is each reader grid-only}
    for node in half.graph.node:
        for name in node.input:
            read_by.setdefault(name, set()).add(node.name in grid_only)
    floats = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)
    weights = [t for t in half.graph.initializer if t.data_type in floats and len(t.dims) >= 1]
    per_image = [t for t in weights if read_by.get(t.name) == {False}]
    from_grid = [t for t in weights if read_by.get(t.name) == {True}]
    # Every weight the images flow through is float16: projections, attention, norms, head.
    assert len(per_image) >= 4 * graphs.model.cfg.depth
    assert all(t.data_type == onnx.TensorProto.FLOAT16 for t in per_image)
    # The learned position grid (64 positions x D) is read only to be resampled to the
    # request's grid, which stays float32.
    dim = graphs.model.cfg.embed_dim
    assert any(int(np.prod(t.dims)) == 64 * dim for t in from_grid)
    assert all(t.data_type == onnx.TensorProto.FLOAT for t in from_grid)


@pytest.mark.parametrize("form", ["fused", "fp16"])
def test_optimised_graphs_keep_the_contract(graphs: Graphs, form: str) -> None:
    session = ort.InferenceSession(str(getattr(graphs, form)), providers=CPU)
    (inp,) = session.get_inputs()
    (out,) = session.get_outputs()
    assert (inp.name, inp.type) == ("patches", "tensor(uint8)")
    assert inp.shape[3] == graphs.model.cfg.patch_dim
    assert all(isinstance(d, str) for d in inp.shape[:3]), inp.shape  # dynamic, not baked in
    assert (out.name, out.type) == ("logits", "tensor(float)")
    assert out.shape[1] == graphs.model.cfg.num_classes
    for batch, gh, gw in [(1, 8, 8), (3, 2, 5), (2, 13, 7)]:
        x = np.zeros((batch, gh, gw, graphs.model.cfg.patch_dim), dtype=np.uint8)
        (logits,) = session.run(None, {"patches": x})
        assert logits.shape == (batch, 10) and logits.dtype == np.float32


def test_export_records_the_optimisation_in_model_json(tmp_path: Path) -> None:
    model = tiny_model(5)
    result = export_to_repository(
        model, tmp_path, "opt", TINY_LABELS, TINY_PREPROCESS, SOURCE, optimize="fp16"
    )
    spec = ModelSpec.load(tmp_path / "opt" / SPEC_FILENAME)
    files = spec.versions[1]
    assert files.model == sha256_of(tmp_path / "opt" / "1" / GRAPH_FILENAME)
    assert files.optimization.level == "fp16"
    assert files.optimization.fused_ops["Attention"] == model.cfg.depth - 1
    assert files.optimization.class_token_tail
    assert result.fp16 is not None and result.fp16.passed
    assert files.optimization.max_abs_diff == max(result.fp16.max_abs_diff.values())
    assert result.parity.worst <= 1e-4  # the fused fp32 graph it was converted from
    assert result.rollout_parity.worst <= 1e-5  # the rollout graph as before
    # The contract in model.json is the plain graph's.
    assert spec.inputs[0].dtype == "uint8" and spec.outputs[0].dtype == "float32"


def test_a_model_json_written_before_optimisation_existed_still_loads(tmp_path: Path) -> None:
    # The demo model's model.json as it was before `optimization` was recorded.
    written = json.loads((DEMO_MODEL / SPEC_FILENAME).read_text())
    for files in written["versions"].values():
        files.pop("optimization", None)
    (tmp_path / SPEC_FILENAME).write_text(json.dumps(written))
    spec = ModelSpec.load(tmp_path / SPEC_FILENAME)
    assert all(files.optimization.level == "none" for files in spec.versions.values())


@pytest.mark.parametrize("form", ["fused", "fp16"])
def test_optimised_graphs_still_cast_the_patches_first(graphs: Graphs, form: str) -> None:
    # As the plain graph (tests/export/test_onnx_export.py): `patches` feeds one Cast, to
    # float32, or straight to float16 in the fp16 form.
    nodes = onnx.load(str(getattr(graphs, form))).graph.node
    readers = [n for n in nodes if "patches" in n.input]
    assert [n.op_type for n in readers] == ["Cast"]
    (to,) = [a.i for a in readers[0].attribute if a.name == "to"]
    float_type = onnx.TensorProto.FLOAT16 if form == "fp16" else onnx.TensorProto.FLOAT
    assert to == float_type


@pytest.mark.anyio
@pytest.mark.parametrize("form", ["fused", "fp16"])
async def test_the_service_serves_an_optimised_graph(
    tmp_path: Path, form: OptimizationLevel
) -> None:
    model = tiny_model(6)
    export_to_repository(
        model, tmp_path, "opt", TINY_LABELS, TINY_PREPROCESS, SOURCE, optimize=form
    )
    spec = ModelSpec.load(tmp_path / "opt" / SPEC_FILENAME)
    images = [jpeg(96, 72, seed=s) for s in range(4)]
    async with serve(Settings(model_repo=tmp_path)) as client:
        files = [("image", (f"{i}.jpg", data, "image/jpeg")) for i, data in enumerate(images)]
        response = await client.post("/classify", params={"model": "opt"}, files=files)
    assert response.status_code == 200, response.text
    for data, result in zip(images, response.json()["results"], strict=True):
        prepared = prepare(data, spec, "crop", name="x", max_pixels=10**8, fit_max_tokens=128)
        with torch.no_grad():
            logits = model(torch.from_numpy(prepared.patches[None])).numpy()[0]
        assert result["predictions"][0]["label"] == TINY_LABELS[int(logits.argmax())]
