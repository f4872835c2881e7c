"""Rollout maps: normalising, placing and drawing them; the rollout session's contract.
(Its maps against PyTorch's: tests/export/test_parity.py.)"""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
from PIL import Image

from app.core.colormap import COLORMAP
from app.models.repository import scan_repository
from app.models.spec import Preprocess
from app.pipeline.preprocess import crop_plan, resize_plan
from app.pipeline.rollout import (
    heatmap_png,
    normalise,
    overlay,
    seen_box,
)
from app.runtime.backends import CPU, OnnxRolloutBackend, RuntimeLoadError
from tests.images import encode, noise
from tests.support import TinyRepo, make_spec


def test_normalise_scales_the_largest_value_to_one() -> None:
    raw = np.array([[0.01, 0.04], [0.02, 0.0]], dtype=np.float32)
    got = normalise(raw)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, [[0.25, 1.0], [0.5, 0.0]], rtol=1e-6)


def test_an_all_zero_map_stays_zero_instead_of_dividing_by_zero() -> None:
    got = normalise(np.zeros((3, 4), dtype=np.float32))
    assert got.shape == (3, 4)
    assert not got.any()


def test_the_colormap_runs_from_dark_to_bright() -> None:
    assert COLORMAP.shape == (256, 3)
    assert COLORMAP.dtype == np.uint8
    luminance = COLORMAP.astype(np.float64) @ [0.299, 0.587, 0.114]
    assert luminance[0] < 5 and luminance[-1] > 230
    assert np.all(np.diff(luminance) > -1.0)  # never darker as the heat rises


def test_the_crop_box_maps_back_onto_the_original_image() -> None:
    spec = make_spec()  # 64x64 input, crop_pct 0.875: shorter side to 73, centre crop 64
    plan = crop_plan(150, 90, spec)
    assert plan.size == (121, 73)
    assert plan.box == (28, 4, 92, 68)
    # x: 28 * 150/121 = 34.7 .. 92 * 150/121 = 114.0; y: 4 * 90/73 = 4.9 .. 68 * 90/73 = 83.8
    assert seen_box((150, 90), plan) == (35, 5, 114, 84)


def test_without_a_crop_the_grid_covers_the_whole_image() -> None:
    fit = resize_plan(150, 90, make_spec(), "fit", fit_max_tokens=128)
    squash = crop_plan(150, 90, make_spec(Preprocess(resize_mode="squash")))
    for plan in (fit, squash):
        assert plan.box is None
        assert seen_box((150, 90), plan) == (0, 0, 150, 90)


def test_the_overlay_colours_only_the_box_and_follows_the_heat() -> None:
    image = Image.new("RGB", (40, 30), (128, 128, 128))
    heat = np.zeros((2, 2), dtype=np.float32)
    heat[0, 1] = 1.0  # the top-right patch is the hottest
    out = np.asarray(overlay(image, heat, (10, 5, 30, 25)))
    original = np.asarray(image)
    inside = np.zeros((30, 40), dtype=bool)
    inside[5:25, 10:30] = True
    assert out.shape == (30, 40, 3)
    assert np.array_equal(out[~inside], original[~inside])  # no heat outside what was seen
    hot, cold = out[5, 29].astype(int), out[24, 10].astype(int)
    assert hot.sum() > cold.sum()
    expected_hot = (original[5, 29] * 0.5 + COLORMAP[255] * 0.5).astype(int)
    np.testing.assert_allclose(hot, expected_hot, atol=2)


def test_the_heatmap_png_is_the_oriented_image_size() -> None:
    spec = make_spec()
    data = encode(noise(150, 90), "PNG")
    plan = crop_plan(150, 90, spec)
    heat = normalise(np.arange(64, dtype=np.float32).reshape(8, 8))
    png = Image.open(io.BytesIO(base64.b64decode(heatmap_png(data, "x", 10**6, heat, plan))))
    assert (png.format, png.mode, png.size) == ("PNG", "RGB", (150, 90))


def test_a_spec_without_a_rollout_contract_cannot_load_a_rollout_backend(
    tiny_repo: TinyRepo,
) -> None:
    version = scan_repository(tiny_repo.root).resolve(None, None)
    assert version.rollout_path is not None
    spec = version.spec.model_copy(update={"rollout": None})
    with pytest.raises(RuntimeLoadError, match="has no rollout contract"):
        OnnxRolloutBackend(version.rollout_path, spec, [CPU])
