"""mesh.kit.units: sizes in messages and on the dashboard."""

from __future__ import annotations

import pytest

from mesh.kit.units import binary_size


@pytest.mark.parametrize(
    ("count", "shown"),
    [
        (0, "0 bytes"),
        (1023, "1023 bytes"),
        (1024, "1.0 KiB"),
        (26 * 2**20, "26.0 MiB"),
        (83_501_068_288, "77.8 GiB"),
        (3 * 2**40, "3.0 TiB"),
    ],
)
def test_a_byte_count_reads_in_binary_units(count: int, shown: str) -> None:
    """Bytes below a KiB, then the largest binary unit the count reaches, with one decimal."""
    assert binary_size(count) == shown
