"""Which path decodes an image, from its header: the GPU's in the engine, or the CPU's here.

Where the permit's version is decoded on the device (`ServedVersion.device_decode`), each
upload gets the checks the CPU path makes before decoding, with the same errors and
messages (the declared type, the format, the header's pixel count, the resized size), and
then its header is read (app/pipeline/jpeg.py). What the device path takes goes there as
its bytes with the plan made from that header; everything else is decoded here, as before,
with the reason counted. The reasons are a fixed set (`REASONS`): a metric's label values.

EXIF orientation is applied on the device (nvImageCodec's decode parameter): phone photos
carry orientations 6 and 8 more often than not, too many to send to the CPU. An Exif segment
whose orientation cannot be read goes to the CPU path, whose reading of broken EXIF is the
one the service has always given.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from app.core.settings import Settings
from app.engine import ServedVersion
from app.pipeline import jpeg
from app.pipeline.preprocess import ResizePolicy, checked_plan, open_image
from app.pipeline.workers import Upload, declares_image
from app.runtime.devicedecode import EncodedImage

DecodePath = Literal["gpu", "cpu"]

# The device path's limit on either side: nvJPEG's hardware and CUDA backends and CV-CUDA's
# resize all take images up to 16384 pixels a side; larger ones go to the CPU path.
DEVICE_MAX_SIDE = 16384
# Luma sampling factors of the chroma subsamplings the device decoders take (4:4:4, 4:2:2,
# 4:4:0, 4:2:0, 4:1:1), each with both chroma components at 1x1.
DEVICE_LUMA_SAMPLING = frozenset({(1, 1), (2, 1), (1, 2), (2, 2), (4, 1)})

TAKEN = "jpeg"  # the GPU path's one reason
REASONS: dict[str, str] = {
    TAKEN: "a baseline or extended JPEG the device decodes",
    "off": "this model version is not decoded on the device (VIT_SERVE_DECODE, or its "
    "sessions are not on a GPU)",
    "rollout": "a rollout request (its graph takes patches from the host)",
    "declared_type": "its part is declared as something other than an image",
    "format": "not a JPEG",
    "header": "its JPEG markers could not be read",
    "progressive": "a progressive JPEG",
    "lossless": "a lossless JPEG",
    "arithmetic": "an arithmetic-coded JPEG",
    "hierarchical": "a hierarchical JPEG",
    "precision": "more than 8 bits per sample",
    "cmyk": "CMYK or YCCK (4 components)",
    "colour_transform": "3 components stored as RGB (Adobe APP14 without a colour transform)",
    "components": "neither 1, 3 nor 4 components",
    "sampling": "a chroma subsampling the device decoders do not take",
    "too_large": f"a side over {DEVICE_MAX_SIDE} pixels",
    "exif": "an Exif segment whose orientation cannot be read",
    "truncated": "no end-of-image marker: a truncated file",
    "refused": "the device decoder refused it (then decoded here)",
}


@dataclass(frozen=True)
class Route:
    path: DecodePath
    reason: str  # one of REASONS
    encoded: EncodedImage | None = None  # for the GPU path


class DecodeRouter:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    def route(
        self, upload: Upload, target: ServedVersion, resize: ResizePolicy, rollout: bool
    ) -> Route:
        """Where `upload` is decoded; raises the CPU path's own error for what it would refuse
        before decoding (ImageDecodeError, ImageTooLargeError)."""
        if not target.device_decode:
            return Route("cpu", "off")
        if rollout:
            return Route("cpu", "rollout")
        if not declares_image(upload.content_type):
            return Route("cpu", "declared_type")
        data = upload.data
        if not jpeg.is_jpeg(data):
            return Route("cpu", "format")
        header = jpeg.read_header(data)
        if header is None:
            return Route("cpu", "header")
        refusal = device_refusal(header)
        if refusal is not None:
            return Route("cpu", refusal)
        # The CPU path's checks, with its messages: Pillow reads the header (no decoding).
        max_pixels = self.settings.image_max_pixels
        with open_image(data, upload.name, max_pixels) as img:
            if img.format not in ("JPEG", "MPO") or img.size != (header.width, header.height):
                return Route("cpu", "header")  # Pillow reads it otherwise: let Pillow decide
        width, height = header.oriented_size
        spec = target.spec
        plan = checked_plan(
            width,
            height,
            spec,
            resize,
            name=upload.name,
            max_pixels=max_pixels,
            fit_max_tokens=target.max_tokens,
        )
        encoded = EncodedImage(
            data=data,
            name=upload.name,
            orientation=header.orientation,
            image_size=(width, height),
            size=plan.size,
            box=plan.box,
            grid=plan.grid,
            patch_size=spec.architecture.patch_size,
            interpolation=spec.preprocess.interpolation,
        )
        return Route("gpu", TAKEN, encoded)


def device_refusal(header: jpeg.JpegHeader) -> str | None:
    """Why the device path does not take a JPEG with this header, or None when it does."""
    if header.progressive:
        return "progressive"
    if header.lossless:
        return "lossless"
    if header.arithmetic:
        return "arithmetic"
    if header.hierarchical:
        return "hierarchical"
    if header.precision != 8:
        return "precision"
    if header.components == 4:
        return "cmyk"
    if header.components not in (1, 3):
        return "components"
    if header.components == 3:
        if header.adobe_transform == 0:
            return "colour_transform"
        luma, *chroma = header.sampling
        if luma not in DEVICE_LUMA_SAMPLING or any(c != (1, 1) for c in chroma):
            return "sampling"
    if max(header.width, header.height) > DEVICE_MAX_SIDE:
        return "too_large"
    if header.orientation == jpeg.UNREADABLE:
        return "exif"
    if not header.complete:
        return "truncated"
    return None
