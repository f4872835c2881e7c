"""The `fit` policy snaps aspect ratios to a few, so that grids (and batches) are shared."""

from __future__ import annotations

import math

import pytest

from app.models.grids import FIT_ASPECTS, fit_grid, snap_aspect


def test_every_photo_shape_lands_on_one_of_a_few_grids_per_token_budget() -> None:
    grids = {
        fit_grid(width, height, 196, 392)
        for width in range(100, 4001, 37)
        for height in range(100, 4001, 41)
        if 1 / 4 <= width / height <= 4
    }
    assert len(grids) <= len(FIT_ASPECTS) == 19


@pytest.mark.parametrize(
    ("size", "snapped"),
    [
        ((500, 375), 4 / 3),
        ((500, 333), 3 / 2),
        ((375, 500), 3 / 4),
        ((1920, 1080), 16 / 9),
        ((640, 640), 1.0),
        ((1000, 10), 128.0),  # beyond 4:1, powers of two
    ],
)
def test_common_photo_sizes_snap_to_their_own_ratio(size: tuple[int, int], snapped: float) -> None:
    assert snap_aspect(size[0] / size[1]) == pytest.approx(snapped)


def test_snapping_stretches_an_image_by_little() -> None:
    for aspect in (x / 100 for x in range(25, 401)):
        assert abs(math.log(snap_aspect(aspect) / aspect)) <= math.log(1.12)
