"""app/core/collector.py: the collector tuned once per process, as the service starts."""

from __future__ import annotations

import gc

from app.core import collector


def test_tuned_once_frozen_and_young_threshold_raised() -> None:
    collector.tune_once()
    frozen = gc.get_freeze_count()
    assert frozen > 0
    assert gc.get_threshold()[0] == collector.YOUNG_THRESHOLD
    collector.tune_once()  # a second app in the same process changes nothing
    assert gc.get_freeze_count() == frozen
