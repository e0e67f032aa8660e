"""The content-addressed blob store."""

from __future__ import annotations

import errno
import hashlib
import os
import tempfile
from pathlib import Path

import pytest

from mesh.kit.errors import StartupError
from mesh.services.file.blobs import MARKER, BlobStore


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_write_fans_out_and_deduplicates(tmp_path: Path) -> None:
    """A blob lands at ab/cd/<sha>; writing the same bytes again writes nothing."""
    store = BlobStore.opened(tmp_path / "blobs")
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
    store = BlobStore.opened(tmp_path)
    for i in range(5):
        data = f"blob {i}".encode()
        store.write(_sha(data), data)
    leftovers = [p for p in tmp_path.rglob("*") if p.is_file() and p.name.startswith(".tmp-")]
    assert leftovers == []


def test_failed_write_leaves_nothing(tmp_path: Path) -> None:
    """A write that fails midway leaves neither the blob nor a temporary file."""
    store = BlobStore.opened(tmp_path)
    digest = _sha(b"x")

    with pytest.raises(TypeError):
        store.write(digest, object())  # type: ignore[arg-type]
    assert not store.exists(digest)
    assert [p.name for p in tmp_path.rglob("*") if p.is_file()] == [MARKER]


def test_remove_prunes_empty_fan_out_directories(tmp_path: Path) -> None:
    """Removing the last blob of a fan-out directory removes the directory too; a second remove is False."""
    store = BlobStore.opened(tmp_path)
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


def test_opening_the_root_creates_it_with_its_marker(tmp_path: Path) -> None:
    """At start-up the store creates its root and writes the marker the health check looks for."""
    store = BlobStore(tmp_path / "volume" / "blobs")
    store.open_root()
    assert (tmp_path / "volume" / "blobs" / MARKER).is_file()


def test_opening_an_unmarked_store_adopts_it_and_keeps_its_blobs(tmp_path: Path) -> None:
    """A store written before the marker existed gets one at the next start, its blobs untouched; opening a
    marked store again leaves the marker as it is."""
    store = BlobStore(tmp_path)
    digest = _sha(b"old blob")
    store.path(digest).parent.mkdir(parents=True)
    store.path(digest).write_bytes(b"old blob")
    store.open_root()
    marker = tmp_path / MARKER
    assert marker.is_file()
    assert store.read(digest) == b"old blob"
    marker.write_text("kept")
    store.open_root()
    assert marker.read_text() == "kept"


def test_the_marker_is_never_taken_for_a_blob(tmp_path: Path) -> None:
    """Listing blobs (what the orphan sweep removes from), counting them and removing stale temporaries all
    leave the marker alone."""
    store = BlobStore(tmp_path)
    store.open_root()
    digest = _sha(b"a blob")
    store.write(digest, b"a blob")
    assert store.digests() == [digest]
    assert store.count() == 1
    assert store.remove_stale_temporaries(older_than_seconds=-1) == 0
    assert store.remove(digest) is True
    assert [p.name for p in tmp_path.iterdir()] == [MARKER]


def test_a_store_without_its_marker_refuses_to_write(tmp_path: Path) -> None:
    """With the marker gone (the volume unmounted under a running service, its bare mount point left), a new blob
    is refused and nothing is written: it would have landed on the wrong filesystem and vanished from view when
    the volume came back, leaving its image's row without bytes."""
    store = BlobStore.opened(tmp_path)
    (tmp_path / MARKER).unlink()
    with pytest.raises(FileNotFoundError, match="volume may not be mounted"):
        store.write(_sha(b"lost"), b"lost")
    assert list(tmp_path.iterdir()) == []


def _refuse_writes(monkeypatch: pytest.MonkeyPatch) -> None:
    """Creating a file fails as in a directory owned by another uid."""

    def refused(*args: object, dir: str | None = None, **kwargs: object) -> tuple[int, str]:
        raise PermissionError(errno.EACCES, "Permission denied", os.path.join(dir or "", ".write-probe-x"))

    monkeypatch.setattr(tempfile, "mkstemp", refused)


@pytest.mark.parametrize("marked", [False, True], ids=["new store", "marker already there"])
def test_a_root_it_may_not_write_to_is_a_startup_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, marked: bool
) -> None:
    """A blob directory the process may not write to (an RWX volume that fsGroup did not reach) stops the start
    with a StartupError naming the directory, the process's uid and gid, the OS error and the fix, also when
    the marker is there already (written by another uid); it was a bare PermissionError traceback, or nothing
    until the first upload."""
    if marked:
        BlobStore.opened(tmp_path)
    _refuse_writes(monkeypatch)
    with pytest.raises(StartupError) as stopped:
        BlobStore(tmp_path).open_root()
    message = str(stopped.value)
    assert f"the blob directory {tmp_path} (MESH_BLOB_DIR" in message
    assert f"uid {os.geteuid()}, gid {os.getegid()}" in message
    assert "Permission denied" in message
    assert f"Give the directory to uid {os.geteuid()}" in message
    assert "owned by 10001" in message
    assert "docs/deploy.md" in message
    assert (tmp_path / MARKER).is_file() == marked


@pytest.mark.skipif(
    os.geteuid() == 0, reason="root writes to a 0o555 directory anyway; the test above fakes it"
)
def test_a_read_only_root_is_a_startup_error(tmp_path: Path) -> None:
    """A real read-only blob directory (mode 0o555) is refused at start with the StartupError, not a
    PermissionError."""
    root = tmp_path / "blobs"
    root.mkdir()
    root.chmod(0o555)
    try:
        with pytest.raises(StartupError, match="is not writable by this process"):
            BlobStore.opened(root)
    finally:
        root.chmod(0o755)


def test_the_writability_probe_leaves_nothing(tmp_path: Path) -> None:
    """Opening the store leaves only its marker in the root: the probe's file is removed."""
    BlobStore.opened(tmp_path)
    BlobStore.opened(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == [MARKER]
