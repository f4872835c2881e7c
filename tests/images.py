"""Test images made on the spot with Pillow and numpy (encoded bytes, as a client sends them)."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image


def encode(img: Image.Image, fmt: str = "PNG", **params: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **params)
    return buf.getvalue()


def noise(width: int, height: int, seed: int = 0) -> Image.Image:
    """Random RGB pixels: every patch differs, so layout mistakes cannot hide."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def smooth(width: int, height: int, seed: int = 0) -> Image.Image:
    """A smooth colour field (JPEG-friendly, unlike noise)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    phase = rng.uniform(0, 2 * np.pi, 3)
    channels = [
        127.5 + 127.5 * np.sin(x / (17.0 + 5 * c) + y / (23.0 + 3 * c) + phase[c]) for c in range(3)
    ]
    return Image.fromarray(np.stack(channels, axis=-1).astype(np.uint8))


def jpeg(width: int = 96, height: int = 72, seed: int = 0, **params: object) -> bytes:
    return encode(smooth(width, height, seed), "JPEG", quality=90, **params)


def png(width: int = 96, height: int = 72, seed: int = 0) -> bytes:
    return encode(noise(width, height, seed), "PNG")
