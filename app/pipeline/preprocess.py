"""Image preprocessing: bytes -> RGB (bounded, oriented) -> resized per policy -> uint8 patches.

The output is what the graph's `patches` input takes: (grid_h, grid_w, P*P*3) uint8 in
(row, col, channel) order, the same layout as `export.vit.patchify`. Everything here is pure and
thread-safe, so the service runs it in a thread pool off the event loop.
"""

from __future__ import annotations

import io
import logging
import math
import re
import time
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
from numpy.typing import NDArray
from PIL import (
    BmpImagePlugin,
    ExifTags,
    GifImagePlugin,
    Image,
    ImageOps,
    JpegImagePlugin,
    PngImagePlugin,
    TiffImagePlugin,
    UnidentifiedImageError,
    WebPImagePlugin,
)

from app.core.errors import ErrorKind, ServiceError
from app.models.grids import fit_grid
from app.models.spec import Interpolation, ModelSpec

log = logging.getLogger(__name__)

ResizePolicy = Literal["crop", "fit"]

# Pillow can open ~40 formats; a server reading untrusted bytes needs only the common ones, and
# every plugin left out is parsing code an attacker cannot reach. (JPEG includes MPO, the
# multi-picture JPEGs of many cameras: Pillow's JPEG opener returns those itself.)
SUPPORTED_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")
FORMATS_HINT = "send a JPEG, PNG, WebP, GIF, BMP or TIFF"
# Importing a plugin registers it: `Image.open(formats=...)` needs each one registered up front.
_PLUGINS = (
    BmpImagePlugin,
    GifImagePlugin,
    JpegImagePlugin,
    PngImagePlugin,
    TiffImagePlugin,
    WebPImagePlugin,
)

_RESAMPLE: dict[Interpolation, Image.Resampling] = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}
_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})
_WIDE_GREY_MODES = frozenset({"I", "I;16", "I;16L", "I;16B", "I;16N", "F"})


class ImageError(ServiceError, ValueError):
    """An upload that cannot be used; `message` tells a person what to do about it."""

    kind = ErrorKind.BAD_INPUT


class ImageDecodeError(ImageError):
    """Not an image in a supported format, or a truncated or corrupt one."""


class ImageTooLargeError(ImageError):
    """More pixels than the limit: in the header (refused before decoding), or in the resized
    image the policy would make of it (a sliver that `crop` scales until its short side fits)."""

    kind = ErrorKind.TOO_LARGE


@dataclass(frozen=True)
class StageTimes:
    """Milliseconds per preprocessing stage; decode includes EXIF orientation and RGB."""

    decode_ms: float = 0.0
    resize_ms: float = 0.0  # resize and crop
    patchify_ms: float = 0.0


@dataclass(frozen=True)
class PreparedImage:
    patches: NDArray[np.uint8]  # (grid_h, grid_w, P*P*3)
    image_size: tuple[int, int]  # (width, height) after EXIF orientation
    grid: tuple[int, int]  # (grid_h, grid_w)
    stages_ms: StageTimes = field(default_factory=StageTimes, compare=False)


@dataclass(frozen=True)
class ResizePlan:
    """Resize to `size` (w, h), then crop `box` (left, top, right, bottom) if any."""

    size: tuple[int, int]
    box: tuple[int, int, int, int] | None
    grid: tuple[int, int]


def configure_pillow(max_pixels: int | None) -> int | None:
    """Set Pillow's own decompression-bomb guard from the limit; returns the previous value."""
    previous = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = max_pixels
    return previous


def _pixels(count: int) -> str:
    return f"{count / 1e6:.1f} megapixels" if count >= 1_000_000 else f"{count} pixels"


def _too_large(name: str, pixels: int | None, max_pixels: int) -> ImageTooLargeError:
    has = f"has {_pixels(pixels)}" if pixels is not None else "has more pixels than the limit"
    return ImageTooLargeError(
        f"image {name} {has}; the limit is {_pixels(max_pixels)}: downscale it and send it again"
    )


def _too_large_resized(
    name: str, size: tuple[int, int], resized: tuple[int, int], policy: str, max_pixels: int
) -> ImageTooLargeError:
    return ImageTooLargeError(
        f"image {name} is {size[0]}x{size[1]} pixels: resize={policy} would scale it to "
        f"{resized[0]}x{resized[1]} ({_pixels(resized[0] * resized[1])}), over the limit of "
        f"{_pixels(max_pixels)}; send it with resize=fit, or crop it closer to square"
    )


def _bomb_pixels(exc: Exception) -> int | None:
    # Pillow's guard says "Image size (N pixels) exceeds limit of ...": keep the message as
    # exact as the header check's when it fires first.
    found = re.search(r"\((\d+) pixels\)", str(exc))
    return int(found.group(1)) if found else None


def open_image(data: bytes, name: str, max_pixels: int) -> Image.Image:
    """Open lazily (reads the header only) and refuse too many pixels before any decoding."""
    try:
        img = Image.open(io.BytesIO(data), formats=SUPPORTED_FORMATS)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        # Pillow's own guard (set from the same limit) fired inside open: its error over twice
        # the limit, its warning over the limit when warnings are errors (as in the tests).
        raise _too_large(name, _bomb_pixels(exc), max_pixels) from exc
    except UnidentifiedImageError as exc:
        raise ImageDecodeError(
            f"could not decode image {name}: it is not an image in a supported format; "
            f"{FORMATS_HINT}"
        ) from exc
    except Exception as exc:
        # Pillow's plugins raise many exception types on hostile headers (SyntaxError,
        # struct.error, ValueError, ...); every one of them means "not a usable image".
        raise ImageDecodeError(
            f"could not decode image {name}: its header is corrupt; {FORMATS_HINT}"
        ) from exc
    width, height = img.size
    if width <= 0 or height <= 0:
        img.close()
        raise ImageDecodeError(f"could not decode image {name}: it is {width}x{height} pixels")
    if width * height > max_pixels:
        img.close()
        raise _too_large(name, width * height, max_pixels)
    return img


def orient(img: Image.Image) -> tuple[Image.Image, bool]:
    """Apply the EXIF orientation tag, so the model sees the photo the way a person does.

    Returns the image and whether its width and height were swapped.
    """
    try:
        orientation = img.getexif().get(ExifTags.Base.Orientation, 1)
        if orientation in range(2, 9):
            # 5..8 are the transposes and quarter turns.
            return ImageOps.exif_transpose(img), orientation >= 5
    except Exception:
        # Broken EXIF is common in camera files and says nothing about the pixels: keep them.
        log.debug("ignoring unreadable EXIF orientation", exc_info=True)
    return img, False


def _wide_grey_to_l(img: Image.Image) -> Image.Image:
    """16/32-bit integer or float greyscale -> 8-bit, scaled (Pillow's convert clips at 255)."""
    pixels = np.asarray(img).astype(np.float64)
    top = float(pixels.max(initial=0.0))
    if img.mode.startswith("I;16") or 255.0 < top <= 65535.0:
        pixels = pixels / 257.0
    elif top > 65535.0:
        pixels = pixels * (255.0 / top)
    return Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8))


def to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow mode -> 8-bit RGB; transparency is composited on white."""
    if img.mode in _WIDE_GREY_MODES:
        img = _wide_grey_to_l(img)
    if img.mode == "RGB" and "transparency" not in img.info:
        return img
    if img.mode in _ALPHA_MODES or "transparency" in img.info:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")


def crop_plan(width: int, height: int, spec: ModelSpec) -> ResizePlan:
    """The training preprocessing (timm's eval transform) for an image size.

    shorter_side: scale, keeping the aspect ratio, so the image covers floor(input / crop_pct),
    then centre-crop the input size with torchvision's rounding. For a square input that scaling
    is torchvision's Resize(int): the shorter side exact, the longer int(that * long / short); for
    a non-square one it is timm's ResizeKeepRatio: both sides round(side / ratio). squash:
    both sides straight to floor(input / crop_pct), then the same centre crop (timm's squash
    crop mode, Hugging Face's resize then optional centre crop); with crop_pct 1 no crop.
    """
    arch = spec.architecture
    in_h, in_w = arch.input_size
    crop_pct = spec.preprocess.crop_pct
    target_h, target_w = math.floor(in_h / crop_pct), math.floor(in_w / crop_pct)
    if spec.preprocess.resize_mode == "squash":
        if (target_h, target_w) == (in_h, in_w):
            return ResizePlan(size=(in_w, in_h), box=None, grid=arch.grid)
        top, left = round((target_h - in_h) / 2.0), round((target_w - in_w) / 2.0)
        box = (left, top, left + in_w, top + in_h)
        return ResizePlan(size=(target_w, target_h), box=box, grid=arch.grid)
    if target_h == target_w:
        if width <= height:
            new_w, new_h = target_w, int(target_w * height / width)
        else:
            new_w, new_h = int(target_h * width / height), target_h
    else:
        ratio = min(height / target_h, width / target_w)
        new_w, new_h = round(width / ratio), round(height / ratio)
    # round() on a float: half to even, as torchvision's CenterCrop does.
    top = round((new_h - in_h) / 2.0)
    left = round((new_w - in_w) / 2.0)
    return ResizePlan(size=(new_w, new_h), box=(left, top, left + in_w, top + in_h), grid=arch.grid)


def resize_plan(
    width: int, height: int, spec: ModelSpec, policy: ResizePolicy, fit_max_tokens: int
) -> ResizePlan:
    if policy == "crop":
        return crop_plan(width, height, spec)
    P = spec.architecture.patch_size
    gh, gw = fit_grid(width, height, spec.architecture.native_tokens, fit_max_tokens)
    return ResizePlan(size=(gw * P, gh * P), box=None, grid=(gh, gw))


def checked_plan(
    width: int,
    height: int,
    spec: ModelSpec,
    policy: ResizePolicy,
    *,
    name: str,
    max_pixels: int,
    fit_max_tokens: int,
) -> ResizePlan:
    """The plan for an image of (oriented) `width` x `height`, or ImageTooLargeError where it
    would resize past the pixel limit: `crop` scales the short side to the input size first,
    so a 1x200000 sliver (under 1 KB of PNG) would become 73x14600000, gigabytes before the
    crop. The limit on pixels decoded bounds pixels resized too."""
    plan = resize_plan(width, height, spec, policy, fit_max_tokens)
    if plan.size[0] * plan.size[1] > max_pixels:
        raise _too_large_resized(name, (width, height), plan.size, policy, max_pixels)
    return plan


def patchify(pixels: NDArray[np.uint8], patch_size: int) -> NDArray[np.uint8]:
    """(H, W, C) pixels -> (H/P, W/P, P*P*C) patch vectors in (row, col, channel) order."""
    H, W, C = pixels.shape
    P = patch_size
    x = pixels.reshape(H // P, P, W // P, P, C).transpose(0, 2, 1, 3, 4)  # (gh, gw, P, P, C)
    return np.ascontiguousarray(x).reshape(H // P, W // P, P * P * C)


def _draft(img: Image.Image, plan: ResizePlan) -> None:
    """Let libjpeg decode at 1/2, 1/4 or 1/8 scale, keeping at least 2x the resize target.

    The margin keeps the final (antialiased) resize doing the real downscaling, so the result
    stays close to a full decode; the target's larger side bounds both sides because the EXIF
    orientation, applied after decoding, may swap them.
    """
    if img.format not in ("JPEG", "MPO"):
        return
    need = 2 * max(plan.size)
    if min(img.size) >= 2 * need:
        img.draft("RGB", (need, need))


def prepare(
    data: bytes,
    spec: ModelSpec,
    policy: ResizePolicy,
    *,
    name: str,
    max_pixels: int,
    fit_max_tokens: int,
    jpeg_draft: bool = True,
) -> PreparedImage:
    """Decode, orient, convert, resize per `policy` and patchify one uploaded image."""
    started = time.perf_counter()
    with open_image(data, name, max_pixels) as img:
        fmt = img.format or "image"
        header_w, header_h = img.size
        if jpeg_draft:
            _draft(img, resize_plan(header_w, header_h, spec, policy, fit_max_tokens))
        try:
            # LOAD_TRUNCATED_IMAGES stays False: a truncated file raises here, never half-grey.
            img.load()
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise _too_large(name, _bomb_pixels(exc), max_pixels) from exc
        except Exception as exc:
            raise ImageDecodeError(
                f"could not decode image {name}: the {fmt} file is truncated or corrupt; "
                "send the complete file"
            ) from exc
        try:
            oriented, swapped = orient(img)
            rgb = to_rgb(oriented)
        except Exception as exc:
            raise ImageDecodeError(
                f"could not decode image {name}: its colour mode {img.mode} is not supported; "
                f"{FORMATS_HINT} in RGB or greyscale"
            ) from exc
        # The plan comes from the size that was sent (a draft decode is smaller): the grid and
        # crop must not depend on whether libjpeg took a shortcut.
        width, height = (header_h, header_w) if swapped else (header_w, header_h)
        plan = checked_plan(
            width,
            height,
            spec,
            policy,
            name=name,
            max_pixels=max_pixels,
            fit_max_tokens=fit_max_tokens,
        )
        decoded = time.perf_counter()
        # Inside the `with`: closing the file also frees the pixels of `img` (maybe `rgb`).
        resized = rgb.resize(plan.size, _RESAMPLE[spec.preprocess.interpolation])
        if plan.box is not None:
            resized = resized.crop(plan.box)
        pixels = np.asarray(resized, dtype=np.uint8)  # (H, W, 3)
    shrunk = time.perf_counter()
    patches = patchify(pixels, spec.architecture.patch_size)
    done = time.perf_counter()
    return PreparedImage(
        patches=patches,
        image_size=(width, height),
        grid=plan.grid,
        stages_ms=StageTimes(
            decode_ms=(decoded - started) * 1e3,
            resize_ms=(shrunk - decoded) * 1e3,
            patchify_ms=(done - shrunk) * 1e3,
        ),
    )
