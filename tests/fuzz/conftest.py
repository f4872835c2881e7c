"""Hypothesis profiles for the fuzz tests, and the tally file for `python -m bench.fuzz`.

`ci` (the default) is bounded and derandomised, so CI runs the same examples every time and
stays within about a minute; `HYPOTHESIS_PROFILE=long` runs ten times as many, from a fresh
seed each run, to look further.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

from tests.fuzz import tally


def _register(name: str, max_examples: int, derandomize: bool) -> None:
    settings.register_profile(
        name,
        max_examples=max_examples,
        derandomize=derandomize,
        # The examples are whole decodes and HTTP requests, slow by Hypothesis' standards; time
        # is not what these tests check, and a deadline would be flaky on a shared CI machine.
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        # No example database in the work tree; a failure prints the blob that replays it.
        database=None,
        print_blob=True,
    )


_register("ci", max_examples=200, derandomize=True)
_register("long", max_examples=2000, derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(scope="session", autouse=True)
def _write_tally() -> Iterator[None]:
    yield
    target = os.environ.get(tally.TALLY_ENV)
    if target:
        tally.write(Path(target))
