"""A stand-in for the GPU decoder: the same protocol, run with Pillow in host memory.

It drives the engine's device-decode path where there is no GPU (the tests, and
`bench.gpu_decode --cpu-smoke`): which images reach it, with which bytes and plans, what it
refuses and why, and what the engine does with a refusal. It decodes as the CPU path does
(EXIF orientation, RGB, the model's resampling filter, the crop), without the CPU path's
reduced-scale JPEG decoding, and patchifies in numpy. `refuse` says which images it refuses
(name -> reason), as the real one refuses what its backends do not take.
"""

from __future__ import annotations

import io
import threading
from collections.abc import Callable, Sequence

import numpy as np
from numpy.typing import NDArray
from PIL import Image, ImageOps

from app.models.spec import Interpolation
from app.runtime.devicedecode import DecodedBatch, EncodedImage

_RESAMPLE: dict[Interpolation, Image.Resampling] = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}


def host_patchify(pixels: NDArray[np.uint8], patch_size: int) -> NDArray[np.uint8]:
    """(H, W, C) -> (H/P, W/P, P*P*C) in (row, col, channel) order: what the device's patchify
    graph computes (app/runtime/nvdecode.py), here in numpy."""
    H, W, C = pixels.shape
    P = patch_size
    blocks = pixels.reshape(H // P, P, W // P, P, C).transpose(0, 2, 1, 3, 4)
    return np.ascontiguousarray(blocks).reshape(H // P, W // P, P * P * C)


class HostDecoder:
    """Pillow behind the device decoder's protocol; every batch and image it saw is kept."""

    def __init__(self, refuse: Callable[[EncodedImage], str | None] | None = None) -> None:
        self.refuse = refuse or (lambda image: None)
        self.batches: list[list[EncodedImage]] = []
        self._lock = threading.Lock()

    @property
    def name(self) -> str:
        return "host stand-in (Pillow)"

    def serves(self, provider: str) -> bool:
        return True  # its patches are in host memory: any session takes them

    @property
    def seen(self) -> list[EncodedImage]:
        with self._lock:
            return [image for batch in self.batches for image in batch]

    def decode(self, images: Sequence[EncodedImage]) -> DecodedBatch:
        with self._lock:
            self.batches.append(list(images))
        outcome = DecodedBatch(accepted=[])
        patches = []
        for i, image in enumerate(images):
            reason = self.refuse(image)
            if reason is None:
                try:
                    patches.append(decode_one(image))
                except Exception as exc:  # what the device cannot decode, the CPU path answers
                    reason = f"{type(exc).__name__}: {exc}"
            if reason is None:
                outcome.accepted.append(i)
            else:
                outcome.refused[i] = reason
        if patches:
            outcome.host = np.stack(patches)
        return outcome


def decode_one(image: EncodedImage) -> NDArray[np.uint8]:
    """One image, decoded and preprocessed to its patches as the plan says."""
    with Image.open(io.BytesIO(image.data), formats=("JPEG",)) as img:
        img.load()
        oriented = ImageOps.exif_transpose(img)
        rgb = oriented.convert("RGB")
        if rgb.size != image.image_size:
            raise ValueError(f"decoded {rgb.size[0]}x{rgb.size[1]}, the header said otherwise")
        resized = rgb.resize(image.size, _RESAMPLE[image.interpolation])
        if image.box is not None:
            resized = resized.crop(image.box)
        pixels = np.asarray(resized, dtype=np.uint8)
    return host_patchify(pixels, image.patch_size)
