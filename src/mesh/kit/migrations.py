"""Migrations that wait for PostgreSQL instead of keeping a service from starting.

A service started while PostgreSQL is away (or its database cannot be created yet) serves at once: its health
names are NOT_SERVING with the reason under ``migrations``, its API answers UNAVAILABLE (:meth:`gate`), the
loops that use its tables wait (:meth:`wait`), and it migrates in the background (:meth:`run_until_applied`),
turning SERVING by itself once the schema is in place. Migrating before serving, with a time limit, made a pod
started during a longer outage exit, and its restarts back off into a crash loop.

Usage, in a service's wiring::

    migrations = SchemaMigrations(url, "queue", "mesh.services.queue.migrations")
    await migrations.try_once(timeout=10.0)  # optional: most starts then serve with the schema in place
    runtime = ServiceRuntime(..., checks=[..., migrations], interceptors=[migrations.gate([SERVICE_NAME])])
    runtime.add_background(lambda: migrations.run_until_applied(runtime.stopping))
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Collection
from dataclasses import dataclass, field
from typing import Any

import grpc

from mesh.kit import errors
from mesh.kit.db import prepare_database
from mesh.kit.interceptors import RESPONSE_UNARY, rewrapped
from mesh.kit.logging import get_logger
from mesh.kit.runtime import sleep_unless_stopping

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
        """Retry until applied or until ``stopping`` is set (a background task of the runtime); returns at
        once when the schema is already in place."""
        while not self.applied.is_set() and not stopping.is_set():
            if await self.try_once(timeout=self.retry_seconds):
                log.info("migrations applied", component=self.component)
                return
            await sleep_unless_stopping(stopping, self.retry_seconds)

    async def wait(self, stopping: asyncio.Event) -> bool:
        """Wait until the schema is in place (True) or ``stopping`` is set first (False)."""
        waits = [asyncio.ensure_future(self.applied.wait()), asyncio.ensure_future(stopping.wait())]
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiting in waits:
                waiting.cancel()
        return self.applied.is_set()

    def require(self) -> None:
        """Raise UNAVAILABLE (retryable) until the schema is in place: a call then never meets a missing
        table, which would be an INTERNAL error. The reason stays in health: it may name hosts."""
        if not self.applied.is_set():
            raise errors.Unavailable(
                f"the {self.component} database schema is not in place yet; retry shortly",
                retry_after_seconds=self.retry_seconds,
            )

    def gate(self, service_names: Collection[str]) -> grpc.aio.ServerInterceptor:  # type: ignore[type-arg]
        """A server interceptor that answers UNAVAILABLE on the methods of ``service_names`` until the schema is
        in place; health and reflection answer throughout. Give it after the kit's own interceptor (as
        ``ServiceRuntime``'s ``interceptors`` are), which turns the refusal into its status."""
        return _Gate(self, frozenset(service_names))


class _Gate(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    def __init__(self, migrations: SchemaMigrations, service_names: frozenset[str]) -> None:
        self._migrations = migrations
        self._service_names = service_names

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any]]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any]:
        handler = await continuation(handler_call_details)
        service = handler_call_details.method.lstrip("/").rpartition("/")[0]
        if handler is None or self._migrations.applied.is_set() or service not in self._service_names:
            return handler
        require = self._migrations.require
        return rewrapped(
            handler,
            lambda behavior, kind: (_unary if kind in RESPONSE_UNARY else _stream)(behavior, require),
            handler.request_deserializer,
        )


def _unary(behavior: Any, require: Callable[[], None]) -> Any:
    async def gated(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        require()
        return await behavior(request, context)

    return gated


def _stream(behavior: Any, require: Callable[[], None]) -> Any:
    async def gated(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[Any]:
        require()
        async for response in behavior(request, context):
            yield response

    return gated
