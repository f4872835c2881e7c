"""OS-level names for the service's threads.

Python's thread names live only inside the interpreter: `top -H`, `ps -L`, py-spy's native view
and /proc/<pid>/task/<tid>/comm show every thread of the process as "python". Naming them in the
kernel says where the CPU goes without a profiler: the event loop (the main thread), decoding
("vit-preprocess"), inference ("vit-infer-<lane>") and ONNX Runtime's own intra-op threads. Those
are started by the runtime when a session is made, and on Linux a new thread starts with its
creator's name, so sessions are made in a thread named "vit-ort-session" (app/core/priority.py:
`in_lowered_thread`) and every runtime thread carries that name. bench/harness.py reads these
names to split a server's CPU per image by thread group.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
import sys
from collections.abc import Callable

log = logging.getLogger(__name__)

# The kernel keeps 16 bytes, the terminating NUL included: longer names are cut to 15.
MAX_NAME_BYTES = 15
PREPROCESS = "vit-preprocess"
INFERENCE = "vit-infer"  # + "-<lane>"
SESSIONS = "vit-ort-session"  # and, by inheritance, ONNX Runtime's threads
_PR_SET_NAME = 15  # <linux/prctl.h>


@functools.cache
def _prctl() -> Callable[..., int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        prctl: Callable[..., int] = libc.prctl
        return prctl
    except (OSError, AttributeError):
        return None


def name_this_thread(name: str) -> None:
    """Name the calling thread in the kernel (at most 15 bytes are kept); a no-op off Linux or
    where it is refused. The Python-level name (`threading.current_thread().name`) is left."""
    prctl = _prctl()
    if prctl is None:
        return
    encoded = name.encode("ascii", "replace")[:MAX_NAME_BYTES]
    if prctl(_PR_SET_NAME, ctypes.c_char_p(encoded), 0, 0, 0) != 0:
        log.debug("could not name a thread %r: errno %d", name, ctypes.get_errno())
