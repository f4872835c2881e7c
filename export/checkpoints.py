"""Load trained ViTs into the reference model, with the preprocessing they were trained with.

Our own checkpoint format is one `torch.save` dict: the ViTConfig, the state dict, the labels
and the resize policy. It loads with `weights_only=True`, so a checkpoint cannot run code.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from app.spec import Interpolation, Preprocess
from export.vit import VisionTransformer, ViTConfig

FORMAT = "vit-serve/1"


@dataclass
class LoadedViT:
    model: VisionTransformer
    labels: list[str]
    preprocess: Preprocess
    source: str


def save_checkpoint(
    path: Path,
    model: VisionTransformer,
    labels: list[str],
    source: str,
    crop_pct: float = 1.0,
    interpolation: Interpolation = "bilinear",
) -> None:
    cfg = model.cfg
    torch.save(
        {
            "format": FORMAT,
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
        model=model, labels=list(data["labels"]), preprocess=preprocess, source=str(data["source"])
    )
