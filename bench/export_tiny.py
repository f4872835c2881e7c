"""Export a randomly initialised ViT-Ti/16 at 224x224 into an ignored bench repository.

    .venv/bin/python -m bench.export_tiny                 # -> build/bench_repo/vit-ti16

Only its cost matters to the benchmarks (`bench.load`), so the weights are random; the export
step's parity checks still run. Needs the export extra (PyTorch).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from app.spec import SPEC_FILENAME, Preprocess, Source
from export.onnx_export import export_to_repository
from export.vit import VisionTransformer, ViTConfig

ROOT = Path(__file__).resolve().parent.parent


def vit_ti16() -> VisionTransformer:
    """ViT-Ti/16 at 224x224 (grid 14x14), 1000 classes, random weights (seed 0)."""
    torch.manual_seed(0)
    cfg = ViTConfig.variant("tiny", patch_size=16, grid=(14, 14), num_classes=1000)
    return VisionTransformer(cfg).eval()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--repo", type=Path, default=ROOT / "build" / "bench_repo")
    p.add_argument("--name", default="vit-ti16")
    a = p.parse_args(argv)
    if (a.repo / a.name / SPEC_FILENAME).exists():
        print(f"{a.repo / a.name} exists; nothing to do")
        return
    model = vit_ti16()
    labels = [f"class_{i}" for i in range(model.cfg.num_classes)]
    export_to_repository(model, a.repo, a.name, labels, Preprocess(), Source(framework="vit-serve"))
    print(f"wrote {a.repo / a.name}")


if __name__ == "__main__":
    main()
