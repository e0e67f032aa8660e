"""A pinned (page-locked) host buffer for uploads to the GPU, grown to the largest size asked for.

A copy from pageable memory goes through the driver's own staging at a fraction of the DMA rate; a buffer
pinned once and reused keeps that cost out of every upload. CuPy is passed in, so importing this module
never needs it.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

import numpy as np
import numpy.typing as npt

MIN_BYTES = 1 << 20
# Pinned memory is taken from the host for good; an image larger than this goes through pageable memory
# (slower, but a rare 400 MB input does not pin 400 MB for the life of the process).
MAX_BYTES = 64 << 20


class PinnedBuffer:
    """One pinned allocation, replaced by a larger one when a request outgrows it."""

    def __init__(self, cupy: ModuleType) -> None:
        self._cupy = cupy
        self._memory: Any = None
        self._size = 0

    def array(self, nbytes: int) -> npt.NDArray[np.uint8] | None:
        """The buffer's first ``nbytes`` bytes, writable, the caller's until the next call; None above
        MAX_BYTES (copy from pageable memory then)."""
        if nbytes > MAX_BYTES:
            return None
        if self._memory is None or self._size < nbytes:
            self._size = max(nbytes, MIN_BYTES)
            self._memory = self._cupy.cuda.alloc_pinned_memory(self._size)
        return np.frombuffer(self._memory, dtype=np.uint8, count=nbytes)
