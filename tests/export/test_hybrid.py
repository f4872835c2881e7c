"""Hybrid ViTs (paper §3.1): timm's ResNetV2 + HybridEmbed mapped and exported, parity with timm.

A small hybrid built from timm's own classes (ResNetV2 with two stages, two transformer blocks)
keeps the export fast; timm's named hybrids are checked in PyTorch at their own sizes, and one
goes through `python -m export --timm` at a small size. The export's own gate compares the
graph with timm's forward (built with dynamic_img_size, so timm resamples its own position
embeddings) at the four parity grids before writing; the tests prove it fails where the graph's
resampling is not timm's, and compare with timm at six other grids after the fact.
"""

from __future__ import annotations

import json
import logging
import re
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
import timm
import torch
from timm.layers import StdConv2dSame
from timm.layers.hybrid_embed import HybridEmbed
from timm.models.resnetv2 import ResNetV2
from timm.models.vision_transformer import VisionTransformer as TimmViT

import export.vit
from app.models.grids import fit_grid
from app.models.spec import INTROSPECTION_FILENAME, SPEC_FILENAME, ModelSpec
from app.pipeline.preprocess import prepare
from export.__main__ import main
from export.checkpoints import (
    UnsupportedCheckpointError,
    load_checkpoint,
    save_checkpoint,
    source_gate,
)
from export.hybrid import HybridViT
from export.import_timm import from_timm_model
from export.introspection import filter_components
from export.onnx_export import ExportResult, ParityError, export_to_repository
from export.vit import patchify
from tests.images import encode

# Not 1x1: there the last stage's map is one cell, GroupNorm normalises groups of one value
# (x - mean is rounding noise, divided by sqrt(eps)) and any two runtimes differ by ~1e-4.
ODD_GRIDS = [(8, 8), (5, 5), (11, 11), (5, 7), (3, 9), (7, 3)]


def _randomise_norms(model: Any, seed: int = 0) -> Any:
    """timm initialises GroupNorm to identity; random affine terms make parity mean more."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.GroupNorm):
                m.weight.copy_(torch.rand(m.weight.shape, generator=gen) + 0.5)
                m.bias.copy_(torch.rand(m.bias.shape, generator=gen) - 0.5)
    return model.eval()


def small_timm_hybrid() -> Any:
    """timm's hybrid recipe (StdConv2dSame, 'same' stem, non-pre-activation bottlenecks) at
    test size: stride 8 (stem 4, second stage 2), 64x64 -> an 8x8 grid of 1x1 cells."""
    backbone = ResNetV2(
        layers=(1, 1),
        channels=(128, 256),
        stem_chs=32,
        num_classes=0,
        global_pool="",
        preact=False,
        stem_type="same",
        conv_layer=partial(StdConv2dSame, eps=1e-8),
    )
    model = TimmViT(
        img_size=64,
        patch_size=1,
        embed_layer=partial(HybridEmbed, backbone=backbone),
        embed_dim=32,
        depth=2,
        num_heads=2,
        num_classes=10,
        dynamic_img_size=True,
    )
    torch.nn.init.normal_(model.head.weight, std=0.5)
    return _randomise_norms(model)


def _timm_logits(model: Any, images: torch.Tensor) -> np.ndarray:
    """timm's forward on uint8 images, normalised with its data config's mean and std."""
    config = timm.data.resolve_data_config({}, model=model)
    mean, std = torch.tensor(config["mean"]), torch.tensor(config["std"])
    pixels = ((images.float() / 255.0 - mean) / std).permute(0, 3, 1, 2)
    with torch.no_grad():
        out: np.ndarray = model(pixels).numpy()
    return out


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Path, ExportResult]:
    timm_model = small_timm_hybrid()
    loaded = from_timm_model(timm_model, checkpoint="small hybrid (random init)")
    repo = tmp_path_factory.mktemp("hybrid-repo")
    result = export_to_repository(
        loaded.model,
        repo=repo,
        name="hybrid",
        labels=loaded.labels,
        preprocess=loaded.preprocess,
        source=_source(loaded),
        reference=source_gate(loaded),
    )
    return timm_model, repo, result


def _source(loaded: Any) -> Any:
    from app.models.spec import Source

    return Source(framework="timm", checkpoint=loaded.checkpoint, notes=loaded.source)


def test_the_export_gates_the_graph_against_timm_at_four_grids(
    exported: tuple[Any, Path, ExportResult],
) -> None:
    _, _, result = exported
    versus = result.source_parity
    assert versus is not None and versus.atol == 1e-4
    # Native, smaller, larger, non-square, in units of the backbone's stride (8 px).
    assert list(versus.max_abs_diff) == ["8x8", "5x5", "12x12", "6x11"]
    # Two implementations rounding differently: never exactly equal, always within the bound.
    assert all(0 < diff <= 1e-4 for diff in versus.max_abs_diff.values()), versus.max_abs_diff
    # The same inputs as the gate against PyTorch (one seed), at the same grids.
    assert list(result.parity.max_abs_diff) == list(versus.max_abs_diff)


def test_the_gate_fails_where_the_graphs_resampling_is_not_timms(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Plain bicubic where timm's is antialiased (another kernel, a = -0.75 not -0.5): the
    # identity at the native grid, a different resampling at every other. The PyTorch
    # reference and its graph share the mistake, so only the comparison with timm sees it.
    resample = export.vit.resample_grid

    def not_antialiased(
        pos: torch.Tensor, size: tuple[int, int], align_corners: bool, antialias: bool = False
    ) -> torch.Tensor:
        return resample(pos, size, align_corners, False)

    monkeypatch.setattr(export.vit, "resample_grid", not_antialiased)
    loaded = from_timm_model(small_timm_hybrid())
    repo = tmp_path / "repo"
    with pytest.raises(ParityError) as failed:
        export_to_repository(
            loaded.model,
            repo=repo,
            name="hybrid",
            labels=loaded.labels,
            preprocess=loaded.preprocess,
            source=_source(loaded),
            optimize="none",
            reference=source_gate(loaded),
        )
    report = failed.value.report
    assert report is not None and list(report.max_abs_diff) == ["8x8", "5x5", "12x12", "6x11"]
    diffs = report.max_abs_diff
    assert diffs["8x8"] <= 1e-4, diffs
    assert all(diffs[grid] > 1e-4 for grid in ("5x5", "12x12", "6x11")), diffs
    worst = max(diffs, key=lambda grid: diffs[grid])
    every = ", ".join(f"{grid}: {diff:.2e}" for grid, diff in diffs.items())
    assert str(failed.value) == (
        f"ONNX Runtime logits differ from timm's own forward at grid {worst}: max |diff| "
        f"{diffs[worst]:.2e} > 1e-04 (per grid: {every}); nothing written"
    )
    assert not repo.exists()


def test_the_cli_gates_a_named_timm_hybrid_at_four_grids(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # vit_tiny_r_s16_p8_224's recipe (the ResNetV2 stem, 8x8 cells: P = 32) at a test size.
    timm_args = dict(img_size=128, embed_dim=32, depth=1, num_heads=2, num_classes=5)
    argv = ["--timm", "vit_tiny_r_s16_p8_224", "--timm-args", json.dumps(timm_args)]
    argv += ["--name", "hybrid", "--repo", str(tmp_path), "--optimize", "none"]
    with caplog.at_level(logging.INFO):
        assert main(argv) == 0
    lines = [r.getMessage() for r in caplog.records]
    gate = r"logits parity with timm's own forward at grid (\d+x\d+): max \|diff\| (\S+)"
    figures = {m[1]: float(m[2]) for line in lines if (m := re.fullmatch(gate, line))}
    assert list(figures) == ["4x4", "2x2", "6x6", "2x7"], lines
    assert all(diff <= 1e-4 for diff in figures.values()), figures
    assert not any("native grid only" in line for line in lines)
    assert ModelSpec.load(tmp_path / "hybrid" / SPEC_FILENAME).architecture.patch_size == 32


def test_the_hybrid_graph_matches_timm_at_odd_grids(
    exported: tuple[Any, Path, ExportResult],
) -> None:
    timm_model, repo, _ = exported
    spec = ModelSpec.load(repo / "hybrid" / SPEC_FILENAME)
    assert spec.architecture.patch_size == 8 and spec.architecture.grid == (8, 8)
    assert spec.inputs[0].shape == ["batch", "grid_h", "grid_w", 8 * 8 * 3]
    session = ort.InferenceSession(str(repo / "hybrid" / "1" / "model.onnx"))
    gen = torch.Generator().manual_seed(1)
    for gh, gw in ODD_GRIDS:
        images = torch.randint(0, 256, (2, gh * 8, gw * 8, 3), dtype=torch.uint8, generator=gen)
        (got,) = session.run(["logits"], {"patches": patchify(images, 8).numpy()})
        want = _timm_logits(timm_model, images)
        assert np.abs(got - want).max() <= 1e-4, (gh, gw)


def test_the_hybrid_rollout_graph_serves_its_feature_grid(
    exported: tuple[Any, Path, ExportResult],
) -> None:
    _, repo, _ = exported
    session = ort.InferenceSession(str(repo / "hybrid" / "1" / "model.rollout.onnx"))
    patches = np.random.default_rng(0).integers(0, 256, (1, 5, 7, 192), dtype=np.uint8)
    feeds = {
        "patches": patches,
        "head_fusion": np.array(0, np.int64),
        "discard_ratio": np.array(0.0, np.float32),
    }
    rollout, distance, pos = session.run(
        ["rollout", "attention_distance", "position_embeddings"], feeds
    )
    assert rollout.shape == (1, 5, 7)
    assert distance.shape == (1, 2, 2) and np.all(distance > 0)
    assert pos.shape == (5, 7, 32)


def test_model_json_records_the_backbone(exported: tuple[Any, Path, ExportResult]) -> None:
    _, repo, _ = exported
    spec = ModelSpec.load(repo / "hybrid" / SPEC_FILENAME)
    backbone = spec.architecture.backbone
    assert backbone is not None
    assert backbone.kind == "resnetv2" and backbone.stride == 8
    assert backbone.feature_stride == 8 and backbone.feature_channels == 256
    assert backbone.description == "ResNetV2 stem+[1,1], 1x1 cells"
    assert (repo / "hybrid" / "1" / INTROSPECTION_FILENAME).is_file()
    assert spec.versions[1].introspection is not None


def test_a_plain_model_json_has_no_backbone() -> None:
    spec = ModelSpec.load(Path("tests/model_repo/tiny/model.json"))
    assert spec.architecture.backbone is None


@pytest.mark.parametrize("name", ["vit_tiny_r_s16_p8_224", "vit_small_r26_s32_224"])
def test_timm_named_hybrids_map_exactly(name: str) -> None:
    timm_model = _randomise_norms(timm.create_model(name, dynamic_img_size=True))
    loaded = from_timm_model(timm_model)
    model = loaded.model
    assert isinstance(model, HybridViT) and model.cfg.patch_size == 32
    assert model.cfg.grid == (7, 7)
    gen = torch.Generator().manual_seed(2)
    for gh, gw in [(7, 7), (3, 5)]:
        images = torch.randint(0, 256, (1, gh * 32, gw * 32, 3), dtype=torch.uint8, generator=gen)
        with torch.no_grad():
            ours = model(patchify(images, 32)).numpy()
        assert np.abs(ours - _timm_logits(timm_model, images)).max() <= 1e-4, (gh, gw)


def test_a_pre_activation_backbone_is_refused_with_the_reason() -> None:
    backbone = ResNetV2(
        layers=(1,), channels=(128,), stem_chs=32, num_classes=0, global_pool="", preact=True
    )
    model = TimmViT(
        img_size=64,
        patch_size=1,
        embed_layer=partial(HybridEmbed, backbone=backbone),
        embed_dim=32,
        depth=1,
        num_heads=2,
        num_classes=10,
    )
    with pytest.raises(UnsupportedCheckpointError, match="a pre-activation ResNetV2"):
        from_timm_model(model.eval())


def test_a_hybrid_checkpoint_round_trips(tmp_path: Path) -> None:
    model = from_timm_model(small_timm_hybrid()).model
    path = tmp_path / "hybrid.pt"
    save_checkpoint(path, model, labels=[f"c{i}" for i in range(10)], source="test")
    back = load_checkpoint(path).model
    assert isinstance(back, HybridViT) and back.backbone == model.backbone
    patches = torch.randint(0, 256, (2, 4, 6, 192), dtype=torch.uint8)
    with torch.no_grad():
        torch.testing.assert_close(back(patches), model(patches), rtol=0, atol=0)


def test_a_hybrids_filter_components_are_over_its_feature_channels() -> None:
    model = from_timm_model(small_timm_hybrid()).model
    fc = filter_components(model)
    assert fc.shape == [256, 1, 1] and fc.components.shape == (28, 256)
    np.testing.assert_allclose(fc.components @ fc.components.T, np.eye(28), atol=1e-10)
    assert "no pixel filters" in fc.shown


def test_fit_grids_are_whole_cells_of_the_stride(
    exported: tuple[Any, Path, ExportResult],
) -> None:
    _, repo, _ = exported
    spec = ModelSpec.load(repo / "hybrid" / SPEC_FILENAME)
    from PIL import Image

    photo = encode(Image.new("RGB", (300, 170), (200, 30, 30)), "PNG")
    prepared = prepare(photo, spec, "fit", name="x", max_pixels=10**7, fit_max_tokens=128)
    gh, gw = prepared.grid
    assert (gh, gw) == fit_grid(300, 170, 64, 128)
    # Each patch is one token's 8x8 pixels: the CNN sees an image of whole strides.
    assert prepared.patches.shape == (gh, gw, 8 * 8 * 3)


def test_the_bundled_hybrid_is_at_least_as_accurate_as_the_demo_vit() -> None:
    from app.models.repository import scan_repository
    from export.demo.evaluate import evaluate
    from tests.support import DEMO_MODEL, need_folder

    hybrid = DEMO_MODEL.parent / "demo-shapes-hybrid"
    need_folder(hybrid, "the demo hybrid (trained by export/demo/train.py --hybrid)")
    spec = ModelSpec.load(hybrid / SPEC_FILENAME)
    assert spec.architecture.backbone is not None
    assert spec.architecture.patch_size == spec.architecture.backbone.stride == 8
    # The same 1000-image evaluation split for both (seed 4242, no training run's).
    vit = evaluate(DEMO_MODEL.parent, DEMO_MODEL.name, 1000).top1
    ours = evaluate(DEMO_MODEL.parent, hybrid.name, 1000).top1
    assert ours >= vit, (ours, vit)
    # The default model is the first by name: still the demo ViT.
    assert scan_repository(DEMO_MODEL.parent).default_model == DEMO_MODEL.name
