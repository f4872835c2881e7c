"""Attention rollout maps: the request's graph inputs, the normalised grid, the heatmap overlay.

The rollout itself (Abnar & Zuidema 2020) is computed inside `model.rollout.onnx`; this module
only names its inputs (`RolloutParams`, part of a batch key because they are per-batch graph
inputs), scales its (grid_h, grid_w) output so the largest value is 1, and draws it over the
uploaded image: upsampled onto the part of the original image the model saw (with the `crop`
policy only the centre crop; no heat outside it), coloured with an inferno-like lookup table and
blended over the image at its original size and orientation. numpy and Pillow only.
"""

from __future__ import annotations

import base64
import io
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray
from PIL import Image

from app.core.colormap import COLORMAP
from app.engine import RolloutMap
from app.models.spec import HeadFusion
from app.pipeline.preprocess import ImageDecodeError, ResizePlan, open_image, orient, to_rgb

HEATMAP_ALPHA = 0.5  # weight of the colour over the photo inside the region the model saw
# zlib level 1, not Pillow's default 6: a heatmap is drawn per request, and time matters more
# than bytes (docs/performance.md, "Figures behind the code").
PNG_COMPRESS_LEVEL = 1


@dataclass(frozen=True)
class RolloutResult:
    grid: list[list[float]]  # grid_h rows of grid_w values, the largest 1
    head_fusion: HeadFusion
    discard_ratio: float
    heatmap_png: str | None = None  # base64, when asked for


def normalise(rollout: NDArray[np.floating]) -> RolloutMap:
    """Scale a rollout map so its largest value is 1 (all zeros stay zeros)."""
    values = np.asarray(rollout, dtype=np.float32)
    top = float(values.max(initial=0.0))
    if not np.isfinite(top) or top <= 0.0:
        # A discard ratio near 1 can zero every patch: there is no "most attended" patch.
        return np.zeros_like(values)
    return values / np.float32(top)


def seen_box(image_size: tuple[int, int], plan: ResizePlan) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) in original pixels of what the patch grid covers.

    `plan` resized the (oriented) image to `plan.size` and then cropped `plan.box`: map the box
    back through the resize. Without a crop the grid covers the whole image.
    """
    width, height = image_size
    if plan.box is None:
        return 0, 0, width, height
    sx, sy = width / plan.size[0], height / plan.size[1]
    left, top, right, bottom = plan.box
    x0 = min(max(round(left * sx), 0), width - 1)
    y0 = min(max(round(top * sy), 0), height - 1)
    x1 = min(max(round(right * sx), x0 + 1), width)
    y1 = min(max(round(bottom * sy), y0 + 1), height)
    return x0, y0, x1, y1


def overlay(image: Image.Image, heat: RolloutMap, box: tuple[int, int, int, int]) -> Image.Image:
    """`heat` (grid_h, grid_w) in [0, 1], coloured and blended over `box` of an RGB image."""
    x0, y0, x1, y1 = box
    # 256 levels are plenty for a picture, and upsampling uint8 costs a quarter of float32's
    # memory on a 40-megapixel image.
    levels = np.rint(np.clip(heat, 0.0, 1.0) * 255.0).astype(np.uint8)  # (gh, gw)
    upsampled = Image.fromarray(levels).resize((x1 - x0, y1 - y0), Image.Resampling.BILINEAR)
    colours = Image.fromarray(COLORMAP[np.asarray(upsampled)])  # (h, w, 3)
    blended = Image.blend(image.crop(box), colours, HEATMAP_ALPHA)
    out = image.copy()
    out.paste(blended, (x0, y0))
    return out


def decode_oriented(data: bytes, name: str, max_pixels: int) -> Image.Image:
    """The whole image, full size, EXIF-oriented, as RGB (as `imaging.prepare` sees it)."""
    with open_image(data, name, max_pixels) as img:
        try:
            img.load()
            oriented, _ = orient(img)
            rgb = to_rgb(oriented)
            # `rgb` may be `img` itself: make sure the pixels outlive the file.
            return rgb.copy() if rgb is img else rgb
        except Exception as exc:
            raise ImageDecodeError(f"could not decode image {name} again for its heatmap") from exc


def heatmap_png(
    data: bytes,
    name: str,
    max_pixels: int,
    heat: RolloutMap,
    plan: ResizePlan,
) -> str:
    """The rollout blended over the uploaded image, as a base64 PNG of the image's size."""
    image = decode_oriented(data, name, max_pixels)
    drawn = overlay(image, heat, seen_box(image.size, plan))
    buf = io.BytesIO()
    drawn.save(buf, "PNG", compress_level=PNG_COMPRESS_LEVEL)
    return base64.b64encode(buf.getvalue()).decode("ascii")
