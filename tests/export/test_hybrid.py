"""Hybrid ViTs (paper §3.1): timm's ResNetV2 + HybridEmbed mapped and exported, parity with timm.

A small hybrid built from timm's own classes (ResNetV2 with two stages, two transformer blocks)
keeps the export fast; timm's named hybrids are checked in PyTorch at their own sizes.
"""

from __future__ import annotations

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

from app.models.grids import fit_grid
from app.models.spec import INTROSPECTION_FILENAME, SPEC_FILENAME, ModelSpec
from app.pipeline.preprocess import prepare
from export.checkpoints import UnsupportedCheckpointError, load_checkpoint, save_checkpoint
from export.hybrid import HybridViT
from export.import_timm import from_timm_model
from export.introspection import filter_components
from export.onnx_export import export_to_repository
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
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Path]:
    timm_model = small_timm_hybrid()
    loaded = from_timm_model(timm_model, checkpoint="small hybrid (random init)")
    repo = tmp_path_factory.mktemp("hybrid-repo")
    export_to_repository(
        loaded.model,
        repo=repo,
        name="hybrid",
        labels=loaded.labels,
        preprocess=loaded.preprocess,
        source=_source(loaded),
    )
    return timm_model, repo


def _source(loaded: Any) -> Any:
    from app.models.spec import Source

    return Source(framework="timm", checkpoint=loaded.checkpoint, notes=loaded.source)


def test_the_hybrid_graph_matches_timm_at_odd_grids(exported: tuple[Any, Path]) -> None:
    timm_model, repo = exported
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


def test_the_hybrid_rollout_graph_serves_its_feature_grid(exported: tuple[Any, Path]) -> None:
    _, repo = exported
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


def test_model_json_records_the_backbone(exported: tuple[Any, Path]) -> None:
    _, repo = exported
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


def test_fit_grids_are_whole_cells_of_the_stride(exported: tuple[Any, Path]) -> None:
    _, repo = exported
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
