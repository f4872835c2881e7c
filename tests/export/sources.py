"""Randomly initialised ViTs from timm, transformers and torchvision, saved as each library saves.

Shared by the checkpoint-import tests. Nothing is downloaded: every model is built from a
config. `scramble` replaces the libraries' initialisations (tiny class and position embeddings,
a zero head in torchvision) with weights of ordinary size, so a wrong mapping shows up as a
large logit difference rather than hiding under a near-constant output.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch
from torch import Tensor, nn

from export.vit import patchify

# (B, 3, H, W) normalised float images -> (B, classes) logits, by the library's own forward.
LibraryForward = Callable[[Tensor], Tensor]


def scramble(module: nn.Module, seed: int) -> None:
    """Every parameter redrawn: norms ~1, biases ~0.1, matrices ~1/sqrt(fan_in), embeddings ~0.5."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if p.dim() == 1:
                p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.1 * noise)
            elif p.dim() == 3 and p.shape[0] == 1:  # class token, position embeddings (1, T, D)
                p.copy_(0.5 * noise)
            else:
                p.copy_(noise / math.sqrt(p[0].numel()))


def timm_vit(seed: int, name: str = "vit_tiny_patch16_224", **kwargs: Any) -> Any:
    import timm

    model = timm.create_model(name, pretrained=False, **kwargs)
    scramble(model, seed)
    return model.eval()


def hf_vit(seed: int, **config: Any) -> Any:
    from transformers import ViTConfig, ViTForImageClassification

    model = ViTForImageClassification(ViTConfig(**config))
    scramble(model, seed)
    return model.eval()


def tv_vit(seed: int, **kwargs: Any) -> Any:
    from torchvision.models.vision_transformer import VisionTransformer

    model = VisionTransformer(**kwargs)
    scramble(model, seed)
    return model.eval()


def save_state_dict(model: nn.Module, path: Path) -> Path:
    """As people save timm and torchvision weights: torch.save, or safetensors by suffix."""
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(state, str(path))
    else:
        torch.save(state, path)
    return path


def graph_vs_library(
    graph: Path,
    library: LibraryForward,
    patch_size: int,
    mean: tuple[float, float, float],
    std: tuple[float, float, float],
    grids: list[tuple[int, int]],
    seed: int = 0,
) -> dict[str, float]:
    """Max |logits| difference per grid between the ONNX graph and the library's forward.

    Random uint8 images: the graph gets their patches, the library the same pixels normalised.
    """
    session = ort.InferenceSession(str(graph), providers=["CPUExecutionProvider"])
    gen = torch.Generator().manual_seed(seed)
    m, s = torch.tensor(mean), torch.tensor(std)
    diffs: dict[str, float] = {}
    for gh, gw in grids:
        images = torch.randint(
            0, 256, (2, gh * patch_size, gw * patch_size, 3), dtype=torch.uint8, generator=gen
        )
        (ours,) = session.run(["logits"], {"patches": patchify(images, patch_size).numpy()})
        pixels = ((images.float() / 255.0 - m) / s).permute(0, 3, 1, 2)  # (B, 3, H, W)
        with torch.no_grad():
            theirs = library(pixels).numpy()
        diffs[f"{gh}x{gw}"] = float(np.abs(ours - theirs).max())
    return diffs
