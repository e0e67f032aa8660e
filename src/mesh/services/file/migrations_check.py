"""Migrations that wait for PostgreSQL instead of keeping the service from starting.

When PostgreSQL is down at start, the service still starts (NOT_SERVING, with the reason in its health),
keeps trying to migrate in the background, and turns SERVING by itself once the schema is in place.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field

from mesh.kit.db import prepare_database
from mesh.kit.logging import get_logger

log = get_logger(__name__)


@dataclass
class SchemaMigrations:
    """Applies a component's migrations; as a dependency check, it fails until they are applied."""

    url: str
    component: str
    package: str
    retry_seconds: float = 2.0
    name: str = "migrations"
    applied: asyncio.Event = field(default_factory=asyncio.Event)
    last_error: str = "not attempted yet"

    async def check(self) -> str:
        """Raises until the schema is migrated."""
        if not self.applied.is_set():
            raise RuntimeError(f"database schema not migrated yet: {self.last_error}")
        return "applied"

    async def try_once(self, timeout: float) -> bool:
        """One attempt (retrying connection errors for ``timeout`` seconds); True when applied."""
        try:
            await prepare_database(self.url, self.component, self.package, timeout=timeout)
        except Exception as error:  # any failure is retried later; the reason is shown in health
            self.last_error = f"{type(error).__name__}: {error}".strip()
            log.warning("migrations not applied yet", component=self.component, error=self.last_error)
            return False
        self.applied.set()
        return True

    async def run_until_applied(self, stopping: asyncio.Event) -> None:
        """Retry until applied or until ``stopping`` is set (a background task of the runtime)."""
        while not self.applied.is_set() and not stopping.is_set():
            if await self.try_once(timeout=self.retry_seconds):
                log.info("migrations applied", component=self.component)
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stopping.wait(), self.retry_seconds)
