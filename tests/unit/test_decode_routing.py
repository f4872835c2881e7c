"""JPEG headers read from their markers, and which path each image takes and why."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import ExifTags, Image

from app.core.settings import Settings
from app.engine import ServedVersion
from app.pipeline import jpeg
from app.pipeline.preprocess import ImageTooLargeError, prepare
from app.pipeline.routing import REASONS, DecodeRouter, Route
from app.pipeline.workers import Upload
from tests.images import encode, smooth
from tests.images import jpeg as make_jpeg
from tests.support import ODD_IMAGES, PHOTOS, make_spec, need_folder

SPEC = make_spec()
MAX_TOKENS = 2 * SPEC.architecture.native_tokens


def served(device_decode: bool = True) -> ServedVersion:
    return ServedVersion("unit", 1, SPEC, True, MAX_TOKENS, device_decode)


def route(data: bytes, content_type: str | None = "image/jpeg", **kw: object) -> Route:
    router = DecodeRouter(Settings(**kw))  # type: ignore[arg-type]
    return router.route(Upload(data, "'x.jpg'", content_type), served(), "crop", rollout=False)


def with_orientation(data_image: Image.Image, orientation: int) -> bytes:
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = orientation
    return encode(data_image, "JPEG", quality=90, exif=exif.tobytes())


def cmyk_jpeg() -> bytes:
    return encode(smooth(64, 48).convert("CMYK"), "JPEG", quality=90)


# --- the header -----------------------------------------------------------------------------


def test_a_baseline_jpegs_header() -> None:
    header = jpeg.read_header(make_jpeg(96, 72))
    assert header is not None
    assert (header.marker, header.precision, header.width, header.height) == (0xC0, 8, 96, 72)
    assert header.sampling == ((2, 2), (1, 1), (1, 1))  # Pillow's default 4:2:0
    assert (header.orientation, header.adobe_transform, header.complete) == (1, None, True)
    assert not (header.progressive or header.lossless or header.arithmetic)


def test_progressive_grey_444_cmyk_and_oriented_jpegs_read_as_such() -> None:
    progressive = jpeg.read_header(make_jpeg(progressive=True))
    assert progressive is not None and progressive.progressive and progressive.marker == 0xC2
    grey = jpeg.read_header(encode(smooth(40, 30).convert("L"), "JPEG"))
    assert grey is not None and grey.components == 1
    full = jpeg.read_header(make_jpeg(subsampling=0))
    assert full is not None and full.sampling == ((1, 1), (1, 1), (1, 1))
    cmyk = jpeg.read_header(cmyk_jpeg())
    assert cmyk is not None and cmyk.components == 4 and cmyk.adobe_transform == 0
    turned = jpeg.read_header(with_orientation(smooth(80, 40), 6))
    assert turned is not None and turned.orientation == 6 and turned.oriented_size == (40, 80)


def test_broken_headers_give_none_and_a_cut_file_is_incomplete() -> None:
    data = make_jpeg()
    assert jpeg.read_header(b"\x89PNG\r\n\x1a\n") is None
    assert jpeg.read_header(data[:20]) is None  # cut inside the markers
    header = jpeg.read_header(data[: len(data) // 2])
    assert header is not None and header.complete is False


def test_an_unreadable_exif_orientation_is_told_apart_from_none() -> None:
    tiff_ii = b"II*\x00\x08\x00\x00\x00" + b"\x01\x00" + b"\x12\x01\x03\x00\x01\x00\x00\x00"
    assert jpeg.exif_orientation(tiff_ii + b"\x03\x00\x00\x00") == 3
    assert jpeg.exif_orientation(tiff_ii + b"\x09\x00\x00\x00") == jpeg.UNREADABLE  # out of range
    assert jpeg.exif_orientation(b"II*\x00\x08\x00\x00\x00\x00\x00") == 1  # no tag
    assert jpeg.exif_orientation(b"XX*\x00") == jpeg.UNREADABLE
    assert jpeg.exif_orientation(b"II*\x00\xff\x00\x00\x00") == jpeg.UNREADABLE  # IFD past end


def _real_jpegs() -> list[Path]:
    files = sorted(PHOTOS.glob("*.JPEG")) if PHOTOS.is_dir() else []
    if ODD_IMAGES.is_dir():
        files += [p for p in sorted(ODD_IMAGES.iterdir()) if jpeg.is_jpeg(p.read_bytes())]
    return files


@pytest.mark.needs_shared
def test_the_header_agrees_with_pillow_on_every_real_jpeg() -> None:
    need_folder(PHOTOS, "the shared photos")
    need_folder(ODD_IMAGES, "the shared odd images")
    files = _real_jpegs()
    assert len(files) > 110
    compared = 0
    for path in files:
        data = path.read_bytes()
        header = jpeg.read_header(data)
        try:
            img = Image.open(path, formats=("JPEG",))
        except Exception:
            continue  # Pillow refuses its header: the CPU path answers it (routed "header")
        with img:
            if header is None:
                continue
            assert (header.width, header.height) == img.size, path.name
            assert header.components == len(img.getbands()), path.name
            assert header.progressive == bool(img.info.get("progressive")), path.name
            assert header.adobe_transform == img.info.get("adobe_transform"), path.name
            try:
                pillow = img.getexif().get(ExifTags.Base.Orientation, 1)
            except Exception:
                pillow = None
            if header.orientation != jpeg.UNREADABLE:
                assert header.orientation == pillow, path.name
            compared += 1
    assert compared > 100


# --- the route --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (make_jpeg(), "jpeg"),
        (make_jpeg(subsampling=0), "jpeg"),
        (encode(smooth(40, 30).convert("L"), "JPEG"), "jpeg"),
        (make_jpeg(progressive=True), "progressive"),
        (cmyk_jpeg(), "cmyk"),
        (encode(smooth(40, 30), "PNG"), "format"),
        (make_jpeg()[:-300], "truncated"),
        (b"\xff\xd8\xff\xe0\x00", "header"),
    ],
    ids=["baseline", "444", "grey", "progressive", "cmyk", "png", "cut", "broken-markers"],
)
def test_each_kind_of_image_takes_its_path_with_its_reason(data: bytes, reason: str) -> None:
    got = route(data)
    assert (got.path, got.reason) == ("gpu" if reason == "jpeg" else "cpu", reason)
    assert reason in REASONS
    if got.path == "gpu":
        assert got.encoded is not None and got.encoded.data is data  # the upload's own bytes


def test_a_gpu_image_carries_the_cpu_paths_plan_with_the_orientation_applied() -> None:
    data = with_orientation(smooth(120, 60), 8)
    got = route(data)
    cpu = prepare(data, SPEC, "crop", name="'x.jpg'", max_pixels=10**8, fit_max_tokens=MAX_TOKENS)
    assert got.path == "gpu" and got.encoded is not None
    assert got.encoded.orientation == 8
    assert got.encoded.image_size == cpu.image_size == (60, 120)
    assert got.encoded.grid == cpu.grid
    assert got.encoded.pixels == (cpu.grid[0] * 8, cpu.grid[1] * 8)


def test_off_rollout_and_a_declared_non_image_go_to_the_cpu() -> None:
    data = make_jpeg()
    router = DecodeRouter(Settings())
    upload = Upload(data, "'x.jpg'", "image/jpeg")
    assert router.route(upload, served(False), "crop", rollout=False).reason == "off"
    assert router.route(upload, served(), "crop", rollout=True).reason == "rollout"
    text = Upload(data, "'x.jpg'", "text/plain")
    assert router.route(text, served(), "crop", rollout=False).reason == "declared_type"


def test_too_many_pixels_is_refused_with_the_cpu_paths_message() -> None:
    data = make_jpeg(96, 72)
    with pytest.raises(ImageTooLargeError) as routed:
        route(data, image_max_pixels=1000)
    with pytest.raises(ImageTooLargeError) as cpu:
        prepare(data, SPEC, "crop", name="'x.jpg'", max_pixels=1000, fit_max_tokens=MAX_TOKENS)
    assert routed.value.message == cpu.value.message
    assert "has 6912 pixels; the limit is 1000 pixels" in routed.value.message
