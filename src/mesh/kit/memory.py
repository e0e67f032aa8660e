"""Allocator tuning for a process that moves frames of many megabytes, and a bound on what glibc keeps of it.

glibc serves large allocations with fresh ``mmap`` pages and returns them on free, so every 8 MB frame
buffer (request bytes, pixels, serialised reply) pays thousands of page faults. Raising the mmap and trim
thresholds keeps such buffers in the heap for reuse; measured here, serialising an 8 MB reply drops from
about 7 ms to about 2.5 ms.

The heap that keeps them has a price, which :func:`limit_arenas` and :func:`return_free_memory_soon` bound.
glibc gives each thread that allocates at once with another a malloc arena of its own, up to 8 per core, and
an arena keeps what its threads freed: the pages of its 64 MiB heaps are never given back while the trim
threshold is above a heap's size, and a freed image in one arena cannot serve a decode in another. Images
decoded in the default thread pool (six threads on 2 cores, 32 on a large node) thus left each thread's own
peak of decoder buffers in the process. Measured on the inference service (2 cores, 256 MiB budget of decoded
images; rounds of 18 concurrent PNGs of 3000x3000 to 7000x5000, the review's ``probe_memory_mix.py``; peak:
VmHWM; kept: VmRSS 20 s after the last round):

=====================================  ==============  ==============  ===============
                                       6 rounds        18 rounds       60 rounds
=====================================  ==============  ==============  ===============
glibc's defaults (16 arenas here)      2.1 / 1.7 GB    2.5 / 2.0 GB    2.5 / 1.8 GB
two arenas only (MALLOC_ARENA_MAX=2)   1.9 / 1.0 GB    2.0 / 1.5 GB
two arenas, free memory given back     1.9 / 0.35 GB   2.1 / 0.19 GB   2.1 / 0.40 GB
=====================================  ==============  ==============  ===============

(peak / kept). Under glibc's defaults 30-odd arena heaps held 1.6 GB of the 1.8 GB kept, and a reviewer saw
3.2 GB peak and 2.6-2.9 GB kept after about 1500 requests; with the fix the peak is reached in the first rounds
and no longer grows. Two arenas alone still keep what was freed inside their heaps (glibc gives back only a
heap's free top, and only above the trim threshold), hence the trim once a memory budget has emptied and stayed
empty for a while (:mod:`mesh.kit.memory_budget`). The image processing service, same
images to JPEG: 1.5-1.6 GB peak and 0.47 GB kept before, 1.5 GB and 0.19 GB after.
"""

from __future__ import annotations

import ctypes
import os
import threading
from collections.abc import Callable

from mesh.kit.libc import linux_libc

# mallopt parameters, from glibc's <malloc.h>.
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
M_ARENA_MAX = -8

MALLOC_ARENAS = 2
"""Arenas a process may have: the main one, which the event loop's thread uses, and one that the other threads
(decoders, gRPC's) share; they spend their time in decoders rather than in malloc, so sharing costs little
(the probe's rounds took as long)."""

_returning = threading.Lock()
"""Held while a thread gives free memory back, so that one more is not started meanwhile."""


def _mallopt() -> Callable[[int, int], int] | None:
    """glibc's ``mallopt``, or None where there is none (another system, musl)."""
    mallopt = getattr(linux_libc(), "mallopt", None)
    if mallopt is None:
        return None
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return mallopt  # type: ignore[no-any-return]


def tune_allocator(mmap_threshold: int = 256 * 1024 * 1024, trim_threshold: int = 512 * 1024 * 1024) -> bool:
    """Keep large buffers in the glibc heap; returns False where that is not possible (non-glibc)."""
    mallopt = _mallopt()
    if mallopt is None:
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, mmap_threshold)) and bool(mallopt(M_TRIM_THRESHOLD, trim_threshold))


def limit_arenas(arenas: int = MALLOC_ARENAS) -> bool:
    """At most ``arenas`` glibc malloc arenas in this process and in the processes it spawns; call it before the
    process starts threads (arenas made already stay). False where it is not applied: not glibc, or the
    environment chose a number already (``MALLOC_ARENA_MAX``, or ``glibc.malloc.arena_max`` in
    ``GLIBC_TUNABLES``), which then stands, here and in the children alike.

    The limit also goes into the environment: ``mallopt`` does not outlive the program, and the inference
    service's workers are spawned (a new interpreter), each with OpenCV's threads allocating beside its own."""
    if "MALLOC_ARENA_MAX" in os.environ or "glibc.malloc.arena_max" in os.environ.get("GLIBC_TUNABLES", ""):
        return False
    mallopt = _mallopt()
    if mallopt is None or not mallopt(M_ARENA_MAX, arenas):
        return False
    os.environ["MALLOC_ARENA_MAX"] = str(arenas)
    return True


def return_free_memory() -> bool:
    """Give the free pages of every arena back to the system (glibc's ``malloc_trim(0)``), wherever they lie
    in its heaps; False where there is no such call. It holds each arena's lock while it trims that arena: about
    150-200 ms for the main one after a burst of large images (1 GiB freed), during which every allocation from
    that arena waits, the event loop's included. Call it only when the process is idle."""
    trim = getattr(linux_libc(), "malloc_trim", None)
    if trim is None:
        return False
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    trim(0)
    return True


def return_free_memory_soon() -> None:
    """:func:`return_free_memory` in a thread of its own, unless one is at it already. The thread spares the
    caller the call itself, not the stall: allocations on the event loop still wait for the arena locks the trim
    holds, so call it only when idle (as :class:`mesh.kit.memory_budget.MemoryBudget` does)."""
    if not _returning.acquire(blocking=False):
        return
    try:
        threading.Thread(target=_return_then_unlock, name="return-free-memory", daemon=True).start()
    except BaseException:
        _returning.release()
        raise


def _return_then_unlock() -> None:
    try:
        return_free_memory()
    finally:
        _returning.release()
