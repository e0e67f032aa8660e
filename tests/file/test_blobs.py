"""The content-addressed blob store."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from mesh.services.file.blobs import BlobStore


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_write_fans_out_and_deduplicates(tmp_path: Path) -> None:
    """A blob lands at ab/cd/<sha>; writing the same bytes again writes nothing."""
    store = BlobStore(tmp_path / "blobs")
    data = b"hello blob"
    digest = _sha(data)
    assert store.write(digest, data) is True
    path = tmp_path / "blobs" / digest[:2] / digest[2:4] / digest
    assert path.read_bytes() == data
    mtime = path.stat().st_mtime_ns
    assert store.write(digest, data) is False
    assert path.stat().st_mtime_ns == mtime
    assert store.count() == 1
    assert store.read(digest) == data


def test_no_temporary_files_are_left_behind(tmp_path: Path) -> None:
    """The atomic write renames its temporary file into place."""
    store = BlobStore(tmp_path)
    for i in range(5):
        data = f"blob {i}".encode()
        store.write(_sha(data), data)
    leftovers = [p for p in tmp_path.rglob("*") if p.is_file() and p.name.startswith(".tmp-")]
    assert leftovers == []


def test_failed_write_leaves_nothing(tmp_path: Path) -> None:
    """A write that fails midway leaves neither the blob nor a temporary file."""
    store = BlobStore(tmp_path)
    digest = _sha(b"x")

    with pytest.raises(TypeError):
        store.write(digest, object())  # type: ignore[arg-type]
    assert not store.exists(digest)
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []


def test_remove_prunes_empty_fan_out_directories(tmp_path: Path) -> None:
    """Removing the last blob of a fan-out directory removes the directory too; a second remove is False."""
    store = BlobStore(tmp_path)
    digest = _sha(b"gone soon")
    store.write(digest, b"gone soon")
    assert store.remove(digest) is True
    assert not (tmp_path / digest[:2]).exists()
    assert store.remove(digest) is False


@pytest.mark.parametrize("bad", ["../../etc/passwd", "A" * 64, "abc", "0" * 63 + "/"])
def test_only_digests_name_blobs(tmp_path: Path, bad: str) -> None:
    """Anything but a lower-case hex SHA-256 is refused, so no path can escape the root."""
    with pytest.raises(ValueError, match="SHA-256"):
        BlobStore(tmp_path).path(bad)
