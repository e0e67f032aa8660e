"""``python -m mesh.services.queue``: the queue service (API, outbox relay, reconciler, dead letters)."""

from __future__ import annotations

import asyncio

from mesh.kit.runtime import start_service
from mesh.services.queue.app import QueueApp
from mesh.services.queue.settings import QueueSettings


async def main() -> None:
    settings = start_service("queue", QueueSettings)
    app = QueueApp(settings)
    await app.start()
    runtime = app.runtime()
    app.install(runtime)
    try:
        await runtime.run()
    finally:
        await app.close()


if __name__ == "__main__":
    asyncio.run(main())
