"""Paths, the tiny test model and helpers shared by the tests (fixtures live in conftest.py)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from app.models.spec import Architecture, ModelSpec, Preprocess, Source, contract_tensors
from export.vit import VisionTransformer, ViTConfig

ROOT = Path(__file__).resolve().parents[1]
SHARED_TESTDATA = ROOT.parent / "shared" / "testdata"
PHOTOS = SHARED_TESTDATA / "photos"
ODD_IMAGES = SHARED_TESTDATA / "odd-images"
DEMO_MODEL = ROOT / "model_repo" / "demo-shapes"

TINY = "tiny"
TINY_LABELS = [f"class-{i}" for i in range(10)]
TINY_PREPROCESS = Preprocess(resize_mode="shorter_side", crop_pct=0.875, interpolation="bicubic")
FORMATS_HINT = "send a JPEG, PNG, WebP, GIF, BMP or TIFF"


@dataclass(frozen=True)
class TinyRepo:
    root: Path
    name: str
    models: dict[int, VisionTransformer]  # version -> the PyTorch model exported as it

    @property
    def latest(self) -> int:
        return max(self.models)


def tiny_model(seed: int) -> VisionTransformer:
    """A 2-block ViT, patch 8, native grid 8x8 (64x64 pixels), 10 classes."""
    torch.manual_seed(seed)
    model = VisionTransformer(ViTConfig.variant("test", patch_size=8, grid=(8, 8), num_classes=10))
    # The reference init zeroes the head, which would make every answer uniform.
    with torch.no_grad():
        model.head.weight.normal_(0.0, 2.0)
        model.head.bias.normal_(0.0, 0.5)
    return model.eval()


def need_folder(path: Path, what: str) -> None:
    """Skip the calling test, with the reason, when shared test data is absent."""
    if not path.is_dir():
        pytest.skip(f"{what} not found at {path}")


def make_spec(
    preprocess: Preprocess = TINY_PREPROCESS,
    grid: tuple[int, int] = (8, 8),
    patch_size: int = 8,
) -> ModelSpec:
    """A ModelSpec without a graph, for preprocessing tests."""
    arch = Architecture(
        patch_size=patch_size, grid=grid, embed_dim=32, depth=2, heads=2, num_classes=10
    )
    inputs, outputs = contract_tensors(arch)
    return ModelSpec(
        name="unit",
        architecture=arch,
        preprocess=preprocess,
        labels=TINY_LABELS,
        inputs=inputs,
        outputs=outputs,
        source=Source(framework="test"),
    )
