"""The patch grids of the `fit` resize policy: which (grid_h, grid_w) an image of a size gets.

Preprocessing resizes images to these grids, and the TensorRT profile (app/runtime/providers.py)
covers every one of them, so both read them from here.
"""

from __future__ import annotations

import math

# The aspect ratios (width / height) `fit` snaps to, so that photos of similar shapes share a
# grid and therefore a batch: square, 5:4, 4:3, 3:2, 16:9, 2:1, 5:2, 3:1, 7:2, 4:1 and their
# portrait twins, i.e. at most 19 grids per token budget; common photo shapes are kept exactly,
# others stretched by at most ~12% on one axis. Beyond 4:1, powers of two (8:1, 16:1, ...).
FIT_ASPECTS = tuple(
    sorted(
        {1.0}
        | {
            r
            for a in (5 / 4, 4 / 3, 3 / 2, 16 / 9, 2.0, 5 / 2, 3.0, 7 / 2, 4.0)
            for r in (a, 1 / a)
        }
    )
)


def snap_aspect(aspect: float) -> float:
    """The nearest of `FIT_ASPECTS` in log scale; beyond them, the nearest power of two."""
    if not 1 / 4 <= aspect <= 4:
        return float(2.0 ** round(math.log2(aspect)))
    return min(FIT_ASPECTS, key=lambda a: abs(math.log(aspect / a)))


def fit_grid(width: int, height: int, native_tokens: int, max_tokens: int) -> tuple[int, int]:
    """(grid_h, grid_w) with about `native_tokens` patches in the image's snapped aspect ratio.

    At least one patch per side and never more than `max_tokens` patches in all.
    """
    aspect = snap_aspect(width / height)
    gh = max(1, math.floor(math.sqrt(native_tokens / aspect) + 0.5))
    gw = max(1, math.floor(math.sqrt(native_tokens * aspect) + 0.5))
    if gh * gw > max_tokens:
        shrink = math.sqrt(max_tokens / (gh * gw))
        gh, gw = max(1, math.floor(gh * shrink)), max(1, math.floor(gw * shrink))
        # Extreme aspect ratios pin one side at 1 patch; the other then takes the whole budget.
        gw = min(gw, max(1, max_tokens // gh))
        gh = min(gh, max(1, max_tokens // gw))
    return gh, gw
