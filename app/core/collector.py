"""The cyclic garbage collector, tuned for a server whose requests make almost no cycles.

Measured on the demo model at c=64 (docs/performance.md, "No wasted CPU", and "Figures behind
the code"): with Python's defaults the collector took a share of the event loop's CPU. A full
collection walked the objects that imports and the app's construction leave behind (modules,
classes, FastAPI's and pydantic's schemas), all alive until exit; and each young collection,
due every 700 net new container objects, walked the objects of the requests in flight. Cycles
are rare.

So, once per process, as the service starts and before it loads any model:
- what is alive is collected once and then frozen (`gc.freeze`): moved to a generation the
  collector never walks again. Reference counting still frees these objects; only a cycle
  among them would never be collected, and they are the process's own code and app. Model
  sessions are made after, so a reload's old versions stay collectable;
- the young generation is collected every `YOUNG_THRESHOLD` net new objects instead of 700:
  most of a request's objects are gone by then, so fewer are walked and promoted.
"""

from __future__ import annotations

import gc
import logging

log = logging.getLogger(__name__)

YOUNG_THRESHOLD = 10_000
_done = False


def tune_once() -> None:
    """Collect and freeze what is alive now, and raise the young generation's threshold; only
    the first call in a process does anything (tests make many apps in one process)."""
    global _done
    if _done:
        return
    _done = True
    gc.collect()
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(YOUNG_THRESHOLD, older, oldest)
    log.debug("garbage collector: %d objects frozen", gc.get_freeze_count())
