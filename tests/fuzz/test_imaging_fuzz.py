"""Property tests of decode + resize + patchify (`app.pipeline.preprocess.prepare`) on hostile
input.

Whatever bytes arrive, `prepare` returns patches in the layout the graph takes, or raises one of
imaging's typed errors (the API answers those 400 and 413); any other exception would be a 500.
"""

from __future__ import annotations

import contextlib
from unittest import mock

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image, ImageFile

from app.models.grids import fit_grid
from app.models.spec import ModelSpec, Preprocess
from app.pipeline.preprocess import (
    ImageDecodeError,
    ImageTooLargeError,
    PreparedImage,
    ResizePolicy,
    prepare,
    resize_plan,
)
from tests.fuzz import tally
from tests.fuzz.encoded import MAX_SIDE, MODE_FORMATS, claiming, encoded_images
from tests.support import make_spec

SPECS = (
    make_spec(),  # the tiny model's: patch 8, grid 8x8, shorter side, crop 0.875, bicubic
    make_spec(Preprocess(resize_mode="squash", crop_pct=0.8, interpolation="bilinear")),
    make_spec(Preprocess(crop_pct=1.0, interpolation="lanczos"), grid=(6, 8), patch_size=16),
    make_spec(Preprocess(interpolation="nearest"), grid=(3, 5), patch_size=4),
)
POLICIES: tuple[ResizePolicy, ...] = ("crop", "fit")
# Hostile headers may claim any size up to the limit and a decode then allocates it: a small
# limit keeps every example fast, and the properties hold for any limit.
FUZZ_MAX_PIXELS = 1_000_000
# Signatures of the supported formats (and near misses), so random tails reach each plugin's
# header parser instead of stopping at "unidentified".
MAGICS = (
    b"",
    b"\x89PNG\r\n\x1a\n",
    b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR",
    b"\xff\xd8\xff",
    b"\xff\xd8\xff\xe1",  # EXIF segment next
    b"GIF87a",
    b"GIF89a",
    b"BM",
    b"II*\x00",
    b"MM\x00*",
    b"II+\x00",  # BigTIFF
    b"RIFF\x00\x00\x00\x00WEBPVP8 ",
    b"RIFF\x00\x00\x00\x00WEBPVP8L",
    b"RIFF\x00\x00\x00\x00WEBPVP8X",
)

specs = st.sampled_from(SPECS)
policies = st.sampled_from(POLICIES)


def run(
    data: bytes, spec: ModelSpec, policy: ResizePolicy, fit_max_tokens: int, max_pixels: int
) -> PreparedImage:
    return prepare(
        data,
        spec,
        policy,
        name="'fuzz'",
        max_pixels=max_pixels,
        fit_max_tokens=fit_max_tokens,
    )


def fit_caps(spec: ModelSpec) -> st.SearchStrategy[int]:
    native = spec.architecture.native_tokens
    return st.integers(1, 3 * native)


def assert_patch_layout(prepared: PreparedImage, spec: ModelSpec, policy: ResizePolicy) -> None:
    """The patches are what the graph's `patches` input takes, on the grid `grid` states."""
    P = spec.architecture.patch_size
    gh, gw = prepared.grid
    assert prepared.patches.dtype == np.uint8
    assert prepared.patches.shape == (gh, gw, P * P * 3)
    assert prepared.patches.flags.c_contiguous
    assert gh >= 1 and gw >= 1
    if policy == "crop":
        assert prepared.grid == spec.architecture.grid


def prepare_or_typed_error(
    prop: str,
    data: bytes,
    spec: ModelSpec,
    policy: ResizePolicy,
    fit_max_tokens: int,
) -> PreparedImage | None:
    """`prepare`, where imaging's typed errors are an answer; anything else fails the test."""
    try:
        prepared = run(data, spec, policy, fit_max_tokens, FUZZ_MAX_PIXELS)
    except (ImageDecodeError, ImageTooLargeError) as exc:
        # The message a person gets names the image (the API returns it as the detail).
        expected = (
            "could not decode image 'fuzz'" if type(exc) is ImageDecodeError else "image 'fuzz'"
        )
        assert exc.message.startswith(expected)
        tally.record(prop, type(exc).__name__)
        return None
    tally.record(prop, "prepared")
    assert_patch_layout(prepared, spec, policy)
    if policy == "fit":
        assert prepared.grid[0] * prepared.grid[1] <= fit_max_tokens
    return prepared


# --- (a) arbitrary bytes ------------------------------------------------------------------------


@given(
    magic=st.sampled_from(MAGICS),
    tail=st.binary(max_size=2048),
    spec=specs,
    policy=policies,
    data=st.data(),
)
def test_arbitrary_bytes_give_patches_or_a_typed_error(
    magic: bytes, tail: bytes, spec: ModelSpec, policy: ResizePolicy, data: st.DataObject
) -> None:
    fit_max_tokens = data.draw(fit_caps(spec))
    prepare_or_typed_error("arbitrary_bytes", magic + tail, spec, policy, fit_max_tokens)


# --- (b) valid images of every mode, format, size and orientation --------------------------------


# Every pairing is its own decoder path: each gets a share of the budget (Hypothesis, drawing
# the pairing itself, would leave some out in CI's 200 examples).
@pytest.mark.parametrize("mode_format", MODE_FORMATS, ids=" ".join)
@settings(max_examples=max(5, settings().max_examples // 10))
@given(spec=specs, policy=policies, data=st.data())
def test_every_mode_format_size_and_orientation_gives_the_promised_grid(
    mode_format: tuple[str, str], spec: ModelSpec, policy: ResizePolicy, data: st.DataObject
) -> None:
    image = data.draw(encoded_images(mode_format=mode_format))
    fit_max_tokens = data.draw(fit_caps(spec))
    # The size is the one a person sees: after the EXIF orientation.
    width, height = image.displayed_size
    plan = resize_plan(width, height, spec, policy, fit_max_tokens)
    tally.record("valid_images", f"{image.fmt} {image.mode}")
    if plan.size[0] * plan.size[1] > FUZZ_MAX_PIXELS:
        # A sliver that `crop` would scale past the limit before cropping: refused, not resized.
        with pytest.raises(ImageTooLargeError, match=f"would scale it to {plan.size[0]}x"):
            run(image.data, spec, policy, fit_max_tokens, FUZZ_MAX_PIXELS)
        return
    prepared = run(image.data, spec, policy, fit_max_tokens, FUZZ_MAX_PIXELS)
    assert_patch_layout(prepared, spec, policy)
    assert prepared.image_size == (width, height)
    if policy == "fit":
        native = spec.architecture.native_tokens
        assert prepared.grid == fit_grid(width, height, native, fit_max_tokens)
        assert prepared.grid[0] * prepared.grid[1] <= fit_max_tokens


# --- (c) valid images, mutated ------------------------------------------------------------------


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    """A valid file with bit flips, truncations, insertions, deletions and overwrites."""
    buf = bytearray(draw(encoded_images(largest=64)).data)
    for _ in range(draw(st.integers(1, 6))):
        at = draw(st.integers(0, max(0, len(buf) - 1)))
        kind = draw(st.sampled_from(("flip", "truncate", "insert", "delete", "overwrite")))
        if kind == "flip" and buf:
            buf[at] ^= 1 << draw(st.integers(0, 7))
        elif kind == "truncate":
            del buf[at:]
        elif kind == "insert":
            buf[at:at] = draw(st.binary(min_size=1, max_size=64))
        elif kind == "delete":
            del buf[at : at + draw(st.integers(1, 64))]
        elif kind == "overwrite":
            patch = draw(st.binary(min_size=1, max_size=8))
            buf[at : at + len(patch)] = patch
    return bytes(buf)


@given(data_bytes=mutated(), spec=specs, policy=policies, data=st.data())
def test_mutated_images_give_patches_or_a_typed_error(
    data_bytes: bytes, spec: ModelSpec, policy: ResizePolicy, data: st.DataObject
) -> None:
    fit_max_tokens = data.draw(fit_caps(spec))
    prepare_or_typed_error("mutated_images", data_bytes, spec, policy, fit_max_tokens)


# --- (d) headers claiming more pixels than the limit ---------------------------------------------


@st.composite
def over_the_limit(draw: st.DrawFn) -> tuple[str, int, int, int]:
    """(format, width, height, limit) with width * height over the limit."""
    fmt = draw(st.sampled_from(sorted(MAX_SIDE)))
    side = MAX_SIDE[fmt]
    limit = draw(st.integers(1, 40_000_000))
    width = draw(st.integers(limit // side + 1, side))
    height = draw(st.integers(limit // width + 1, side))
    return fmt, width, height, limit


def _megapixels(count: int) -> str:
    return f"{count / 1e6:.1f} megapixels" if count >= 1_000_000 else f"{count} pixels"


@given(claim=over_the_limit(), garbage=st.binary(min_size=1, max_size=256), spec=specs)
def test_a_header_claiming_too_many_pixels_is_refused_before_decoding(
    claim: tuple[str, int, int, int], garbage: bytes, spec: ModelSpec
) -> None:
    fmt, width, height, limit = claim
    data = claiming(fmt, width, height, garbage)
    # Only the header was read: no pixel buffer was allocated, no decoder made, nothing loaded
    # (each is counted, and fails the decode if it is reached, whatever catches the error).
    reached = {
        "ImageFile.load": (ImageFile.ImageFile, "load"),
        "ImageFile.load_prepare": (ImageFile.ImageFile, "load_prepare"),
        "Image.load": (Image.Image, "load"),
        "Image._getdecoder": (Image, "_getdecoder"),
    }
    calls = {
        name: mock.Mock(side_effect=AssertionError(f"{name}: decoding pixels of a refused image"))
        for name in reached
    }
    with contextlib.ExitStack() as patches:
        for name, (owner, attribute) in reached.items():
            patches.enter_context(mock.patch.object(owner, attribute, calls[name]))
        with pytest.raises(ImageTooLargeError) as info:
            run(data, spec, "crop", spec.architecture.native_tokens, limit)
    tally.record("pixel_limit", fmt)
    assert {name: call.call_count for name, call in calls.items()} == dict.fromkeys(reached, 0)
    expected = f"has {_megapixels(width * height)}; the limit is {_megapixels(limit)}"
    assert expected in info.value.message
