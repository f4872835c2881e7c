"""app/core/threads.py: OS-level thread names, and the threads that inherit them."""

from __future__ import annotations

import sys
import threading
from pathlib import Path

import pytest

from app.core.priority import in_lowered_thread
from app.core.threads import name_this_thread

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")


def comm(tid: int) -> str:
    return Path(f"/proc/self/task/{tid}/comm").read_text().strip()


def named_in(name: str) -> str:
    """The OS-level name a new thread shows after naming itself `name`."""
    seen: list[str] = []

    def run() -> None:
        name_this_thread(name)
        seen.append(comm(threading.get_native_id()))

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    return seen[0]


@linux_only
def test_a_named_thread_shows_its_name_in_proc() -> None:
    assert named_in("vit-preprocess") == "vit-preprocess"


@linux_only
def test_a_long_name_is_cut_to_the_kernels_15_bytes() -> None:
    assert named_in("vit-infer-0123456789") == "vit-infer-01234"


@linux_only
def test_threads_started_by_the_session_maker_inherit_its_name() -> None:
    # As ONNX Runtime's intra-op threads do when a session is made in `in_lowered_thread`.
    seen: list[str] = []

    def make() -> None:
        child = threading.Thread(target=lambda: seen.append(comm(threading.get_native_id())))
        child.start()
        child.join()

    in_lowered_thread(0, make, name="vit-ort-session")
    assert seen == ["vit-ort-session"]


def test_naming_never_raises() -> None:
    name_this_thread("")  # the kernel takes an empty name; elsewhere a no-op
    name_this_thread("é" * 40)
