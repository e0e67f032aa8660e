"""``python -m mesh.services.queue``: the queue service (API, outbox relay, reconciler, dead letters)."""

from __future__ import annotations

import asyncio

from mesh.kit.runtime import ServiceRuntime, configure_observability
from mesh.kit.settings import load_settings
from mesh.kit.supervision import stop_with_supervisor
from mesh.services.queue.app import SERVICE_NAME, QueueApp
from mesh.services.queue.settings import QueueSettings


async def main() -> None:
    settings = load_settings(QueueSettings)
    configure_observability("queue", settings)
    stop_with_supervisor()
    app = QueueApp(settings)
    await app.start()
    runtime = ServiceRuntime("queue", settings, service_names=[SERVICE_NAME], checks=app.checks())
    app.install(runtime)
    try:
        await runtime.run()
    finally:
        await app.close()


if __name__ == "__main__":
    asyncio.run(main())
