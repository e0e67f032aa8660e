"""``python -m mesh.services.file``: the file service (gRPC 50051, HTTP 9101 by default)."""

from __future__ import annotations

from mesh.kit.runtime import run_service
from mesh.services.file.server import file_service
from mesh.services.file.settings import FileSettings


def run() -> None:
    """Serve until SIGTERM or Ctrl-C; a blob directory it may not write to exits 2 with one line."""
    run_service("file", FileSettings, file_service)


if __name__ == "__main__":
    run()
