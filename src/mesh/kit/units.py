"""Quantities as people read them in messages and on the dashboard."""

from __future__ import annotations


def binary_size(count: int) -> str:
    """A byte count in binary units with one decimal: ``77.8 GiB``, ``26.0 MiB``, ``512 bytes``."""
    for unit, scale in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if count >= scale:
            return f"{count / scale:.1f} {unit}"
    return f"{count} bytes"
