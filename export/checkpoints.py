"""Load trained ViTs into the reference model, with the preprocessing they were trained with.

Four sources, one result (`LoadedViT`: the reference model, labels, preprocessing, provenance):

- our own checkpoints (here): one `torch.save` dict (the ViTConfig, the state dict, the labels
  and the resize policy), loaded with `weights_only=True` so a checkpoint cannot run code;
- timm (export/import_timm.py): a model name (pretrained weights downloaded by timm when asked)
  or a weights file for it; the vit_* family with a class token, token or avg pooling, fc_norm;
- Hugging Face (export/import_hf.py): a `ViTForImageClassification` directory (config.json,
  safetensors or .bin weights, preprocessor_config.json), read straight from the files;
- torchvision (export/import_torchvision.py): a vit_b_16/b_32/l_16/l_32/h_14 state dict.

Weights are mapped into `export.vit.VisionTransformer`, never exported from the library's own
module (whose exports bake in the native grid); the config records what differs between the
sources (LayerNorm eps, pooling, how position embeddings are resampled to another grid). Every
tensor of a source must be used by the mapping (`SourceTensors`), and every module the mapping
cannot express (layer scale, register tokens, qk-norm, another activation, ...) is refused with
the reason, so an import either computes what the source computes or fails. Where the source
library is installed, `LoadedViT.reference` runs the source's own forward, and the export
compares its graph with it before writing anything (`source_gate`, then
`export.onnx_export.check_source_parity`): at every parity grid where the source resamples its
own position embeddings (timm built with `dynamic_img_size=True`), else at the native grid.
"""

from __future__ import annotations

import argparse
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast, get_args

import torch
from torch import Tensor

from app.models.spec import Interpolation, Preprocess
from export.vit import VisionTransformer, ViTConfig, patchify, unpatchify

log = logging.getLogger(__name__)

FORMAT = "vit-serve/1"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

Triple = tuple[float, float, float]
# (B, 3, H, W) float images, normalised as the source expects -> (B, num_classes) logits.
Reference = Callable[[Tensor], Tensor]
# uint8 patches (B, grid_h, grid_w, P*P*C), the graph's input -> (B, num_classes) logits.
PatchLogits = Callable[[Tensor], Tensor]


class UnsupportedCheckpointError(ValueError):
    """The checkpoint is not a ViT this reference model can compute exactly; says why."""


@dataclass
class LoadedViT:
    model: VisionTransformer
    labels: list[str]
    preprocess: Preprocess
    source: str  # notes for model.json: what was loaded and how it is resampled
    framework: str = "vit-serve"
    checkpoint: str = ""
    # The source library's own forward, when the library is installed.
    reference: Reference | None = None
    # Whether `reference` takes other grids than the native one, resampling its position
    # embeddings itself (timm built with dynamic_img_size=True); if not, it is compared at the
    # native grid only, as it cannot run elsewhere.
    reference_any_grid: bool = False


@dataclass(frozen=True)
class SourceGate:
    """The source library's forward as the export's gate sees it: on the graph's own input."""

    library: str  # LoadedViT.framework, for messages: "timm", "huggingface", "torchvision"
    logits: PatchLogits
    any_grid: bool

    def grids(self, grids: list[tuple[int, int]], native: tuple[int, int]) -> list[tuple[int, int]]:
        """The grids of `grids` this source can be compared at."""
        return list(grids) if self.any_grid else [native]


def source_gate(loaded: LoadedViT) -> SourceGate | None:
    """`loaded.reference` fed the pixels of the graph's uint8 patches; None without one.

    The patches are put back into images and normalised in float as the source expects (the
    graph folds the normalisation into its weights; the source never sees our patch order).
    """
    reference = loaded.reference
    if reference is None:
        return None
    cfg = loaded.model.cfg
    mean, std = torch.tensor(cfg.mean), torch.tensor(cfg.std)

    def logits(patches: Tensor) -> Tensor:
        images = unpatchify(patches, cfg.patch_size).to(torch.float32)  # (B, H, W, 3)
        pixels = ((images / 255.0 - mean) / std).permute(0, 3, 1, 2)  # (B, 3, H, W)
        with torch.no_grad():
            return reference(pixels)

    return SourceGate(loaded.framework, logits, loaded.reference_any_grid)


# ---------------------------------------------------------------------------------------------
# Our own format


def save_checkpoint(
    path: Path,
    model: VisionTransformer,
    labels: list[str],
    source: str,
    crop_pct: float = 1.0,
    interpolation: Interpolation = "bilinear",
) -> None:
    from export.hybrid import HybridViT

    cfg = model.cfg
    # A hybrid's CNN (export/hybrid.py) travels as its config; older readers see no key.
    backbone = {"backbone": model.backbone.to_dict()} if isinstance(model, HybridViT) else {}
    torch.save(
        {
            "format": FORMAT,
            **backbone,
            "config": {**cfg.to_dict(), "grid": list(cfg.grid)},
            "state_dict": model.state_dict(),
            "labels": labels,
            "preprocess": {"crop_pct": crop_pct, "interpolation": interpolation},
            "source": source,
        },
        path,
    )


def load_checkpoint(path: Path) -> LoadedViT:
    data: dict[str, Any] = torch.load(path, map_location="cpu", weights_only=True)
    if data.get("format") != FORMAT:
        raise ValueError(f"{path}: not a vit-serve checkpoint (format {data.get('format')!r})")
    raw = dict(data["config"])
    for key in ("grid", "mean", "std"):
        raw[key] = tuple(raw[key])
    cfg = ViTConfig(**raw)
    model = VisionTransformer(cfg)
    if "backbone" in data:
        from export.hybrid import BackboneConfig, HybridViT

        model = HybridViT(cfg, BackboneConfig.from_dict(data["backbone"]))
    model.load_state_dict(data["state_dict"])
    model.eval()
    preprocess = Preprocess(
        resize_mode="shorter_side",
        crop_pct=data["preprocess"]["crop_pct"],
        interpolation=data["preprocess"]["interpolation"],
        mean=cfg.mean,
        std=cfg.std,
    )
    return LoadedViT(
        model=model,
        labels=list(data["labels"]),
        preprocess=preprocess,
        source=str(data["source"]),
        checkpoint=path.name,
    )


# ---------------------------------------------------------------------------------------------
# Shared pieces


def read_state_dict(path: Path) -> dict[str, Tensor]:
    """A state dict from .safetensors or a torch.save file (weights only: no code runs).

    Training checkpoints that wrap the weights ({"state_dict": ...} or {"model": ...}, as timm's
    and many training scripts write) are unwrapped, and DDP's "module." prefix is removed.
    """
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return dict(load_file(str(path)))
    # timm's training checkpoints hold the run's argparse.Namespace beside the weights.
    with torch.serialization.safe_globals([argparse.Namespace]):
        data = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(data, dict):
        raise UnsupportedCheckpointError(f"{path}: holds a {type(data).__name__}, not a state dict")
    for key in ("state_dict", "model"):
        if isinstance(data.get(key), dict):
            data = data[key]
            break
    tensors = {k: v for k, v in data.items() if isinstance(v, Tensor)}
    if not tensors:
        raise UnsupportedCheckpointError(f"{path}: no tensors found")
    if all(k.startswith("module.") for k in tensors):
        tensors = {k.removeprefix("module."): v for k, v in tensors.items()}
    return tensors


def conv_to_linear(weight: Tensor) -> Tensor:
    """Conv2d(P x P, stride P) weight (D, C, P, P) -> Linear weight (D, P*P*C).

    The columns follow our patch vectors' (row, col, channel) order.
    """
    D = weight.shape[0]
    return weight.permute(0, 2, 3, 1).reshape(D, -1)


def crop_fraction(input_size: int, resize_size: int) -> float:
    """crop_pct with floor(input_size / crop_pct) == resize_size, as the service computes it.

    input / resize is the fraction, but its float division can land a hair above the exact
    value, and the floor then gives resize - 1: step it down until the round trip is exact.
    """
    pct = input_size / resize_size
    for _ in range(8):
        if math.floor(input_size / pct) == resize_size:
            return pct
        pct = math.nextafter(pct, 0.0)
    raise ValueError(f"no crop fraction maps {input_size} back to {resize_size}")


def interpolation_name(name: str) -> Interpolation:
    if name not in get_args(Interpolation):
        raise UnsupportedCheckpointError(
            f"interpolation {name!r} is not one the service resizes with "
            f"({', '.join(get_args(Interpolation))})"
        )
    return cast(Interpolation, name)


class SourceTensors:
    """A source's tensors, taken by name; whatever is left over at the end is an error."""

    def __init__(self, tensors: dict[str, Tensor], what: str) -> None:
        self.left = dict(tensors)
        self.what = what

    def has(self, *names: str) -> bool:
        return any(n in self.left for n in names)

    def take(self, *names: str) -> Tensor:
        """The first of `names` present (sources spell the same weight differently)."""
        for name in names:
            if name in self.left:
                return self.left.pop(name).detach().to(torch.float32).clone()
        raise UnsupportedCheckpointError(f"{self.what}: missing {' or '.join(names)}")

    def take_layer(self, ours: str, *names: str) -> dict[str, Tensor]:
        """A layer's weight and bias under our name `ours`, from the first of `names` present."""
        return {f"{ours}.{p}": self.take(*(f"{n}.{p}" for n in names)) for p in ("weight", "bias")}

    def take_optional(self, *names: str) -> Tensor | None:
        return self.take(*names) if self.has(*names) else None

    def drop(self, *names: str) -> None:
        for name in names:
            self.left.pop(name, None)

    def finish(self) -> None:
        if self.left:
            shown = ", ".join(sorted(self.left)[:8])
            more = f" and {len(self.left) - 8} more" if len(self.left) > 8 else ""
            raise UnsupportedCheckpointError(
                f"{self.what}: weights the reference ViT has no place for: {shown}{more} "
                "(an architecture feature it does not implement)"
            )


def square_grid(tokens: int, what: str) -> int:
    side = math.isqrt(tokens)
    if side * side != tokens:
        raise UnsupportedCheckpointError(
            f"{what}: {tokens} position embeddings are not a square grid"
        )
    return side


def assemble(cfg: ViTConfig, mapped: dict[str, Tensor]) -> VisionTransformer:
    """A reference model with `mapped` (its own key names) loaded; the buffers are its own."""
    model = VisionTransformer(cfg)
    buffers = {name: buf for name, buf in model.named_buffers()}
    model.load_state_dict({**buffers, **mapped}, strict=True)
    return model.eval()


def block_keys(i: int) -> dict[str, str]:
    return {
        "norm1": f"blocks.{i}.norm1",
        "qkv": f"blocks.{i}.attn.qkv",
        "proj": f"blocks.{i}.attn.proj",
        "norm2": f"blocks.{i}.norm2",
        "fc1": f"blocks.{i}.mlp.fc1",
        "fc2": f"blocks.{i}.mlp.fc2",
    }


def source_parity(loaded: LoadedViT, batch: int = 2, seed: int = 0) -> float | None:
    """Max |logits| difference between the mapped PyTorch model and the source's own forward
    at the native size; None when the source library is not installed.

    A check of the mapping alone, without ONNX (the loaders' tests use it); the export's gate
    compares the graph itself (export.onnx_export.check_source_parity).
    """
    gate = source_gate(loaded)
    if gate is None:
        return None
    cfg = loaded.model.cfg
    H, W = cfg.grid[0] * cfg.patch_size, cfg.grid[1] * cfg.patch_size
    gen = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (batch, H, W, 3), dtype=torch.uint8, generator=gen)
    patches = patchify(images, cfg.patch_size)
    with torch.no_grad():
        ours = loaded.model(patches)
    return float((ours - gate.logits(patches)).abs().max())


def class_labels(count: int) -> list[str]:
    return [f"class-{i}" for i in range(count)]
