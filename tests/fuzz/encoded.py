"""Encoded images for the fuzz tests: every colour mode in every format Pillow writes it to,
and files whose header claims a size their (garbage) pixel data does not have."""

from __future__ import annotations

import io
import struct
import zlib
from dataclasses import dataclass

import numpy as np
from hypothesis import strategies as st
from PIL import ExifTags, Image

# Formats each generated mode is written in: every pairing Pillow 13 saves. TIFF stores each mode
# as it is; WebP converts the modes it lacks to RGB(A) and GIF to a palette; JPEG, PNG and BMP
# refuse the modes missing here.
FORMATS_OF_MODE: dict[str, tuple[str, ...]] = {
    "1": ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF"),
    "L": ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF"),
    "LA": ("PNG", "WEBP", "GIF", "TIFF"),
    "P": ("PNG", "WEBP", "GIF", "BMP", "TIFF"),
    "PA": ("WEBP", "TIFF"),
    "RGB": ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF"),
    "RGBA": ("PNG", "WEBP", "GIF", "BMP", "TIFF"),
    "CMYK": ("JPEG", "WEBP", "TIFF"),
    "YCbCr": ("JPEG", "WEBP", "TIFF"),
    "LAB": ("WEBP", "TIFF"),
    "I;16": ("PNG", "WEBP", "GIF", "TIFF"),
    "I": ("WEBP", "GIF", "TIFF"),
    "F": ("WEBP", "GIF", "TIFF"),
}
MODE_FORMATS = tuple((mode, fmt) for mode, formats in FORMATS_OF_MODE.items() for fmt in formats)
# Formats whose files carry an orientation tag Pillow writes and reads back (TIFF in its own
# tags, the others in EXIF); GIF and BMP have none.
ORIENTED_FORMATS = frozenset({"JPEG", "PNG", "WEBP", "TIFF"})
# Formats with a palette entry that can be transparent.
TRANSPARENT_PALETTE_FORMATS = frozenset({"PNG", "GIF"})


@dataclass(frozen=True)
class Encoded:
    data: bytes
    mode: str
    fmt: str
    size: tuple[int, int]  # (width, height) as stored
    orientation: int  # the EXIF orientation written (1: none)

    @property
    def displayed_size(self) -> tuple[int, int]:
        """(width, height) after the orientation: 5..8 turn the image a quarter."""
        w, h = self.size
        return (h, w) if self.orientation >= 5 else (w, h)


def _pixels(mode: str, size: tuple[int, int], rng: np.random.Generator) -> Image.Image:
    w, h = size
    if mode == "1":
        return Image.frombytes("1", size, rng.bytes((w + 7) // 8 * h))
    if mode == "I;16":
        return Image.frombytes(mode, size, rng.integers(0, 65536, w * h).astype("<u2").tobytes())
    if mode == "I":
        # 8-bit, 16-bit and full 32-bit ranges, negatives included: each takes another path.
        top = int(rng.choice([256, 65536, 2**31 - 1]))
        values = rng.integers(-top // 8, top, w * h).astype("<i4")
        return Image.frombytes(mode, size, values.tobytes())
    if mode == "F":
        scale = float(rng.choice([1.0, 255.0, 65535.0, 1e9]))
        return Image.frombytes(
            mode, size, rng.uniform(-scale / 8, scale, w * h).astype("<f4").tobytes()
        )
    img = Image.frombytes(mode, size, rng.bytes(w * h * Image.getmodebands(mode)))
    if mode == "P":
        img.putpalette(rng.bytes(768))
    return img


@st.composite
def sizes(draw: st.DrawFn, largest: int = 300) -> tuple[int, int]:
    """(width, height): mostly up to `largest` a side; sometimes a sliver like 1x500."""
    if draw(st.integers(0, 4)) == 0:
        thin, long = draw(st.integers(1, 3)), draw(st.integers(largest, 20 * largest))
        return (thin, long) if draw(st.booleans()) else (long, thin)
    return draw(st.integers(1, largest)), draw(st.integers(1, largest))


@st.composite
def encoded_images(
    draw: st.DrawFn, largest: int = 300, mode_format: tuple[str, str] | None = None
) -> Encoded:
    """A random image in a random mode (or the one given), saved by Pillow in a format that
    takes that mode."""
    mode, fmt = mode_format or draw(st.sampled_from(MODE_FORMATS))
    size = draw(sizes(largest))
    img = _pixels(mode, size, np.random.default_rng(draw(st.integers(0, 2**32 - 1))))
    params: dict[str, object] = {}
    if mode == "P" and fmt in TRANSPARENT_PALETTE_FORMATS and draw(st.booleans()):
        params["transparency"] = draw(st.integers(0, 255))
    if fmt == "JPEG":
        params["quality"] = draw(st.integers(1, 100))
    orientation = draw(st.integers(1, 8)) if fmt in ORIENTED_FORMATS else 1
    if orientation != 1 and fmt == "TIFF":
        params["tiffinfo"] = {ExifTags.Base.Orientation: orientation}
    elif orientation != 1:
        exif = Image.Exif()
        exif[ExifTags.Base.Orientation] = orientation
        params["exif"] = exif
    buf = io.BytesIO()
    img.save(buf, fmt, **params)
    return Encoded(buf.getvalue(), mode, fmt, size, orientation)


# --- headers that claim a size --------------------------------------------------------------------

# The largest side each format's header can state (WebP's lossy header has 14 bits a side).
MAX_SIDE = {"PNG": 65535, "BMP": 65535, "GIF": 65535, "TIFF": 65535, "JPEG": 65535, "WEBP": 16383}


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _tiff(width: int, height: int, pixels: bytes) -> bytes:
    entries = [  # (tag, type: 3 SHORT / 4 LONG, value)
        (256, 4, width),
        (257, 4, height),
        (258, 3, 8),  # bits per sample
        (259, 3, 1),  # no compression
        (262, 3, 1),  # black is zero
        (273, 4, 0),  # strip offset, set below
        (277, 3, 1),  # samples per pixel
        (278, 4, height),  # rows per strip
        (279, 4, len(pixels)),  # strip byte count
    ]
    data_at = 8 + 2 + 12 * len(entries) + 4
    ifd = struct.pack("<H", len(entries))
    for tag, kind, value in entries:
        value = data_at if tag == 273 else value
        packed = struct.pack("<HH", value, 0) if kind == 3 else struct.pack("<I", value)
        ifd += struct.pack("<HHI", tag, kind, 1) + packed
    return b"II*\x00" + struct.pack("<I", 8) + ifd + struct.pack("<I", 0) + pixels


def claiming(fmt: str, width: int, height: int, pixels: bytes) -> bytes:
    """A file whose header says width x height and whose pixel data is `pixels` (garbage)."""
    if fmt == "PNG":
        ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
        return (
            b"\x89PNG\r\n\x1a\n"
            + _png_chunk(b"IHDR", ihdr)
            + _png_chunk(b"IDAT", pixels)
            + _png_chunk(b"IEND", b"")
        )
    if fmt == "BMP":
        info = struct.pack(
            "<IiiHHIIiiII", 40, width, height, 1, 24, 0, len(pixels), 2835, 2835, 0, 0
        )
        return b"BM" + struct.pack("<IHHI", 54 + len(pixels), 0, 0, 54) + info + pixels
    if fmt == "GIF":
        screen = struct.pack("<HHBBB", width, height, 0, 0, 0)
        frame = b"," + struct.pack("<HHHHB", 0, 0, width, height, 0) + b"\x08"
        blocks = b"".join(
            bytes([len(c)]) + c for c in (pixels[i : i + 255] for i in range(0, len(pixels), 255))
        )
        return b"GIF89a" + screen + frame + blocks + b"\x00;"
    if fmt == "TIFF":
        return _tiff(width, height, pixels)
    if fmt == "JPEG":
        sof = struct.pack(">BHHB", 8, height, width, 3) + b"\x01\x22\x00\x02\x11\x01\x03\x11\x01"
        sos = b"\x03\x01\x00\x02\x11\x03\x11\x00\x3f\x00"
        return (
            b"\xff\xd8"
            + b"\xff\xc0" + struct.pack(">H", len(sof) + 2) + sof
            + b"\xff\xda" + struct.pack(">H", len(sos) + 2) + sos
            + pixels
            + b"\xff\xd9"
        )  # fmt: skip
    if fmt == "WEBP":
        # A lossy key frame: 3-byte frame tag, start code, 14-bit width and height.
        frame = b"\x10\x00\x00\x9d\x01\x2a" + struct.pack("<HH", width, height) + pixels
        frame += b"\x00" * (len(frame) % 2)
        chunk = b"VP8 " + struct.pack("<I", len(frame)) + frame
        return b"RIFF" + struct.pack("<I", 4 + len(chunk)) + b"WEBP" + chunk
    raise ValueError(f"no header for {fmt}")
