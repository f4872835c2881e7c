"""Hugging Face `ViTForImageClassification` directories -> the reference model.

Read straight from the files (config.json, model.safetensors / shards / pytorch_model.bin,
preprocessor_config.json), so importing needs no transformers; when it is installed it is the
reference the mapping is checked against. Other grids resample position embeddings as
`interpolate_pos_encoding` does: bicubic, align_corners=False, no antialias.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any, cast

import torch
from torch import Tensor, nn

from app.models.spec import Interpolation, Preprocess
from export.checkpoints import (
    LoadedViT,
    Reference,
    SourceTensors,
    Triple,
    UnsupportedCheckpointError,
    assemble,
    block_keys,
    conv_to_linear,
    crop_fraction,
    read_state_dict,
)
from export.vit import ViTConfig

log = logging.getLogger(__name__)


# PIL's resampling filter numbers, as preprocessor_config.json stores them.
_PIL_RESAMPLE: dict[int, Interpolation] = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic"}


def _hf_state_dict(directory: Path) -> dict[str, Tensor]:
    single = directory / "model.safetensors"
    index = directory / "model.safetensors.index.json"
    if single.is_file():
        return read_state_dict(single)
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        out: dict[str, Tensor] = {}
        for shard in shards:
            out.update(read_state_dict(directory / shard))
        return out
    legacy = directory / "pytorch_model.bin"
    if legacy.is_file():
        return read_state_dict(legacy)
    raise UnsupportedCheckpointError(
        f"{directory}: no model.safetensors, model.safetensors.index.json or pytorch_model.bin"
    )


def _hf_size(value: Any) -> tuple[int, int]:
    if isinstance(value, int):
        return value, value
    h, w = value
    return int(h), int(w)


def _hf_preprocess(directory: Path, native: tuple[int, int]) -> Preprocess:
    """Hugging Face's image processor config as our resize policy.

    ViTImageProcessor resizes straight to `size` (squash) and rescales/normalises; DeiT-style
    processors then centre-crop `crop_size`, a squash with a crop fraction. Without the file,
    ViTImageProcessor's defaults at the model's size.
    """
    path = directory / "preprocessor_config.json"
    raw: dict[str, Any] = json.loads(path.read_text()) if path.is_file() else {}
    what = str(path)
    if not raw.get("do_resize", True):
        raise UnsupportedCheckpointError(f"{what}: do_resize is false (images of any size)")
    size = raw.get("size", {"height": native[0], "width": native[1]})
    if isinstance(size, int):
        size = {"height": size, "width": size}
    resample = int(raw.get("resample", 2))
    if resample not in _PIL_RESAMPLE:
        raise UnsupportedCheckpointError(
            f"{what}: resample {resample} (PIL filter) is not supported"
        )
    crop = raw.get("crop_size") if raw.get("do_center_crop", False) else None
    if isinstance(crop, int):
        crop = {"height": crop, "width": crop}
    out_size = (crop["height"], crop["width"]) if crop else None
    if "shortest_edge" in size:
        if out_size is None:
            raise UnsupportedCheckpointError(f"{what}: shortest_edge resize without a centre crop")
        mode, resize_to = "shorter_side", (size["shortest_edge"], size["shortest_edge"])
    elif "height" in size and "width" in size:
        mode, resize_to = "squash", (size["height"], size["width"])
    else:
        raise UnsupportedCheckpointError(
            f"{what}: size {size} is not height/width or shortest_edge"
        )
    final = out_size or resize_to
    if tuple(final) != native:
        raise UnsupportedCheckpointError(
            f"{what}: the processor makes {final[0]}x{final[1]} images but the model's "
            f"image_size is {native[0]}x{native[1]}"
        )
    crop_pct = 1.0
    if out_size is not None:
        fractions = {crop_fraction(out_size[k], resize_to[k]) for k in (0, 1)}
        if len(fractions) != 1:
            raise UnsupportedCheckpointError(f"{what}: different crop fractions per side")
        crop_pct = fractions.pop()
    # Our patch embedding computes (x / 255 - mean) / std; a processor computes
    # (x * rescale - mean) / std, which is the same with mean, std divided by 255 * rescale.
    rescale = float(raw.get("rescale_factor", 1 / 255)) if raw.get("do_rescale", True) else 1.0
    if raw.get("do_normalize", True):
        mean = raw.get("image_mean", [0.5, 0.5, 0.5])
        std = raw.get("image_std", [0.5, 0.5, 0.5])
    else:
        mean, std = [0.0, 0.0, 0.0], [1.0, 1.0, 1.0]
    if isinstance(mean, float | int):
        mean = [mean] * 3
    if isinstance(std, float | int):
        std = [std] * 3
    unit = 255.0 * rescale
    if math.isclose(unit, 1.0, rel_tol=1e-9):
        unit = 1.0  # 1/255 stored as a decimal: keep mean and std exactly as written
    return Preprocess(
        resize_mode=mode,  # type: ignore[arg-type]
        crop_pct=crop_pct,
        interpolation=_PIL_RESAMPLE[resample],
        mean=cast(Triple, tuple(float(m) / unit for m in mean)),
        std=cast(Triple, tuple(float(s) / unit for s in std)),
    )


def load_hf(directory: Path) -> LoadedViT:
    """A Hugging Face `ViTForImageClassification` directory, read from its files.

    transformers is not needed to import (it is used, when installed, as the reference the
    mapping is checked against). Both spellings of the weights are read: the files' own
    (`vit.encoder.layer.N.attention.attention.query`, ...) and transformers 5's module names
    (`vit.layers.N.attention.q_proj`, ...).
    """
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise UnsupportedCheckpointError(
            f"{directory}: no config.json (a save_pretrained directory?)"
        )
    config: dict[str, Any] = json.loads(config_path.read_text())
    what = f"Hugging Face {directory.name}"
    if config.get("model_type") != "vit":
        raise UnsupportedCheckpointError(
            f"{what}: model_type {config.get('model_type')!r}, not vit"
        )
    if config.get("hidden_act", "gelu") != "gelu":
        raise UnsupportedCheckpointError(f"{what}: hidden_act {config['hidden_act']!r} (gelu only)")
    if int(config.get("num_channels", 3)) != 3:
        raise UnsupportedCheckpointError(f"{what}: {config['num_channels']} input channels")
    P = int(config.get("patch_size", 16))
    image = _hf_size(config.get("image_size", 224))
    if image[0] % P or image[1] % P:
        raise UnsupportedCheckpointError(f"{what}: image_size {image} is not a multiple of {P}")

    src = SourceTensors(_hf_state_dict(directory), what)
    # Weights a classifier never uses: the masked-image-modelling token, ViTModel's pooler.
    src.drop(
        "vit.embeddings.mask_token",
        "vit.pooler.dense.weight",
        "vit.pooler.dense.bias",
    )
    if not src.has("classifier.weight"):
        raise UnsupportedCheckpointError(
            f"{what}: no classifier weights (a ViTModel, not a ViTForImageClassification)"
        )
    depth = int(config.get("num_hidden_layers", 12))
    D = int(config.get("hidden_size", 768))
    heads = int(config.get("num_attention_heads", 12))
    preprocess = _hf_preprocess(directory, image)
    emb = "vit.embeddings"
    mapped: dict[str, Tensor] = {
        "patch_embed.proj.weight": conv_to_linear(
            src.take(f"{emb}.patch_embeddings.projection.weight")
        ),
        "patch_embed.proj.bias": src.take(f"{emb}.patch_embeddings.projection.bias"),
        "cls_token": src.take(f"{emb}.cls_token"),
        "pos_embed": src.take(f"{emb}.position_embeddings"),
    }
    qkv_bias = bool(config.get("qkv_bias", True))
    for i in range(depth):
        ours = block_keys(i)
        old, new = f"vit.encoder.layer.{i}", f"vit.layers.{i}"
        q, k, v = (
            (f"{old}.attention.attention.{a}", f"{new}.attention.{b}_proj")
            for a, b in (("query", "q"), ("key", "k"), ("value", "v"))
        )
        mapped[f"{ours['qkv']}.weight"] = torch.cat(
            [src.take(f"{n[0]}.weight", f"{n[1]}.weight") for n in (q, k, v)], dim=0
        )
        if qkv_bias:
            mapped[f"{ours['qkv']}.bias"] = torch.cat(
                [src.take(f"{n[0]}.bias", f"{n[1]}.bias") for n in (q, k, v)], dim=0
            )
        for part, names in (
            ("proj", (f"{old}.attention.output.dense", f"{new}.attention.o_proj")),
            ("norm1", (f"{old}.layernorm_before", f"{new}.layernorm_before")),
            ("norm2", (f"{old}.layernorm_after", f"{new}.layernorm_after")),
            ("fc1", (f"{old}.intermediate.dense", f"{new}.mlp.fc1")),
            ("fc2", (f"{old}.output.dense", f"{new}.mlp.fc2")),
        ):
            mapped.update(src.take_layer(ours[part], *names))
    mapped.update(src.take_layer("norm", "vit.layernorm"))
    mapped.update(src.take_layer("head", "classifier"))
    src.finish()

    num_classes = mapped["head.weight"].shape[0]
    grid = (image[0] // P, image[1] // P)
    if mapped["pos_embed"].shape[1] != 1 + grid[0] * grid[1]:
        raise UnsupportedCheckpointError(
            f"{what}: {mapped['pos_embed'].shape[1]} position embeddings for a {grid} grid"
        )
    cfg = ViTConfig(
        patch_size=P,
        grid=grid,
        embed_dim=D,
        depth=depth,
        heads=heads,
        mlp_dim=int(config.get("intermediate_size", 4 * D)),
        num_classes=num_classes,
        qkv_bias=qkv_bias,
        ln_eps=float(config.get("layer_norm_eps", 1e-12)),
        mean=preprocess.mean,
        std=preprocess.std,
        # interpolate_pos_encoding: bicubic, align_corners=False, no antialias.
        pos_interp_align_corners=False,
        pos_interp_antialias=False,
    )
    id2label = config.get("id2label") or {}
    labels = [str(id2label.get(str(i), id2label.get(i, f"class-{i}"))) for i in range(num_classes)]
    return LoadedViT(
        model=assemble(cfg, mapped),
        labels=labels,
        preprocess=preprocess,
        source=f"{what}; position embeddings resampled as interpolate_pos_encoding does "
        "(bicubic, align_corners=False)",
        framework="huggingface",
        checkpoint=directory.name,
        reference=_hf_reference(directory),
    )


def _hf_reference(directory: Path) -> Reference | None:
    try:
        import transformers
    except ImportError:
        return None
    loaded: list[nn.Module] = []

    def reference(pixels: Tensor) -> Tensor:
        if not loaded:  # the second copy of the weights only when the check runs
            loaded.append(transformers.ViTForImageClassification.from_pretrained(directory).eval())
        out: Tensor = loaded[0](pixel_values=pixels).logits
        return out

    return reference
