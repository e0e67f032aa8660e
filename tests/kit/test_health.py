"""The shared dependency checks of mesh.kit.health."""

from __future__ import annotations

import shutil
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from mesh.kit.health import DirectoryCheck


async def test_a_directory_check_reports_free_space_as_people_read_it(tmp_path: Path) -> None:
    """The detail shown on the dashboard is in binary units (GiB, MiB), with the disk's size beside it."""
    detail = await DirectoryCheck("blob_store", tmp_path / "blobs", min_free_bytes=0).check()
    assert (tmp_path / "blobs").is_dir()
    assert " free of " in detail
    assert "bytes free" not in detail
    assert detail.split()[1] in {"TiB", "GiB", "MiB", "KiB"}


async def test_a_directory_short_of_space_fails_naming_what_it_has_and_needs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under its minimum the check fails, saying the free space and the minimum in the same units."""
    total, free = 100 * 2**30, 40 * 2**20

    def usage(_: Any) -> Any:
        return SimpleNamespace(total=total, used=total - free, free=free)

    monkeypatch.setattr(shutil, "disk_usage", usage)
    check = DirectoryCheck("blob_store", tmp_path, min_free_bytes=64 * 2**20)
    with pytest.raises(OSError, match=rf"only 40.0 MiB free in {tmp_path}; it needs at least 64.0 MiB"):
        await check.check()
