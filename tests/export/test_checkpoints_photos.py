"""End to end on real photos: the service's preprocessing + graph vs each library's own pipeline.

For every photo, our side is exactly what `POST /classify` runs with the `crop` policy:
`app.pipeline.preprocess.prepare` (decode, EXIF orientation, RGB, resize per model.json, centre
crop,
patchify; the service's default settings, JPEG draft decoding included) and the exported graph.
The library's side is its own transform (timm's `resolve_data_config` + `create_transform`,
Hugging Face's image processor, torchvision's weights preset) and its own model. Both must give
the same top-1 for every photo; the largest logit difference, and the largest pixel difference
between the two preprocessed images, are printed and written in the assertion messages.

Images are opened for the library with Pillow and their EXIF orientation applied, as the
service does (the libraries' own example loaders do not apply it: on an EXIF-rotated photo the
two would see different images by design).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
import torch
from numpy.typing import NDArray
from PIL import Image, ImageOps

from app.core.settings import Settings
from app.models.spec import ModelSpec, Source
from app.pipeline.preprocess import prepare
from export.checkpoints import LoadedViT
from export.import_hf import load_hf
from export.import_timm import load_timm
from export.import_torchvision import load_torchvision
from export.onnx_export import export_to_repository
from tests.export.sources import hf_vit, save_state_dict, timm_vit, tv_vit
from tests.support import PHOTOS, need_folder

pytestmark = pytest.mark.needs_shared

BATCH = 20
CLASSES = 10
# Floats only: the same pixels through a folded vs an unfolded normalisation.
SAME_PIXELS_ATOL = 1e-4
# A top-1 that a resampling residual of a few levels may flip: the library's own top-2 logits
# closer than this (the random models' logits are O(1)).
NEAR_TIE = 1e-2

# A photo -> (3, H, W) normalised float tensor, as the library's pipeline makes it.
Transform = Callable[[Image.Image], torch.Tensor]


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def photos() -> list[Path]:
    need_folder(PHOTOS, "shared test photos")
    found = sorted(p for p in PHOTOS.iterdir() if p.suffix.lower() in (".jpeg", ".jpg"))
    if not found:
        pytest.skip(f"no JPEG photos in {PHOTOS}")
    return found


@dataclass
class Comparison:
    photos: int
    top1_disagree: list[str]
    # the library's own top-1 minus top-2 logit on those photos: how near a tie each was
    disagree_margins: list[float]
    max_logit_diff: float
    worst_photo: str
    max_pixel_diff: int  # 0..255, the two preprocessed images
    photos_with_pixel_diff: int

    def summary(self, what: str) -> str:
        flips = ", ".join(
            f"{name} (library margin {m:.1e})"
            for name, m in zip(self.top1_disagree, self.disagree_margins, strict=True)
        )
        return (
            f"{what}: top-1 agrees on {self.photos - len(self.top1_disagree)}/{self.photos} "
            f"photos{f' (not on {flips})' if flips else ''}; "
            f"max |logit diff| {self.max_logit_diff:.2e} ({self.worst_photo}); "
            f"preprocessed pixels differ on {self.photos_with_pixel_diff} photos, by at most "
            f"{self.max_pixel_diff}/255"
        )


def _library_image(path: Path) -> Image.Image:
    with Image.open(path) as img:
        return ImageOps.exif_transpose(img).convert("RGB")


def _service(spec: ModelSpec, graph: Path, photos: list[Path], settings: Settings) -> Any:
    """(logits (N, classes), pixels (N, H, W, 3)) as the service computes them."""
    session = ort.InferenceSession(str(graph), providers=["CPUExecutionProvider"])
    patches = np.stack(
        [
            prepare(
                p.read_bytes(),
                spec,
                "crop",
                name=p.name,
                max_pixels=settings.image_max_pixels,
                fit_max_tokens=2 * spec.architecture.native_tokens,
                jpeg_draft=settings.jpeg_draft,
            ).patches
            for p in photos
        ]
    )  # (N, gh, gw, P*P*3)
    logits = np.concatenate(
        [
            session.run(["logits"], {"patches": patches[i : i + BATCH]})[0]
            for i in range(0, len(photos), BATCH)
        ]
    )
    N, gh, gw, _ = patches.shape
    P = spec.architecture.patch_size
    pixels = patches.reshape(N, gh, gw, P, P, 3).transpose(0, 1, 3, 2, 4, 5)
    return logits, pixels.reshape(N, gh * P, gw * P, 3)


def _library(
    model: Callable[[torch.Tensor], torch.Tensor],
    transform: Transform,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    photos: list[Path],
) -> tuple[NDArray[np.float32], NDArray[np.int64]]:
    """(logits, pixels) by the library's pipeline; pixels un-normalised back to 0..255."""
    inputs = torch.stack([transform(_library_image(p)) for p in photos])  # (N, 3, H, W)
    with torch.no_grad():
        logits = torch.cat([model(inputs[i : i + BATCH]) for i in range(0, len(photos), BATCH)])
    m, s = torch.tensor(mean)[:, None, None], torch.tensor(std)[:, None, None]
    pixels = ((inputs * s + m) * 255.0).round().permute(0, 2, 3, 1)  # (N, H, W, 3)
    return logits.numpy(), pixels.numpy().astype(np.int64)


def _compare(
    photos: list[Path],
    ours: tuple[NDArray[np.float32], NDArray[np.uint8]],
    theirs: tuple[NDArray[np.float32], NDArray[np.int64]],
) -> Comparison:
    (our_logits, our_pixels), (their_logits, their_pixels) = ours, theirs
    diff = np.abs(our_logits - their_logits).max(axis=1)  # (N,)
    worst = int(diff.argmax())
    pixel_diff = np.abs(our_pixels.astype(np.int64) - their_pixels).reshape(len(photos), -1)
    disagree = our_logits.argmax(axis=1) != their_logits.argmax(axis=1)
    top2 = np.sort(their_logits, axis=1)[:, -2:]  # (N, 2)
    margins = top2[:, 1] - top2[:, 0]
    return Comparison(
        photos=len(photos),
        top1_disagree=[p.name for p, d in zip(photos, disagree, strict=True) if d],
        disagree_margins=[float(m) for m, d in zip(margins, disagree, strict=True) if d],
        max_logit_diff=float(diff[worst]),
        worst_photo=photos[worst].name,
        max_pixel_diff=int(pixel_diff.max()),
        photos_with_pixel_diff=int((pixel_diff.max(axis=1) > 0).sum()),
    )


def _export(loaded: LoadedViT, repo: Path) -> tuple[ModelSpec, Path]:
    result = export_to_repository(
        loaded.model,
        repo,
        "photos",
        loaded.labels,
        loaded.preprocess,
        Source(framework=loaded.framework, notes=loaded.source),
    )
    return ModelSpec.load(result.spec_path), result.graph_path


def _check(
    what: str,
    loaded: LoadedViT,
    library: Callable[[torch.Tensor], torch.Tensor],
    transform: Transform,
    photos: list[Path],
    tmp_path: Path,
    pixel_residual: int = 0,
) -> Comparison:
    """Service vs library on every photo, with the service's default settings.

    `pixel_residual` 0: the two preprocessings must make identical images (with full JPEG
    decodes), which leaves only float rounding in the logits, and the same top-1 everywhere.
    Otherwise the library resamples differently from Pillow by up to that many levels (of 255),
    and top-1 may differ only on near-ties of the library's own output, which are reported.
    """
    spec, graph = _export(loaded, tmp_path / "repo")
    mean, std = loaded.preprocess.mean, loaded.preprocess.std
    theirs = _library(library, transform, mean, std, photos)
    served = _compare(photos, _service(spec, graph, photos, Settings()), theirs)
    full = _compare(photos, _service(spec, graph, photos, Settings(jpeg_draft=False)), theirs)
    lines = [served.summary(f"{what} (service defaults)"), full.summary(f"{what} (no JPEG draft)")]
    print("\n" + "\n".join(lines))
    _record(what, served, full)
    message = "; ".join(lines)
    assert full.max_pixel_diff <= pixel_residual, message
    if pixel_residual == 0:
        assert full.max_logit_diff <= SAME_PIXELS_ATOL, message
        assert not served.top1_disagree and not full.top1_disagree, message
    else:
        assert all(m < NEAR_TIE for m in served.disagree_margins + full.disagree_margins), message
    return served


def _record(what: str, served: Comparison, full: Comparison) -> None:
    """Figures for the report: test-artifacts/import_photos.json (ignored by git)."""
    out = Path(__file__).resolve().parents[2] / "test-artifacts" / "import_photos.json"
    out.parent.mkdir(exist_ok=True)
    data = json.loads(out.read_text()) if out.is_file() else {}
    data[what] = {"service_defaults": served.__dict__, "no_jpeg_draft": full.__dict__}
    out.write_text(json.dumps(data, indent=2) + "\n")


# ---------------------------------------------------------------------------------------------

SMALL_224 = dict(embed_dim=64, depth=2, num_heads=2, num_classes=CLASSES)
TIMM_CONFIGS: dict[str, dict[str, Any]] = {
    # vit_base_patch16_224.augreg2: bicubic, crop 0.9, centre, mean = std = 0.5
    "augreg-default": {},
    "bilinear-0.875-imagenet": dict(
        interpolation="bilinear",
        crop_pct=0.875,
        mean=(0.485, 0.456, 0.406),
        std=(0.229, 0.224, 0.225),
    ),
    # the CLIP-style squash crop mode: both sides to 224/0.95, then a centre crop
    "squash-0.95": dict(crop_mode="squash", crop_pct=0.95),
}


@pytest.mark.parametrize("config", sorted(TIMM_CONFIGS))
def test_timm_pipeline_and_service_agree_on_every_photo(
    config: str, photos: list[Path], tmp_path: Path
) -> None:
    pytest.importorskip("timm")
    from timm.data import create_transform, resolve_data_config

    overlay = TIMM_CONFIGS[config]
    library = timm_vit(
        seed=11, name="vit_base_patch16_224", pretrained_cfg_overlay=overlay, **SMALL_224
    )
    weights = save_state_dict(library, tmp_path / "w.safetensors")
    loaded = load_timm(
        "vit_base_patch16_224",
        weights=weights,
        model_args={"embed_dim": 64, "depth": 2, "num_heads": 2, "pretrained_cfg_overlay": overlay},
    )
    transform = create_transform(**resolve_data_config({}, model=library))
    _check(f"timm {config}", loaded, library, transform, photos, tmp_path)


def _hf_model(tmp_path: Path, processor: Any) -> tuple[Any, LoadedViT]:
    library = hf_vit(
        seed=12,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=128,
        num_labels=CLASSES,
    )
    library.save_pretrained(tmp_path / "hf")
    processor.save_pretrained(tmp_path / "hf")
    return library, load_hf(tmp_path / "hf")


def _hf_forward(model: Any) -> Callable[[torch.Tensor], torch.Tensor]:
    def forward(pixels: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = model(pixel_values=pixels).logits
        return out

    return forward


def _hf_transform(processor: Any) -> Transform:
    def transform(img: Image.Image) -> torch.Tensor:
        out: torch.Tensor = processor(images=img, return_tensors="pt")["pixel_values"][0]
        return out

    return transform


HF_PROCESSORS: dict[str, dict[str, Any]] = {
    # ViTImageProcessor's defaults: squash to 224x224, bilinear, mean = std = 0.5
    "vit-default": {},
    # as facebook/deit-base-patch16-224 ships: squash to 256, centre crop 224, bicubic, ImageNet
    "deit-resize-crop": dict(
        size={"height": 256, "width": 256},
        do_center_crop=True,
        crop_size={"height": 224, "width": 224},
        resample=3,
        image_mean=[0.485, 0.456, 0.406],
        image_std=[0.229, 0.224, 0.225],
    ),
}


# Measured on the shared photos (transformers 5.23, torchvision 0.29): the largest difference
# between torchvision's resize of a uint8 tensor and Pillow's, per filter.
TORCHVISION_RESIDUAL = {"vit-default": 1, "deit-resize-crop": 8}


@pytest.mark.parametrize("backend", ["torchvision", "pil"])
@pytest.mark.parametrize("config", sorted(HF_PROCESSORS))
def test_hf_processor_and_service_agree_on_every_photo(
    config: str, backend: str, photos: list[Path], tmp_path: Path
) -> None:
    """transformers 5's ViTImageProcessor resizes uint8 tensors with torchvision (antialiased);
    ViTImageProcessorPil resizes with Pillow, as the service does."""
    pytest.importorskip("transformers")
    from transformers import AutoImageProcessor, ViTImageProcessor, ViTImageProcessorPil

    cls = ViTImageProcessor if backend == "torchvision" else ViTImageProcessorPil
    library, loaded = _hf_model(tmp_path, cls(**HF_PROCESSORS[config]))
    # What people run: the processor saved beside the weights, loaded back by the Auto class.
    processor = AutoImageProcessor.from_pretrained(tmp_path / "hf", backend=backend)
    assert type(processor) is cls
    _check(
        f"Hugging Face {config} ({type(processor).__name__})",
        loaded,
        _hf_forward(library),
        _hf_transform(processor),
        photos,
        tmp_path,
        # torchvision's uint8 antialiased resize rounds differently from Pillow's.
        pixel_residual=0 if backend == "pil" else TORCHVISION_RESIDUAL[config],
    )


@pytest.mark.parametrize("preset", ["IMAGENET1K_V1", "IMAGENET1K_SWAG_LINEAR_V1"])
def test_torchvision_preset_and_service_agree_on_every_photo(
    preset: str, photos: list[Path], tmp_path: Path
) -> None:
    pytest.importorskip("torchvision")
    from torchvision.models import ViT_B_16_Weights

    library = tv_vit(
        seed=13,
        image_size=224,
        patch_size=16,
        num_layers=2,
        num_heads=2,
        hidden_dim=64,
        mlp_dim=128,
        num_classes=CLASSES,
    )
    weights = save_state_dict(library, tmp_path / "w.pth")
    loaded = load_torchvision("vit_b_16", weights, num_heads=2, weights_name=preset)
    transform = ViT_B_16_Weights[preset].transforms()
    what = f"torchvision {preset}"
    _check(what, loaded, library, transform, photos, tmp_path)
