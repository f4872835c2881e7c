"""Decoding, orientation, colour modes, resize policies, patch layout (app.pipeline.preprocess)."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from numpy.typing import NDArray
from PIL import ExifTags, Image, ImageFile, JpegImagePlugin

from app.models.grids import fit_grid
from app.models.spec import ModelSpec, Preprocess
from app.pipeline.preprocess import (
    ImageDecodeError,
    ImageTooLargeError,
    PreparedImage,
    ResizePolicy,
    crop_plan,
    prepare,
    to_rgb,
)
from tests.images import encode, jpeg, noise, png, smooth
from tests.support import FORMATS_HINT, make_spec

SPEC = make_spec()  # patch 8, native grid 8x8 (64x64), shorter_side, crop_pct 0.875, bicubic
SQUASH = make_spec(Preprocess(resize_mode="squash", interpolation="bilinear"))


def run(
    data: bytes,
    spec: ModelSpec = SPEC,
    policy: ResizePolicy = "crop",
    *,
    name: str = "'test.png'",
    max_pixels: int = 40_000_000,
    fit_max_tokens: int = 128,
    jpeg_draft: bool = True,
) -> PreparedImage:
    return prepare(
        data,
        spec,
        policy,
        name=name,
        max_pixels=max_pixels,
        fit_max_tokens=fit_max_tokens,
        jpeg_draft=jpeg_draft,
    )


def pixels_of(prepared: PreparedImage, patch_size: int = 8) -> NDArray[np.uint8]:
    """Undo patchify: (gh, gw, P*P*3) -> (gh*P, gw*P, 3)."""
    gh, gw, _ = prepared.patches.shape
    P = patch_size
    x = prepared.patches.reshape(gh, gw, P, P, 3).transpose(0, 2, 1, 3, 4)
    return x.reshape(gh * P, gw * P, 3)


def png_claiming(width: int, height: int) -> bytes:
    """A PNG whose header claims a size and whose pixel data is garbage: only the header is real."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", b"\x00" * 16)


# --- crop policy: the training preprocessing ----------------------------------------------------


def test_crop_scales_the_shorter_side_to_input_over_crop_pct_then_centre_crops() -> None:
    # floor(64 / 0.875) = 73; the long side int(73 * 640 / 480) = 97; round(4.5) = 4 and
    # round(16.5) = 16 (half to even, as torchvision's CenterCrop rounds).
    landscape = crop_plan(640, 480, SPEC)
    assert landscape.size == (97, 73)
    assert landscape.box == (16, 4, 80, 68)
    assert landscape.grid == (8, 8)
    portrait = crop_plan(480, 640, SPEC)
    assert portrait.size == (73, 97)
    assert portrait.box == (4, 16, 68, 80)


def test_crop_with_crop_pct_one_keeps_a_native_size_image_as_is() -> None:
    spec = make_spec(Preprocess(crop_pct=1.0))
    plan = crop_plan(64, 64, spec)
    assert (plan.size, plan.box) == ((64, 64), (0, 0, 64, 64))


def test_crop_of_a_non_square_input_keeps_the_ratio_as_timm_resize_keep_ratio_does() -> None:
    spec = make_spec(grid=(6, 8))  # 48x64 pixels: covers floor(48/.875)=54 x floor(64/.875)=73
    plan = crop_plan(100, 100, spec)
    assert plan.size == (73, 73)
    assert plan.box == (4, 12, 68, 60)  # round(4.5) = 4, round(12.5) = 12
    assert plan.grid == (6, 8)
    # ratio = min(77/54, 101/73); 77 / ratio = 55.65 rounds to 56 (a truncation would give 55)
    plan = crop_plan(101, 77, spec)
    assert plan.size == (73, 56)
    assert plan.box == (4, 4, 68, 52)


def test_squash_resizes_straight_to_the_input_size() -> None:
    plan = crop_plan(640, 100, SQUASH)
    assert (plan.size, plan.box, plan.grid) == ((64, 64), None, (8, 8))


def test_squash_with_a_crop_fraction_resizes_both_sides_then_centre_crops() -> None:
    # timm's squash crop mode, Hugging Face's resize + centre crop (DeiT's 256 -> 224)
    spec = make_spec(Preprocess(resize_mode="squash", crop_pct=0.8, interpolation="bilinear"))
    plan = crop_plan(640, 100, spec)
    # both sides to floor(64 / 0.8) = 80, then the centre 64x64
    assert (plan.size, plan.box, plan.grid) == ((80, 80), (8, 8, 72, 72), (8, 8))


def test_crop_output_is_exactly_pillow_resize_then_centre_crop() -> None:
    img = noise(120, 90, seed=3)
    expected = np.asarray(img.resize((97, 73), Image.Resampling.BICUBIC).crop((16, 4, 80, 68)))
    prepared = run(encode(img, "PNG"))
    assert prepared.grid == (8, 8)
    assert prepared.image_size == (120, 90)
    np.testing.assert_array_equal(pixels_of(prepared), expected)


# --- fit policy: aspect ratio kept, about the native token count --------------------------------


@pytest.mark.parametrize(
    ("width", "height", "native", "cap", "grid"),
    [
        (64, 64, 64, 128, (8, 8)),
        (128, 64, 64, 128, (6, 11)),  # sqrt(32) = 5.66 -> 6, sqrt(128) = 11.3 -> 11
        (64, 128, 64, 128, (11, 6)),
        (13, 13, 64, 128, (8, 8)),  # small images are scaled up to the native token count
        (1000, 10, 64, 128, (1, 91)),  # at least one patch per side (100:1 snaps to 128:1)
        (100_000, 10, 64, 128, (1, 128)),  # capped: one row of fit_max_tokens patches
        (10, 100_000, 64, 128, (128, 1)),
        (300, 200, 196, 392, (11, 17)),  # ViT-B/16 at 224: 187 tokens for a 3:2 photo
        (640, 480, 196, 100, (8, 11)),  # a cap below the native count shrinks both sides
    ],
)
def test_fit_grid_for_given_sizes(
    width: int, height: int, native: int, cap: int, grid: tuple[int, int]
) -> None:
    got = fit_grid(width, height, native, cap)
    assert got == grid
    assert got[0] * got[1] <= cap


def test_fit_resizes_to_the_grid_in_whole_patches() -> None:
    prepared = run(png(128, 64), policy="fit")
    assert prepared.grid == (6, 11)
    assert prepared.patches.shape == (6, 11, 8 * 8 * 3)
    assert prepared.image_size == (128, 64)


# --- orientation, frames and colour modes -------------------------------------------------------


def _red_left_blue_right(orientation: int | None) -> bytes:
    img = Image.new("RGB", (80, 40), (255, 0, 0))
    img.paste((0, 0, 255), (40, 0, 80, 40))
    if orientation is None:
        return encode(img, "JPEG", quality=95)
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = orientation
    return encode(img, "JPEG", quality=95, exif=exif.tobytes())


def _is_red(pixel: NDArray[np.uint8]) -> bool:
    return bool(pixel[0] > 200 and pixel[2] < 60)


def _is_blue(pixel: NDArray[np.uint8]) -> bool:
    return bool(pixel[2] > 200 and pixel[0] < 60)


def test_exif_orientation_rotates_the_image_before_resizing() -> None:
    # Orientation 6: the stored image is displayed turned 90 degrees clockwise, so its left
    # (red) half ends up on top and the reported size is the displayed one.
    prepared = run(_red_left_blue_right(6), SQUASH, name="'rotated.jpg'")
    assert prepared.image_size == (40, 80)
    pixels = pixels_of(prepared)
    assert _is_red(pixels[4, 32]) and _is_blue(pixels[60, 32])


def test_an_image_without_orientation_is_not_rotated() -> None:
    prepared = run(_red_left_blue_right(None), SQUASH)
    assert prepared.image_size == (80, 40)
    pixels = pixels_of(prepared)
    assert _is_red(pixels[32, 4]) and _is_blue(pixels[32, 60])


def test_only_the_first_frame_of_an_animation_is_used() -> None:
    frames = [Image.new("RGB", (64, 64), (255, 0, 0)), Image.new("RGB", (64, 64), (0, 0, 255))]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    pixels = pixels_of(run(buf.getvalue(), SQUASH))
    assert (pixels == np.array([255, 0, 0], dtype=np.uint8)).all()


@pytest.mark.parametrize(
    ("img", "expected"),
    [
        (Image.new("RGBA", (4, 4), (255, 0, 0, 0)), (255, 255, 255)),  # transparent -> white
        (Image.new("RGBA", (4, 4), (0, 0, 0, 255)), (0, 0, 0)),
        (Image.new("RGBA", (4, 4), (0, 0, 0, 128)), (127, 127, 127)),  # half over white
        (Image.new("LA", (4, 4), (0, 0)), (255, 255, 255)),
        (Image.new("LA", (4, 4), (40, 255)), (40, 40, 40)),
        (Image.new("CMYK", (4, 4), (0, 0, 0, 0)), (255, 255, 255)),
        (Image.new("CMYK", (4, 4), (0, 0, 0, 255)), (0, 0, 0)),
        (Image.new("L", (4, 4), 77), (77, 77, 77)),
        (Image.new("1", (4, 4), 1), (255, 255, 255)),
        (Image.fromarray(np.full((4, 4), 65535, dtype=np.uint16)), (255, 255, 255)),  # I;16
        (Image.fromarray(np.full((4, 4), 32896, dtype=np.uint16)), (128, 128, 128)),
        (Image.fromarray(np.full((4, 4), 1000, dtype=np.int32)), (4, 4, 4)),  # I, 16-bit data
        (Image.fromarray(np.full((4, 4), 200.0, dtype=np.float32)), (200, 200, 200)),  # F
    ],
    ids=[
        "rgba-clear",
        "rgba-opaque",
        "rgba-half",
        "la-clear",
        "la-opaque",
        "cmyk-white",
        "cmyk-black",
        "l",
        "1",
        "i16-max",
        "i16-mid",
        "i32",
        "f",
    ],
)
def test_every_mode_becomes_8_bit_rgb(img: Image.Image, expected: tuple[int, int, int]) -> None:
    rgb = to_rgb(img)
    assert rgb.mode == "RGB"
    assert rgb.getpixel((0, 0)) == expected


def test_a_palette_image_with_a_transparent_index_is_composited_on_white() -> None:
    img = Image.new("P", (64, 64), 0)
    img.putpalette([255, 0, 0, 0, 255, 0])
    img.paste(1, (32, 0, 64, 64))
    pixels = pixels_of(run(encode(img, "PNG", transparency=0), SQUASH))
    assert (pixels[:, :28] == 255).all()  # transparent red -> white
    assert (pixels[:, 36:] == np.array([0, 255, 0], dtype=np.uint8)).all()


def test_a_16_bit_png_is_scaled_not_clipped() -> None:
    ramp = np.tile(np.linspace(0, 65535, 64).astype(np.uint16), (64, 1))
    data = encode(Image.fromarray(ramp), "PNG")
    assert Image.open(io.BytesIO(data)).mode == "I;16"
    pixels = pixels_of(run(data, SQUASH))
    expected = np.rint(ramp / 257.0).astype(np.uint8)
    np.testing.assert_allclose(pixels[..., 0], expected, atol=1)


def test_a_cmyk_tiff_decodes() -> None:
    img = Image.new("CMYK", (64, 64), (0, 255, 255, 0))  # red
    pixels = pixels_of(run(encode(img, "TIFF"), SQUASH))
    assert (pixels == np.array([255, 0, 0], dtype=np.uint8)).all()


# --- JPEG draft mode ----------------------------------------------------------------------------


def test_a_large_jpeg_is_decoded_in_draft_mode_close_to_a_full_decode(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    drafts: list[tuple[int, int] | None] = []
    real_draft = JpegImagePlugin.JpegImageFile.draft

    def spy(
        self: JpegImagePlugin.JpegImageFile, mode: str | None, size: tuple[int, int] | None
    ) -> tuple[str, tuple[int, int, float, float]] | None:
        drafts.append(size)
        return real_draft(self, mode, size)

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", spy)
    data = jpeg(2048, 1536, seed=5)
    drafted = run(data)
    assert drafts == [(194, 194)]  # 2x the larger side of the 97x73 resize target
    full = run(data, jpeg_draft=False)
    assert drafts == [(194, 194)]
    assert drafted.grid == full.grid == (8, 8)
    assert drafted.image_size == full.image_size == (2048, 1536)
    diff = np.abs(drafted.patches.astype(np.int16) - full.patches.astype(np.int16))
    assert diff.mean() < 1.0


def test_a_small_jpeg_is_decoded_at_full_size(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[object] = []
    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", lambda *a: calls.append(a))
    run(jpeg(300, 200))
    assert calls == []


def test_the_reported_size_of_a_drafted_rotated_jpeg_is_the_original_displayed_size() -> None:
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = 8
    data = encode(smooth(1600, 1200), "JPEG", exif=exif.tobytes())
    assert run(data).image_size == (1200, 1600)


# --- errors -------------------------------------------------------------------------------------


def test_a_truncated_jpeg_raises_the_decode_error() -> None:
    data = jpeg(96, 72)
    with pytest.raises(ImageDecodeError) as info:
        run(data[: len(data) * 2 // 3], name="'cut.jpg'")
    assert info.value.message == (
        "could not decode image 'cut.jpg': the JPEG file is truncated or corrupt; "
        "send the complete file"
    )
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_a_truncated_png_raises_the_decode_error() -> None:
    data = png(96, 72)
    with pytest.raises(ImageDecodeError) as info:
        run(data[: len(data) // 2], name="'cut.png'")
    assert info.value.message == (
        "could not decode image 'cut.png': the PNG file is truncated or corrupt; "
        "send the complete file"
    )


@pytest.mark.parametrize(
    "data",
    [b"", b"hello, world", b"%PDF-1.4\n", encode(noise(8, 8), "PPM"), encode(noise(8, 8), "TGA")],
    ids=["empty", "text", "pdf", "ppm-unsupported", "tga-unsupported"],
)
def test_bytes_that_are_not_a_supported_image_raise_the_decode_error(data: bytes) -> None:
    with pytest.raises(ImageDecodeError) as info:
        run(data, name="'x.bin'")
    assert info.value.message == (
        f"could not decode image 'x.bin': it is not an image in a supported format; {FORMATS_HINT}"
    )


def test_the_pixel_limit_is_checked_from_the_header_before_decoding() -> None:
    # The pixel data is garbage: a decode would fail with ImageDecodeError, so this error can
    # only come from the header.
    with pytest.raises(ImageTooLargeError) as info:
        run(png_claiming(8000, 6000), name="'big.png'")
    assert info.value.message == (
        "image 'big.png' has 48.0 megapixels; the limit is 40.0 megapixels: "
        "downscale it and send it again"
    )


def test_a_decompression_bomb_is_refused_by_pillows_guard_with_the_same_message() -> None:
    # 2.5 gigapixels is over twice Pillow's default limit: its guard raises inside open().
    with pytest.raises(ImageTooLargeError) as info:
        run(png_claiming(50_000, 50_000), name="'bomb.png'")
    assert info.value.message == (
        "image 'bomb.png' has 2500.0 megapixels; the limit is 40.0 megapixels: "
        "downscale it and send it again"
    )


def test_the_pixel_limit_is_a_parameter() -> None:
    with pytest.raises(ImageTooLargeError) as info:
        run(png(100, 80), name="'p.png'", max_pixels=5000)
    assert info.value.message == (
        "image 'p.png' has 8000 pixels; the limit is 5000 pixels: downscale it and send it again"
    )
    # At the limit exactly; the crop's resized image (91x73) is under it too.
    assert run(png(100, 80), max_pixels=8000).image_size == (100, 80)


def test_a_sliver_that_crop_would_scale_past_the_pixel_limit_is_refused_not_resized() -> None:
    # Scaling the short side to 73 makes 1x6000 a 73x438000 image before the centre crop:
    # 32 megapixels from a 6000-pixel upload (1x1000000, a 4 KB PNG within the default limit,
    # would take 21 GB).
    with pytest.raises(ImageTooLargeError) as info:
        run(png(1, 6000), name="'thin.png'", max_pixels=1_000_000)
    assert info.value.message == (
        "image 'thin.png' is 1x6000 pixels: resize=crop would scale it to 73x438000 "
        "(32.0 megapixels), over the limit of 1.0 megapixels; send it with resize=fit, or crop "
        "it closer to square"
    )
    # `fit` keeps the aspect ratio within its token cap: one row of patches.
    assert run(png(6000, 1), policy="fit", max_pixels=1_000_000).grid == (1, 128)
