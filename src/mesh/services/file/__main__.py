"""``python -m mesh.services.file``: the file service (gRPC 50051, HTTP 9101 by default)."""

from __future__ import annotations

import asyncio

from mesh.kit.errors import exit_on_startup_error
from mesh.kit.runtime import start_service
from mesh.services.file.server import file_service
from mesh.services.file.settings import FileSettings


async def main() -> None:
    """Serve until SIGTERM or Ctrl-C."""
    settings = start_service("file", FileSettings)
    async with file_service(settings) as runtime:
        await runtime.run()


def run() -> None:
    """The process: exit 2 with one line on a start-up error (a blob directory it may not write to)."""
    with exit_on_startup_error("file"):
        asyncio.run(main())


if __name__ == "__main__":
    run()
