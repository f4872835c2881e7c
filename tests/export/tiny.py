"""The tiny test model's PyTorch side: its weights, and the export that wrote tests/model_repo.

After a change to the export that changes its graphs or model.json, rewrite the repository the
service's tests use (tests/export/test_tiny_repository.py says when it is out of date):

    .venv/bin/python -m tests.export.tiny
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from app.models.spec import Source
from export.onnx_export import export_to_repository
from export.vit import VisionTransformer, ViTConfig
from tests.support import TINY, TINY_LABELS, TINY_PREPROCESS, TINY_REPO, TinyRepo

TINY_SEEDS = {1: 1, 2: 2}  # version -> the seed of its weights
TINY_SOURCE = Source(framework="vit-serve", notes="test model")


@dataclass(frozen=True)
class TinyTorchRepo(TinyRepo):
    models: dict[int, VisionTransformer]  # version -> the PyTorch model exported as it


def tiny_model(seed: int) -> VisionTransformer:
    """A 2-block ViT, patch 8, native grid 8x8 (64x64 pixels), 10 classes."""
    torch.manual_seed(seed)
    model = VisionTransformer(ViTConfig.variant("test", patch_size=8, grid=(8, 8), num_classes=10))
    # The reference init zeroes the head, which would make every answer uniform.
    with torch.no_grad():
        model.head.weight.normal_(0.0, 2.0)
        model.head.bias.normal_(0.0, 0.5)
    return model.eval()


def export_tiny(root: Path) -> None:
    """Model `tiny`, versions 1 and 2 (different weights), exported with parity checks."""
    for version, seed in TINY_SEEDS.items():
        model = tiny_model(seed)
        export_to_repository(model, root, TINY, TINY_LABELS, TINY_PREPROCESS, TINY_SOURCE, version)


if __name__ == "__main__":
    # One thread: OpenMP workers spin while they wait, which on a small machine that is busy
    # with other work turns a 1 s export into 15 s.
    torch.set_num_threads(1)
    shutil.rmtree(TINY_REPO / TINY, ignore_errors=True)
    export_tiny(TINY_REPO)
    print(f"wrote {TINY_REPO / TINY}")
