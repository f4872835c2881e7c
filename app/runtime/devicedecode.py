"""Decoding on the device: the protocol the engine's batches use, and which decoder serves.

A front end that routes an image to the device (app/pipeline/routing.py) sends its encoded
bytes with the plan it made from the header: the oriented size, the resize target, the crop
and the grid, exactly what the CPU path would use (app/pipeline/preprocess.py). A
`DeviceDecoder` takes one batch of such images (one model version, one grid) and gives back
the patches of those it decoded, `[A, grid_h, grid_w, P*P*C]` uint8 ready for the session
(on the GPU: an ONNX Runtime value in device memory, bound with IO binding, never copied to
the host), and a reason for each image it refused; a refused image is decoded on the CPU
path instead, which gives a broken file its 400.

Which decoder serves, VIT_SERVE_DECODE, is app/runtime/decodemode.py's.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
from numpy.typing import NDArray

from app.models.spec import Interpolation


@dataclass(frozen=True)
class EncodedImage:
    """One uploaded image as the device path takes it: the upload's bytes, unchanged, and
    the preprocessing the CPU path would give it."""

    data: bytes
    name: str  # how messages name it
    orientation: int  # EXIF 1..8, applied on the device
    image_size: tuple[int, int]  # (width, height) after the orientation
    size: tuple[int, int]  # (width, height) to resize to
    box: tuple[int, int, int, int] | None  # (left, top, right, bottom) to crop after
    grid: tuple[int, int]  # (grid_h, grid_w)
    patch_size: int
    interpolation: Interpolation

    @property
    def pixels(self) -> tuple[int, int]:
        """(height, width) of the pixels patchified: the crop, or the resized image."""
        if self.box is None:
            return self.size[1], self.size[0]
        left, top, right, bottom = self.box
        return bottom - top, right - left


@dataclass
class DecodedBatch:
    """A batch's outcome: the patches of the images decoded, in the batch's order, and why
    each of the others was refused (index in the batch -> reason)."""

    accepted: list[int]
    refused: dict[int, str] = field(default_factory=dict)
    host: NDArray[np.uint8] | None = None  # [A, gh, gw, P*P*C] in host memory (stand-ins)
    device: Any = None  # the same on the GPU: an onnxruntime.OrtValue bound as the input


class DeviceDecoder(Protocol):
    """Decodes, orients, resizes, crops and patchifies a batch of JPEGs where it runs."""

    @property
    def name(self) -> str:
        """What decodes: shown in /models and the logs."""
        ...

    def serves(self, provider: str) -> bool:
        """Whether its patches can feed a session on `provider` (a device decoder's live in
        GPU memory: only a CUDA or TensorRT session takes them)."""
        ...

    def decode(self, images: Sequence[EncodedImage]) -> DecodedBatch:
        """One batch, all of one grid; runs in the engine's inference thread."""
        ...
