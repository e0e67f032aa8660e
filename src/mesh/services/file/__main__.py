"""``python -m mesh.services.file``: the file service (gRPC 50051, HTTP 9101 by default)."""

from __future__ import annotations

import asyncio

from mesh.kit.runtime import configure_observability
from mesh.kit.settings import load_settings
from mesh.kit.supervision import stop_with_supervisor
from mesh.services.file.server import file_service
from mesh.services.file.settings import FileSettings


async def main() -> None:
    """Serve until SIGTERM or Ctrl-C."""
    settings = load_settings(FileSettings)
    configure_observability("file", settings)
    stop_with_supervisor()
    async with file_service(settings) as runtime:
        await runtime.run()


if __name__ == "__main__":
    asyncio.run(main())
