"""A JPEG's header, read from its markers: what decides whether the GPU decoder may take it.

Only the segments before the first scan are read (a few hundred bytes to a few kilobytes of a
photo), with no decoding: the frame header (SOFn: the coding process, precision, size and
each component's sampling), the first APP1 Exif segment's orientation tag (the one Pillow
reads, so both paths orient alike) and an APP14 Adobe segment's colour transform. Anything
malformed gives None or an unreadable orientation; the caller then sends the image to the CPU
path, which gives it the answer it gets today.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

SOI = b"\xff\xd8"
EOI = b"\xff\xd9"
# SOF markers by coding process (ITU T.81 table B.1). 0xC4 (DHT), 0xC8 (JPG) and 0xCC (DAC)
# share the range and are not frame headers.
BASELINE = 0xC0
EXTENDED = 0xC1  # extended sequential, Huffman
PROGRESSIVE = frozenset({0xC2, 0xC6, 0xCA, 0xCE})
LOSSLESS = frozenset({0xC3, 0xC7, 0xCB, 0xCF})
ARITHMETIC = frozenset({0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF})
HIERARCHICAL = frozenset({0xC5, 0xC6, 0xC7, 0xCD, 0xCE, 0xCF})
SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
SOS = 0xDA
APP1 = 0xE1
APP14 = 0xEE
_STANDALONE = frozenset({0x01, *range(0xD0, 0xD8)})  # TEM, RSTn: no length follows
EXIF_ORIENTATION = 0x0112
UNREADABLE = 0  # an Exif segment is there, but its orientation could not be read


@dataclass(frozen=True)
class JpegHeader:
    marker: int  # the SOFn marker's second byte, 0xC0..0xCF
    precision: int  # bits per sample
    width: int
    height: int
    sampling: tuple[tuple[int, int], ...]  # (horizontal, vertical) factors, per component
    orientation: int  # EXIF 1..8; 1 without an Exif orientation; UNREADABLE (0)
    adobe_transform: int | None  # APP14: 0 none (RGB or CMYK), 1 YCbCr, 2 YCCK; None: no APP14
    complete: bool  # the data ends with an EOI marker (a truncated file does not)

    @property
    def components(self) -> int:
        return len(self.sampling)

    @property
    def progressive(self) -> bool:
        return self.marker in PROGRESSIVE

    @property
    def lossless(self) -> bool:
        return self.marker in LOSSLESS

    @property
    def arithmetic(self) -> bool:
        return self.marker in ARITHMETIC

    @property
    def hierarchical(self) -> bool:
        return self.marker in HIERARCHICAL

    @property
    def oriented_size(self) -> tuple[int, int]:
        """(width, height) as a person sees it: orientations 5..8 swap the sides."""
        return (self.height, self.width) if self.orientation >= 5 else (self.width, self.height)


def is_jpeg(data: bytes) -> bool:
    return data[:3] == b"\xff\xd8\xff"


def read_header(data: bytes) -> JpegHeader | None:
    """The header of a JPEG file, or None where `data` is not one or its markers are broken
    before the first scan."""
    if not is_jpeg(data):
        return None
    frame: tuple[int, int, int, int, tuple[tuple[int, int], ...]] | None = None
    orientation: int | None = None
    adobe: int | None = None
    at = 2
    end = len(data)
    while at < end:
        if data[at] != 0xFF:
            return None  # a segment must start at a marker
        while at < end and data[at] == 0xFF:  # fill bytes
            at += 1
        if at >= end:
            return None
        marker = data[at]
        at += 1
        if marker in _STANDALONE:
            continue
        if marker == 0xD8 or marker == 0xD9:
            return None  # a second SOI, or EOI before any scan
        if at + 2 > end:
            return None
        (length,) = struct.unpack_from(">H", data, at)
        if length < 2 or at + length > end:
            return None
        segment = data[at + 2 : at + length]
        at += length
        if marker in SOF_MARKERS:
            if frame is not None:
                return None  # one frame per (non-hierarchical) file; Pillow keeps the last
            frame = _frame(marker, segment)
            if frame is None:
                return None
        elif marker == APP1 and orientation is None and segment[:6] == b"Exif\x00\x00":
            orientation = exif_orientation(segment[6:])
        elif marker == APP14 and segment[:5] == b"Adobe" and len(segment) >= 12:
            adobe = segment[11]
        elif marker == SOS:
            break
    if frame is None:
        return None
    marker, precision, height, width, sampling = frame
    return JpegHeader(
        marker=marker,
        precision=precision,
        width=width,
        height=height,
        sampling=sampling,
        orientation=1 if orientation is None else orientation,
        adobe_transform=adobe,
        complete=data.rstrip(b"\x00").endswith(EOI),
    )


def _frame(
    marker: int, segment: bytes
) -> tuple[int, int, int, int, tuple[tuple[int, int], ...]] | None:
    if len(segment) < 6:
        return None
    precision, height, width, count = struct.unpack_from(">BHHB", segment, 0)
    if count == 0 or len(segment) < 6 + 3 * count:
        return None
    sampling = tuple(
        (segment[6 + 3 * i + 1] >> 4, segment[6 + 3 * i + 1] & 0x0F) for i in range(count)
    )
    return marker, precision, height, width, sampling


def exif_orientation(tiff: bytes) -> int:
    """The orientation tag of IFD0 in an Exif block (its TIFF structure): 1..8; 1 when the
    tag is absent; UNREADABLE when the structure is broken or the value out of range."""
    if len(tiff) < 8:
        return UNREADABLE
    order = tiff[:2]
    if order == b"II":
        endian = "<"
    elif order == b"MM":
        endian = ">"
    else:
        return UNREADABLE
    (magic, ifd) = struct.unpack_from(endian + "HI", tiff, 2)
    if magic != 42 or ifd + 2 > len(tiff):
        return UNREADABLE
    (entries,) = struct.unpack_from(endian + "H", tiff, ifd)
    if ifd + 2 + 12 * entries > len(tiff):
        return UNREADABLE
    for i in range(entries):
        tag, kind, count = struct.unpack_from(endian + "HHI", tiff, ifd + 2 + 12 * i)
        if tag != EXIF_ORIENTATION:
            continue
        if kind != 3 or count != 1:  # SHORT, one value, kept in the entry itself
            return UNREADABLE
        (value,) = struct.unpack_from(endian + "H", tiff, ifd + 2 + 12 * i + 8)
        return value if 1 <= value <= 8 else UNREADABLE
    return 1
