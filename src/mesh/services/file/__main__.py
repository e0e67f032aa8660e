"""``python -m mesh.services.file``: the file service (gRPC 50051, HTTP 9101 by default)."""

from __future__ import annotations

import asyncio

from mesh.kit.runtime import start_service
from mesh.services.file.server import file_service
from mesh.services.file.settings import FileSettings


async def main() -> None:
    """Serve until SIGTERM or Ctrl-C."""
    settings = start_service("file", FileSettings)
    async with file_service(settings) as runtime:
        await runtime.run()


if __name__ == "__main__":
    asyncio.run(main())
