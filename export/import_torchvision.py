"""torchvision VisionTransformer state dicts (vit_b_16 ... vit_h_14) -> the reference model.

Sizes come from the tensors (heads from the architecture's name, or given for a custom size);
preprocessing and class names from torchvision's weights enum for the native size. torchvision
runs only at its native size; other grids resample as its offline `interpolate_embeddings` does
(bicubic, align_corners=True).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import cast

from torch import Tensor, nn

from app.models.spec import Interpolation, Preprocess
from export.checkpoints import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    LoadedViT,
    Reference,
    SourceTensors,
    Triple,
    UnsupportedCheckpointError,
    assemble,
    block_keys,
    class_labels,
    conv_to_linear,
    crop_fraction,
    interpolation_name,
    read_state_dict,
    square_grid,
)
from export.vit import ViTConfig

log = logging.getLogger(__name__)


# name -> (patch, depth, heads, width, mlp width), torchvision.models.vision_transformer's.
TORCHVISION_ARCHS: dict[str, tuple[int, int, int, int, int]] = {
    "vit_b_16": (16, 12, 12, 768, 3072),
    "vit_b_32": (32, 12, 12, 768, 3072),
    "vit_l_16": (16, 24, 16, 1024, 4096),
    "vit_l_32": (32, 24, 16, 1024, 4096),
    "vit_h_14": (14, 32, 16, 1280, 5120),
}


@dataclass(frozen=True)
class TorchvisionPreset:
    """What a torchvision weights enum's `transforms()` does, and its class names."""

    name: str
    crop_size: int
    resize_size: int
    interpolation: Interpolation
    mean: Triple
    std: Triple
    categories: list[str] | None


def torchvision_preset(arch: str, image_size: int, weights_name: str | None) -> TorchvisionPreset:
    """The named weights enum's preprocessing, else the first of `arch` at `image_size`.

    torchvision's ImageClassification preset: resize the shorter side to resize_size, centre
    crop crop_size. A size no published weights have (a custom model) gets its defaults:
    resize 256/224 of the crop, bilinear, ImageNet mean/std.
    """
    from torchvision.models import get_model_weights

    enum = get_model_weights(arch) if arch in TORCHVISION_ARCHS else None
    candidates = list(enum) if enum is not None else []
    if weights_name is not None:
        candidates = [w for w in candidates if w.name == weights_name]
        if not candidates:
            known = [w.name for w in get_model_weights(arch)] if enum else []
            raise ValueError(f"no torchvision weights {weights_name!r} for {arch}; known: {known}")
    for w in candidates:
        t = w.transforms()
        if t.crop_size[0] == image_size:
            return TorchvisionPreset(
                name=f"{type(w).__name__}.{w.name}",
                crop_size=t.crop_size[0],
                resize_size=t.resize_size[0],
                interpolation=interpolation_name(t.interpolation.value),
                mean=cast(Triple, tuple(t.mean)),
                std=cast(Triple, tuple(t.std)),
                categories=list(w.meta["categories"]),
            )
    if weights_name is not None:
        raise ValueError(f"torchvision weights {weights_name} are not for {image_size} px images")
    return TorchvisionPreset(
        name="ImageClassification defaults",
        crop_size=image_size,
        resize_size=math.floor(image_size * 256 / 224),
        interpolation="bilinear",
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        categories=None,
    )


def load_torchvision(
    arch: str,
    weights: Path,
    num_heads: int | None = None,
    weights_name: str | None = None,
) -> LoadedViT:
    """A torchvision VisionTransformer state dict (`arch` one of TORCHVISION_ARCHS).

    Sizes are read from the tensors; they must be the named architecture's unless `num_heads`
    is given (a custom-sized torchvision ViT: heads are not in the weights). The preprocessing
    is that of the torchvision weights `weights_name`, by default the first published ones for
    the native size (vit_b_16 at 224: IMAGENET1K_V1, resize 256, crop 224, bilinear).
    """
    if arch not in TORCHVISION_ARCHS:
        raise ValueError(
            f"unknown torchvision ViT {arch!r}; choose from {sorted(TORCHVISION_ARCHS)}"
        )
    what = f"torchvision {arch} ({weights.name})"
    src = SourceTensors(read_state_dict(weights), what)
    if src.has("heads.pre_logits.weight"):
        raise UnsupportedCheckpointError(f"{what}: a pre-logits layer (representation_size)")
    proj = src.take("conv_proj.weight")  # (D, 3, P, P)
    D, C, P = proj.shape[0], proj.shape[1], proj.shape[2]
    if C != 3:
        raise UnsupportedCheckpointError(f"{what}: {C} input channels")
    pos = src.take("encoder.pos_embedding")  # (1, 1 + N, D)
    side = square_grid(pos.shape[1] - 1, what)
    depth = len({k.split(".")[2] for k in src.left if k.startswith("encoder.layers.")})
    fc1 = next(
        (v for k, v in src.left.items() if k.endswith(("mlp.0.weight", "mlp.linear_1.weight"))),
        None,
    )
    if fc1 is None:
        raise UnsupportedCheckpointError(f"{what}: no encoder layers")
    mlp = fc1.shape[0]
    patch, want_depth, heads, width, want_mlp = TORCHVISION_ARCHS[arch]
    if num_heads is not None:
        heads = num_heads
    elif (P, depth, D, mlp) != (patch, want_depth, width, want_mlp):
        raise UnsupportedCheckpointError(
            f"{what}: patch {P}, depth {depth}, width {D}, mlp {mlp} are not {arch}'s "
            f"({patch}, {want_depth}, {width}, {want_mlp}); pass num_heads for a custom size"
        )
    mapped: dict[str, Tensor] = {
        "patch_embed.proj.weight": conv_to_linear(proj),
        "patch_embed.proj.bias": src.take("conv_proj.bias"),
        "cls_token": src.take("class_token"),
        "pos_embed": pos,
    }
    for i in range(depth):
        ours, theirs = block_keys(i), f"encoder.layers.encoder_layer_{i}"
        mapped[f"{ours['qkv']}.weight"] = src.take(f"{theirs}.self_attention.in_proj_weight")
        mapped[f"{ours['qkv']}.bias"] = src.take(f"{theirs}.self_attention.in_proj_bias")
        for part, names in (
            ("proj", (f"{theirs}.self_attention.out_proj",)),
            ("norm1", (f"{theirs}.ln_1",)),
            ("norm2", (f"{theirs}.ln_2",)),
            # torchvision < 0.13 named the MLP's linears linear_1/linear_2.
            ("fc1", (f"{theirs}.mlp.0", f"{theirs}.mlp.linear_1")),
            ("fc2", (f"{theirs}.mlp.3", f"{theirs}.mlp.linear_2")),
        ):
            mapped.update(src.take_layer(ours[part], *names))
    mapped.update(src.take_layer("norm", "encoder.ln"))
    mapped.update(src.take_layer("head", "heads.head"))
    src.finish()

    image_size = side * P
    preset = torchvision_preset(arch, image_size, weights_name)
    num_classes = mapped["head.weight"].shape[0]
    cfg = ViTConfig(
        patch_size=P,
        grid=(side, side),
        embed_dim=D,
        depth=depth,
        heads=heads,
        mlp_dim=mlp,
        num_classes=num_classes,
        qkv_bias=True,
        ln_eps=1e-6,
        mean=preset.mean,
        std=preset.std,
        # torchvision runs only at its native size; other grids resample as its offline
        # `interpolate_embeddings` does (bicubic, align_corners=True).
        pos_interp_align_corners=True,
    )
    model = assemble(cfg, mapped)
    preprocess = Preprocess(
        resize_mode="shorter_side",
        crop_pct=crop_fraction(preset.crop_size, preset.resize_size),
        interpolation=preset.interpolation,
        mean=preset.mean,
        std=preset.std,
    )
    categories = preset.categories
    labels = categories if categories and len(categories) == num_classes else None
    return LoadedViT(
        model=model,
        labels=labels or class_labels(num_classes),
        preprocess=preprocess,
        source=f"{what}; preprocessing of {preset.name}; other grids resample position "
        "embeddings as torchvision's interpolate_embeddings (bicubic, align_corners=True)",
        framework="torchvision",
        checkpoint=weights.name,
        reference=_torchvision_reference(
            weights,
            image_size=image_size,
            patch_size=P,
            num_layers=depth,
            num_heads=heads,
            hidden_dim=D,
            mlp_dim=mlp,
            num_classes=num_classes,
        ),
    )


def _torchvision_reference(weights: Path, **sizes: int) -> Reference | None:
    """torchvision's own VisionTransformer with the weights, built on first use."""
    try:
        from torchvision.models.vision_transformer import VisionTransformer as TVViT
    except ImportError:
        return None
    loaded: list[nn.Module] = []

    def reference(pixels: Tensor) -> Tensor:
        if not loaded:
            model = TVViT(**sizes)
            model.load_state_dict(read_state_dict(weights))
            loaded.append(model.eval())
        out: Tensor = loaded[0](pixels)
        return out

    return reference
