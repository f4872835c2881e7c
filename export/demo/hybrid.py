"""The demo hybrid (paper §3.1): a small ResNetV2 stem and stage, then a few transformer blocks.

The CNN turns the 64x64 image into an 8x8 map of 128 channels (stride 8, so the same 8x8 token
grid and patch size as the demo ViT, and the same ONNX contract); each cell is one 1x1 patch.
Three blocks of width 96 after it: the CNN's prior lets a smaller transformer learn the shapes
within a CPU budget of minutes.
"""

from __future__ import annotations

from export.demo.shapes import CLASSES
from export.hybrid import BackboneConfig, HybridViT, StageConfig
from export.vit import ViTConfig

IMAGE_SIZE = 64

DEMO_BACKBONE = BackboneConfig(
    stem_chs=32,
    stem_kernel=7,
    stem_stride=2,
    stem_pool=True,
    stages=(StageConfig(blocks=1, out_chs=128, mid_chs=32, stride=2),),
    proj_kernel=1,
    gn_groups=8,
)


def demo_hybrid_config() -> ViTConfig:
    P = DEMO_BACKBONE.stride
    return ViTConfig(
        patch_size=P,
        grid=(IMAGE_SIZE // P, IMAGE_SIZE // P),
        embed_dim=96,
        depth=3,
        heads=3,
        num_classes=len(CLASSES),
        mean=(0.5, 0.5, 0.5),
        std=(0.25, 0.25, 0.25),
    )


def demo_hybrid(cfg: ViTConfig | None = None) -> HybridViT:
    return HybridViT(cfg or demo_hybrid_config(), DEMO_BACKBONE)
