"""``python -m mesh.services.file`` with a blob directory it may not write to: a message and exit 2."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from tests.processes import reason, refused_start

# The process as ``python -m mesh.services.file`` runs it, with file creation in the blob directory refused as
# on a volume owned by another uid (the tests run as root, whom a read-only mode does not stop).
REFUSED_BLOB_DIR = """
import errno, os, tempfile
from mesh.services.file.__main__ import run

blob_dir = os.environ["MESH_BLOB_DIR"]
original = tempfile.mkstemp

def mkstemp(*args, dir=None, **kwargs):
    if dir is not None and os.fspath(dir) == blob_dir:
        raise PermissionError(errno.EACCES, "Permission denied", os.path.join(blob_dir, ".write-probe-x"))
    return original(*args, dir=dir, **kwargs)

tempfile.mkstemp = mkstemp
run()
"""


def test_a_blob_directory_it_may_not_write_to_stops_the_start_with_a_message(tmp_path: Path) -> None:
    """The file service exits 2 with one line naming the directory, its uid and the fix, and no traceback
    (it died with a bare PermissionError traceback), before it waits for PostgreSQL."""
    blob_dir = tmp_path / "blobs"
    env = {
        **os.environ,
        "MESH_BLOB_DIR": str(blob_dir),
        # Nothing listens there: the start must fail on the blob directory before it tries the database.
        "MESH_DATABASE_URL": "postgresql://mesh@127.0.0.1:1/mesh",
        "MESH_STARTUP_MIGRATION_SECONDS": "30",
        "MESH_HTTP_PORT": "0",
        "MESH_GRPC_PORT": "0",
    }
    last = reason(refused_start([sys.executable, "-c", REFUSED_BLOB_DIR], env, timeout=20))
    assert last.startswith(f"file: cannot start: the blob directory {blob_dir} (MESH_BLOB_DIR")
    assert f"uid {os.geteuid()}" in last
    assert "docs/deploy.md" in last
