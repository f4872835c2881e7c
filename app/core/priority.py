"""CPU priority of the service's worker threads, below the event loop's.

The event loop accepts connections, reads bodies, refuses what does not fit and writes answers;
decoding and inference threads can use every core. At equal priority, under overload the loop
gets about one runnable thread's share of the CPU, so refusals queue behind the work they
should protect, and connections overflow the listen backlog. With the workers niced, the kernel
runs the loop whenever it has something to do and gives the workers the rest.

Linux keeps a nice value per thread, and a thread starts with its creator's: ONNX Runtime's
intra-op threads, made when a session is created, take the priority of the thread creating it
(and its name: app/core/threads.py).
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from typing import TypeVar

from app.core.threads import SESSIONS, name_this_thread

log = logging.getLogger(__name__)

T = TypeVar("T")


def lower_this_thread(increment: int) -> None:
    """Add `increment` to the calling thread's nice value (at most 19); 0 leaves it."""
    if increment <= 0 or not hasattr(os, "setpriority"):
        return
    tid = threading.get_native_id()
    try:
        current = os.getpriority(os.PRIO_PROCESS, tid)
        os.setpriority(os.PRIO_PROCESS, tid, min(19, current + increment))
    except OSError as exc:  # a platform or sandbox that refuses: run at equal priority
        log.warning("could not lower the priority of a worker thread: %s", exc)


def start_worker(name: str, increment: int) -> None:
    """A worker thread's initializer: its OS-level name, then its lowered priority."""
    name_this_thread(name)
    lower_this_thread(increment)


def in_lowered_thread(increment: int, make: Callable[[], T], name: str = SESSIONS) -> T:
    """`make()` in a short-lived thread of lowered priority named `name`, so that threads it
    starts (ONNX Runtime's) inherit both; run there even at `increment` 0, for the name."""
    result: list[T] = []
    error: list[BaseException] = []

    def run() -> None:
        start_worker(name, increment)
        try:
            result.append(make())
        except BaseException as exc:  # handed to the caller's thread below
            error.append(exc)

    thread = threading.Thread(target=run, name=name)
    thread.start()
    thread.join()
    if error:
        raise error[0]
    return result[0]
