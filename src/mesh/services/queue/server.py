"""Wiring of the queue service: :class:`~mesh.services.queue.app.QueueApp` under the kit's runtime."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from mesh.kit.runtime import ServiceRuntime
from mesh.services.queue.app import QueueApp
from mesh.services.queue.settings import QueueSettings


@contextlib.asynccontextmanager
async def queue_service(settings: QueueSettings) -> AsyncIterator[ServiceRuntime]:
    """A ready-to-run queue service: migrated (or migrating in the background), pool open, API and loops
    installed. Its channels, broker connection and pool are closed on exit, also when the start fails half
    way (a pool opened before a later step raised)."""
    app = QueueApp(settings)
    try:
        await app.start()
        runtime = app.runtime()
        app.install(runtime)
        yield runtime
    finally:
        await app.close()
