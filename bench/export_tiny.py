"""A ViT-Ti/16 (or ViT-B/16) at 224x224 with random weights, exported for the benchmarks.

    .venv/bin/python -m bench.export_tiny                          # build/bench_repo/vit-ti16
    .venv/bin/python -m bench.export_tiny --variant base --optimize none   # vit-b16, TensorRT's

Only its cost matters (`bench.load`); the export step's parity checks still run. Needs PyTorch.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from app.models.spec import SPEC_FILENAME, OptimizationLevel, Preprocess, Source
from bench.harness import ROOT
from export.onnx_export import export_to_repository
from export.vit import VisionTransformer, ViTConfig

VARIANTS = {"tiny": "vit-ti16", "base": "vit-b16"}  # ViTConfig's variant -> default name


def vit16(variant: str = "tiny") -> VisionTransformer:
    """ViT-Ti/16 or ViT-B/16 at 224x224 (grid 14x14), 1000 classes, random weights (seed 0)."""
    torch.manual_seed(0)
    cfg = ViTConfig.variant(variant, patch_size=16, grid=(14, 14), num_classes=1000)
    return VisionTransformer(cfg).eval()


def vit_ti16() -> VisionTransformer:
    return vit16("tiny")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--repo", type=Path, default=ROOT / "build" / "bench_repo")
    p.add_argument("--variant", choices=sorted(VARIANTS), default="tiny")
    p.add_argument("--name", help="default: vit-ti16 or vit-b16, after the variant")
    p.add_argument(
        "--optimize",
        choices=["none", "fused", "fp16"],
        default="fused",
        help="the graph's form; none for TensorRT (it cannot parse ONNX Runtime's fused ops)",
    )
    a = p.parse_args(argv)
    name = a.name or VARIANTS[a.variant]
    if (a.repo / name / SPEC_FILENAME).exists():
        print(f"{a.repo / name} exists; nothing to do")
        return
    model = vit16(a.variant)
    labels = [f"class_{i}" for i in range(model.cfg.num_classes)]
    optimize: OptimizationLevel = a.optimize
    export_to_repository(
        model,
        a.repo,
        name,
        labels,
        Preprocess(),
        Source(framework="vit-serve"),
        optimize=optimize,
    )
    print(f"wrote {a.repo / name}")


if __name__ == "__main__":
    main()
