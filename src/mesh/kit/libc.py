"""The C library, for the two Linux calls the kit makes through ctypes (``mallopt`` and ``prctl``)."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import sys


@functools.cache
def linux_libc() -> ctypes.CDLL | None:
    """The process's C library on Linux, or None (another system, or none found)."""
    if not sys.platform.startswith("linux"):
        return None
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        return ctypes.CDLL(name, use_errno=True)
    except OSError:
        return None
