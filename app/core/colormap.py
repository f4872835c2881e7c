"""The colour table of every heatmap the service draws (rollout maps, Fig. 7's panels)."""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray


def _inferno_lut() -> NDArray[np.uint8]:
    """(256, 3) uint8: linear interpolation between nine stops of matplotlib's inferno."""
    stops = np.array(
        [
            (0, 0, 4),
            (31, 12, 72),
            (85, 15, 109),
            (136, 34, 106),
            (186, 54, 85),
            (227, 89, 51),
            (249, 140, 10),
            (249, 201, 50),
            (252, 255, 164),
        ],
        dtype=np.float64,
    )
    at = np.linspace(0.0, 1.0, len(stops))
    x = np.linspace(0.0, 1.0, 256)
    channels = [np.interp(x, at, stops[:, c]) for c in range(3)]
    return np.rint(np.stack(channels, axis=1)).astype(np.uint8)


COLORMAP = _inferno_lut()
