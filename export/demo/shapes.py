"""A procedural image-classification data set: ten shapes on cluttered, textured backgrounds.

Each image holds one object of one class at a random position, scale, rotation and colour,
drawn over a gradient with low-frequency colour noise, stray lines and dots. The object's mask is
kept beside the label, so attention maps can be checked against where the object really is.
Everything is drawn from one seeded generator: a seed names a data set.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray
from PIL import Image, ImageDraw

CLASSES: tuple[str, ...] = (
    "circle",
    "triangle",
    "square",
    "hexagon",
    "star",
    "cross",
    "ring",
    "crescent",
    "arrow",
    "heart",
)

SUPERSAMPLE = 4  # shapes are drawn at 4x and box-filtered down, for anti-aliased edges
# Objects take any dark colour, backgrounds any light one, so an object always stands out by
# its luminance; clutter takes any colour, so darkness alone never says "object". (With both
# drawn from the full range a ViT this size learns nothing in a CPU budget: it must first find
# contrast-invariant edge features with no convolutional prior.)
OBJECT_RANGE = (0.0, 110.0)
BACKGROUND_RANGE = (120.0, 255.0)
MAX_ROTATION = math.pi / 4  # radians either way


@dataclass(frozen=True)
class ShapeBatch:
    images: NDArray[np.uint8]  # (n, H, W, 3)
    labels: NDArray[np.int64]  # (n,)
    masks: NDArray[np.bool_]  # (n, H, W): True where the object covers at least half a pixel


def _regular(n: int, phase: float = 0.0) -> list[tuple[float, float]]:
    return [
        (math.cos(phase + 2 * math.pi * k / n), math.sin(phase + 2 * math.pi * k / n))
        for k in range(n)
    ]


def _star() -> list[tuple[float, float]]:
    pts = []
    for k in range(10):
        r = 1.0 if k % 2 == 0 else 0.42
        a = -math.pi / 2 + math.pi * k / 5
        pts.append((r * math.cos(a), r * math.sin(a)))
    return pts


def _cross() -> list[tuple[float, float]]:
    w = 0.33
    return [
        (-w, -1),
        (w, -1),
        (w, -w),
        (1, -w),
        (1, w),
        (w, w),
        (w, 1),
        (-w, 1),
        (-w, w),
        (-1, w),
        (-1, -w),
        (-w, -w),
    ]


def _arrow() -> list[tuple[float, float]]:
    return [(-1, -0.25), (0.15, -0.25), (0.15, -0.7), (1, 0), (0.15, 0.7), (0.15, 0.25), (-1, 0.25)]


def _heart() -> list[tuple[float, float]]:
    pts = []
    for k in range(48):
        t = 2 * math.pi * k / 48
        x = 16 * math.sin(t) ** 3
        y = -(13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t))
        pts.append((x / 17, (y + 2.5) / 17))
    return pts


_POLYGONS: dict[str, list[tuple[float, float]]] = {
    "triangle": _regular(3, -math.pi / 2),
    "square": _regular(4, math.pi / 4),
    "hexagon": _regular(6),
    "star": _star(),
    "cross": _cross(),
    "arrow": _arrow(),
    "heart": _heart(),
}


def _shape_mask(
    name: str, size: int, cx: float, cy: float, radius: float, angle: float
) -> NDArray[np.float32]:
    """Coverage in 0..1 of one shape on a size x size canvas."""
    s = SUPERSAMPLE
    canvas = Image.new("L", (size * s, size * s), 0)
    draw = ImageDraw.Draw(canvas)
    cx, cy, r = cx * s, cy * s, radius * s

    def circle(x: float, y: float, rad: float, fill: int) -> None:
        draw.ellipse((x - rad, y - rad, x + rad, y + rad), fill=fill)

    if name == "circle":
        circle(cx, cy, r, 255)
    elif name == "ring":
        circle(cx, cy, r, 255)
        circle(cx, cy, r * 0.55, 0)
    elif name == "crescent":
        circle(cx, cy, r, 255)
        dx, dy = math.cos(angle) * r * 0.5, math.sin(angle) * r * 0.5
        circle(cx + dx, cy + dy, r * 0.85, 0)
    else:
        c, si = math.cos(angle), math.sin(angle)
        pts = [(cx + r * (x * c - y * si), cy + r * (x * si + y * c)) for x, y in _POLYGONS[name]]
        draw.polygon(pts, fill=255)
    small = canvas.resize((size, size), Image.Resampling.BOX)
    return np.asarray(small, dtype=np.float32) / 255.0


def _background(rng: np.random.Generator, size: int, clutter: float) -> NDArray[np.float32]:
    """A gradient, low-frequency colour noise, stray lines and dots: (size, size, 3) in 0..255.

    `clutter` in 0..1 scales the noise, lines and dots (1 is the data set proper; training
    starts lower, a curriculum that gets a ViT off its initial plateau).
    """
    c0, c1 = rng.uniform(*BACKGROUND_RANGE, 3), rng.uniform(*BACKGROUND_RANGE, 3)
    t = np.linspace(0.0, 1.0, size, dtype=np.float32)
    a = rng.uniform(0, 2 * math.pi)
    ramp = (np.cos(a) * t[None, :] + np.sin(a) * t[:, None]) / math.sqrt(2) + 0.5
    bg = c0 + (c1 - c0) * ramp[..., None]
    noise_cells = int(rng.integers(3, 9))
    noise = rng.normal(0, clutter * rng.uniform(10, 40), (noise_cells, noise_cells, 3)).astype(
        np.float32
    )
    bg += np.stack(
        [
            np.asarray(
                Image.fromarray(noise[..., ch]).resize((size, size), Image.Resampling.BICUBIC)
            )
            for ch in range(3)
        ],
        axis=-1,
    )
    img = Image.fromarray(np.clip(bg, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(round(clutter * rng.integers(1, 5))):
        x0, y0, x1, y1 = rng.uniform(0, size, 4)
        colour = tuple(int(v) for v in rng.integers(0, 256, 3))
        draw.line((x0, y0, x1, y1), fill=colour, width=1)
    for _ in range(round(clutter * rng.integers(0, 6))):
        x, y = rng.uniform(0, size, 2)
        rad = rng.uniform(0.8, 2.0)
        colour = tuple(int(v) for v in rng.integers(0, 256, 3))
        draw.ellipse((x - rad, y - rad, x + rad, y + rad), fill=colour)
    pixels = np.asarray(img, dtype=np.float32)
    grain = rng.normal(0, clutter * rng.uniform(0, 8), pixels.shape).astype(np.float32)
    return pixels + grain


def generate(
    n: int, seed: int, size: int = 64, clutter: float = 1.0, rotation: float = 1.0
) -> ShapeBatch:
    """`n` labelled images with their object masks, from the generator seeded with `seed`.

    `clutter` and `rotation` (the fraction of a full turn objects are rotated by, at most) are
    1 for the data set proper; training starts lower (a curriculum).
    """
    rng = np.random.default_rng(seed)
    images = np.empty((n, size, size, 3), dtype=np.uint8)
    labels = rng.integers(0, len(CLASSES), n).astype(np.int64)
    masks = np.empty((n, size, size), dtype=np.bool_)
    for i in range(n):
        radius = rng.uniform(0.2, 0.36) * size
        margin = radius * 0.85
        cx, cy = rng.uniform(margin, size - margin, 2)
        angle = rng.uniform(-1.0, 1.0) * MAX_ROTATION * rotation
        cover = _shape_mask(CLASSES[labels[i]], size, cx, cy, radius, angle)
        bg = _background(rng, size, clutter)
        colour = rng.uniform(*OBJECT_RANGE, 3).astype(np.float32)
        # A little shading inside the object so colour alone is never flat.
        shade = 1.0 + rng.normal(0, 0.04, (size, size, 1)).astype(np.float32)
        obj = np.clip(colour[None, None, :] * shade, 0, 255)
        out = bg * (1.0 - cover[..., None]) + obj * cover[..., None]
        images[i] = np.clip(out, 0, 255).astype(np.uint8)
        masks[i] = cover > 0.5
    return ShapeBatch(images=images, labels=labels, masks=masks)
