"""A front end's shared memory: where its requests' patches go in and their outputs come back.

Each front-end process makes one anonymous memory file (memfd_create) and hands its descriptor
to the engine process over their Unix socket (SCM_RIGHTS); both map it. It has no name in
/dev/shm or anywhere else, so nothing is left behind whatever dies, a SIGKILL included: the
kernel frees it with the last mapping. A request's block holds its images' patches, then room
for each image's logits (float32), probabilities (float64) and rollout map (float32); the
front end allocates it, the engine reads the patches in place (the batch's stacking is the one
copy) and writes the outputs, and the front end frees it once the engine has answered.
"""

from __future__ import annotations

import bisect
import math
import mmap
import os
from collections.abc import Sequence

import numpy as np
from numpy.typing import NDArray

PAGE = 4096


def _round_up(n: int) -> int:
    return max(PAGE, (n + PAGE - 1) // PAGE * PAGE)


class Layout:
    """Where a request's tensors lie in its block, offsets from the block's start (worked out
    once: each job's layout is read several times on both sides)."""

    __slots__ = (
        "classes",
        "encoded",
        "grids",
        "images",
        "logits_at",
        "patch_bytes",
        "patch_dim",
        "probs_at",
        "rollout",
        "rollout_at",
        "size",
    )

    def __init__(
        self,
        grids: tuple[tuple[int, int], ...],
        patch_dim: int,
        classes: int,
        rollout: bool,
        encoded: tuple[int, ...] = (),
    ) -> None:
        self.grids = grids  # (grid_h, grid_w) per image of patches
        self.patch_dim = patch_dim
        self.classes = classes
        self.rollout = rollout
        # Byte lengths of the encoded images for the device decoder, after the patches; their
        # outputs' rows follow the patches' rows.
        self.encoded = encoded
        self.images = len(grids) + len(encoded)
        self.patch_bytes = [gh * gw * patch_dim for gh, gw in grids]
        self.logits_at = _align(sum(self.patch_bytes) + sum(encoded))
        self.probs_at = self.logits_at + _align(self.images * classes * 4)
        self.rollout_at = self.probs_at + self.images * classes * 8
        maps = sum(gh * gw * 4 for gh, gw in grids) if rollout else 0
        self.size = self.rollout_at + maps


def _align(n: int) -> int:
    return (n + 63) // 64 * 64


class Arena:
    """One memory file mapped here; `alloc`/`free` are for its owner, the front end."""

    def __init__(self, fd: int, size: int, owner: bool) -> None:
        self.size = size
        self.map = mmap.mmap(fd, size)
        if not owner:
            # The mapping keeps the memory; the engine never needs the descriptor again, and
            # one kept per front end that ever connected would add up over restarts.
            os.close(fd)
            fd = -1
        self.fd = fd
        self._free: list[tuple[int, int]] = [(0, size)] if owner else []  # (offset, size)
        self.used = 0

    @classmethod
    def create(cls, size: int) -> Arena:
        fd = os.memfd_create("vit-serve-requests", os.MFD_CLOEXEC)
        os.ftruncate(fd, size)
        return cls(fd, size, owner=True)

    @classmethod
    def attach(cls, fd: int, size: int) -> Arena:
        return cls(fd, size, owner=False)

    def close(self) -> None:
        self.map.close()
        if self.fd >= 0:
            os.close(self.fd)

    # --- the owner's blocks (first fit, neighbours merged on free) -------------------------------

    def alloc(self, n: int) -> int | None:
        """A block of at least `n` bytes; None when none is free (the caller then waits or
        sends the request inline)."""
        n = _round_up(n)
        for i, (offset, size) in enumerate(self._free):
            if size >= n:
                if size == n:
                    del self._free[i]
                else:
                    self._free[i] = (offset + n, size - n)
                self.used += n
                return offset
        return None

    def free(self, offset: int, n: int) -> None:
        n = _round_up(n)
        self.used -= n
        i = bisect.bisect(self._free, (offset, n))
        self._free.insert(i, (offset, n))
        # Merge with the next block, then the previous one.
        if i + 1 < len(self._free) and offset + n == self._free[i + 1][0]:
            n += self._free[i + 1][1]
            self._free[i] = (offset, n)
            del self._free[i + 1]
        if i > 0 and self._free[i - 1][0] + self._free[i - 1][1] == offset:
            start, size = self._free[i - 1]
            self._free[i - 1] = (start, size + n)
            del self._free[i]

    # --- both sides: tensors in a block ----------------------------------------------------------

    def array(
        self, offset: int, shape: Sequence[int], dtype: type[np.generic]
    ) -> NDArray[np.generic]:
        count = math.prod(shape)
        return np.frombuffer(self.map, dtype=dtype, count=count, offset=offset).reshape(shape)

    def patches(self, block: int, layout: Layout) -> list[NDArray[np.uint8]]:
        views = []
        at = block
        for (gh, gw), n in zip(layout.grids, layout.patch_bytes, strict=True):
            views.append(self.array(at, (gh, gw, layout.patch_dim), np.uint8))
            at += n
        return views  # type: ignore[return-value]

    def encoded(self, block: int, layout: Layout) -> list[memoryview]:
        """The encoded images' bytes, each a view of the block."""
        views = []
        at = block + sum(layout.patch_bytes)
        for n in layout.encoded:
            views.append(memoryview(self.map)[at : at + n])
            at += n
        return views

    def logits(self, block: int, layout: Layout) -> NDArray[np.float32]:
        shape = (layout.images, layout.classes)
        return self.array(block + layout.logits_at, shape, np.float32)  # type: ignore[return-value]

    def probs(self, block: int, layout: Layout) -> NDArray[np.float64]:
        shape = (layout.images, layout.classes)
        return self.array(block + layout.probs_at, shape, np.float64)  # type: ignore[return-value]

    def rollouts(self, block: int, layout: Layout) -> list[NDArray[np.float32]]:
        maps = []
        at = block + layout.rollout_at
        for gh, gw in layout.grids:
            maps.append(self.array(at, (gh, gw), np.float32))
            at += gh * gw * 4
        return maps  # type: ignore[return-value]
