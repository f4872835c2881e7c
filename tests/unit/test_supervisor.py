"""The supervisor's choices that need no process: how many front ends, and its engine address."""

from __future__ import annotations

import pytest

from app.engine.wire import socket_address
from app.supervisor import default_workers, engine_address


@pytest.mark.parametrize(
    ("gpu", "cores", "workers"),
    [(False, 2, 1), (False, 64, 1), (True, 2, 2), (True, 4, 2), (True, 16, 14)],
)
def test_front_ends_by_default(gpu: bool, cores: int, workers: int) -> None:
    assert default_workers(gpu, cores) == workers


def test_the_engine_address_is_abstract() -> None:
    # Nothing on the filesystem: Linux's abstract namespace, written "@..." on command lines.
    address = engine_address(1234)
    assert address == "@vit-serve-engine-1234"
    assert socket_address(address) == "\0vit-serve-engine-1234"
    assert socket_address("/run/engine.sock") == "/run/engine.sock"
