"""The content-addressed blob store on the local filesystem.

A blob lives at ``<root>/<sha[0:2]>/<sha[2:4]>/<sha>`` (fan-out keeps directories small). Writes are atomic:
a temporary file in the same directory, fsync, ``os.replace``, fsync of the directory, so a reader sees the
whole blob or none. Same bytes, same name: storing them again writes nothing. Which blobs may be removed is
decided by the repository (reference counting in SQL); this module only moves bytes.

The root holds a marker file, :data:`MARKER`, written when the service opens the store at start-up; the
health check fails without it, so a blob volume that is not mounted (an empty mount point left on the root
filesystem) is not taken for an empty store. It lies beside the fan-out directories, never at a blob's depth,
so listing and sweeping blobs never see it.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import stat
import tempfile
import time
from pathlib import Path
from typing import BinaryIO

from mesh.kit.errors import StartupError

SHA256_HEX = re.compile(r"[0-9a-f]{64}")

MARKER = ".mesh-blob-store"
"""The file in the root that says this directory is the blob store (and its volume is mounted)."""


class BlobStore:
    """Blobs named by the lower-case hex SHA-256 of their bytes, under ``root``."""

    def __init__(self, root: Path) -> None:
        self.root = root

    @classmethod
    def opened(cls, root: Path) -> BlobStore:
        """The store at ``root``, its root and marker created when missing (:meth:`open_root`)."""
        store = cls(root)
        store.open_root()
        return store

    def open_root(self) -> None:
        """Create the root and its marker when missing (once, at start-up, never in a health probe), after
        checking that this process can write there: :class:`~mesh.kit.errors.StartupError` when it cannot.

        A store made before the marker existed is adopted: it gets its marker at the first start.
        """
        self.root.mkdir(parents=True, exist_ok=True)
        # Also with the marker there: another uid may have written it (a volume that fsGroup did not reach),
        # and this process would otherwise find out at its first upload.
        try:
            _create_and_remove_a_file(self.root)
        except PermissionError as error:
            raise _not_writable(self.root, error) from error
        marker = self.root / MARKER
        if marker.is_file():
            return
        with contextlib.suppress(FileExistsError), marker.open("x") as handle:
            handle.write("The mesh file service's blob store; its health check needs this file.\n")
            handle.flush()
            os.fsync(handle.fileno())
        _fsync_directory(self.root)

    def path(self, sha256: str) -> Path:
        """Where the blob with this digest lives (the digest is checked, so no path can escape root)."""
        if not SHA256_HEX.fullmatch(sha256):
            raise ValueError(f"not a lower-case hex SHA-256: {sha256!r}")
        return self.root / sha256[:2] / sha256[2:4] / sha256

    def exists(self, sha256: str) -> bool:
        """Whether the blob is stored."""
        return self.path(sha256).is_file()

    def write(self, sha256: str, data: bytes) -> bool:
        """Store ``data`` (whose digest the caller computed) unless present whole; True when it was written.

        A blob of another size is damaged (cut short on disk), and is replaced: an upload of the same bytes is
        how a damaged image is restored."""
        target = self.path(sha256)
        with contextlib.suppress(FileNotFoundError):
            if target.stat().st_size == len(data):
                return False
        if not (self.root / MARKER).is_file():
            # Not the store's volume (unmounted under a running service): a blob written here would vanish
            # from view when the volume came back, leaving its row without bytes.
            raise FileNotFoundError(
                errno.ENOENT, f"{self.root} has no {MARKER} marker; its volume may not be mounted"
            )
        fd, temporary = _temporary_file(target.parent)
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(temporary, target)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temporary)
            raise
        _fsync_directory(target.parent)
        return True

    def open(self, sha256: str) -> BinaryIO:
        """The blob for reading; raises FileNotFoundError when it is missing."""
        return self.path(sha256).open("rb")

    def read(self, sha256: str) -> bytes:
        """The blob's bytes."""
        return self.path(sha256).read_bytes()

    def remove(self, sha256: str) -> bool:
        """Delete the blob (and its emptied fan-out directories); True when it existed."""
        target = self.path(sha256)
        try:
            target.unlink()
        except FileNotFoundError:
            return False
        for directory in (target.parent, target.parent.parent):
            try:
                directory.rmdir()
            except OSError:  # not empty, or already gone
                break
        return True

    def digests(self) -> list[str]:
        """Every stored blob's digest (walks the tree)."""
        if not self.root.is_dir():
            return []
        return [p.name for p in self.root.glob("*/*/*") if SHA256_HEX.fullmatch(p.name)]

    def remove_stale_temporaries(self, older_than_seconds: float) -> int:
        """Delete temporary files left by writes that crashed; returns how many."""
        if not self.root.is_dir():
            return 0
        cutoff = time.time() - older_than_seconds
        removed = 0
        for path in self.root.glob("*/*/.tmp-*"):
            with contextlib.suppress(FileNotFoundError):
                if path.stat().st_mtime < cutoff:
                    path.unlink()
                    removed += 1
        return removed

    def count(self) -> int:
        """How many blobs are stored (for tests and diagnostics; walks the tree)."""
        if not self.root.is_dir():
            return 0
        return sum(1 for p in self.root.glob("*/*/*") if SHA256_HEX.fullmatch(p.name))


def _create_and_remove_a_file(directory: Path) -> None:
    """Prove that this process may create files in ``directory``."""
    fd, name = tempfile.mkstemp(prefix=".write-probe-", dir=directory)
    os.close(fd)
    os.unlink(name)


def _not_writable(root: Path, error: OSError) -> StartupError:
    """The start-up error for a blob directory this process may not write to: who the process is, who owns the
    directory, and the fix."""
    uid, gid = os.geteuid(), os.getegid()
    try:
        info = root.stat()
        owner = f"owned by {info.st_uid}:{info.st_gid}, mode {stat.filemode(info.st_mode)}"
    except OSError:
        owner = "its owner unknown"
    return StartupError(
        f"the blob directory {root} (MESH_BLOB_DIR; {owner}) is not writable by this process "
        f"(uid {uid}, gid {gid}, groups {','.join(map(str, os.getgroups())) or 'none'}): {error}. "
        f"Give the directory to uid {uid}, e.g. an NFS/EFS export owned by 10001 (Kubernetes applies no "
        "fsGroup to most ReadWriteMany volumes); see docs/deploy.md"
    )


def _temporary_file(directory: Path) -> tuple[int, str]:
    """A new temporary file in ``directory``, created if needed.

    Retried because removing another blob may prune the (shared) fan-out directory between our mkdir
    and the file's creation.
    """
    failures = 0
    while True:
        directory.mkdir(parents=True, exist_ok=True)
        try:
            return tempfile.mkstemp(prefix=".tmp-", dir=directory)
        except FileNotFoundError:
            failures += 1
            if failures >= 3:
                raise


def _fsync_directory(directory: Path) -> None:
    """Make the rename durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
