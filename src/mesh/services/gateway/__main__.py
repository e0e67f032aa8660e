"""``python -m mesh.services.gateway``: the REST gateway on HTTP port 8080 (no gRPC server of its own).

Wiring only: backends, the API key store when auth uses keys, the app and uvicorn, started by the kit's
:func:`~mesh.kit.runtime.run_service` as every service is. uvicorn drains in-flight requests on SIGTERM for
``grace_seconds``. The key store's migrations run in the background: started while PostgreSQL is away, the
gateway serves, unready, with key checks answering 503.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import AsyncIterator
from types import FrameType

import httpx
import uvicorn
from starlette.types import ASGIApp

from mesh.kit.db import PostgresCheck, create_pool
from mesh.kit.errors import StartupError
from mesh.kit.health import DependencyCheck
from mesh.kit.logging import get_logger
from mesh.kit.migrations import SchemaMigrations
from mesh.kit.runtime import run_service
from mesh.services.gateway.app import create_app
from mesh.services.gateway.auth import Authenticator
from mesh.services.gateway.backends import Backends
from mesh.services.gateway.context import GatewayContext
from mesh.services.gateway.health import HealthProbe
from mesh.services.gateway.key_store import COMPONENT, MIGRATIONS, KeyStore
from mesh.services.gateway.ratelimit import RateLimiter
from mesh.services.gateway.settings import GatewaySettings

log = get_logger("mesh.services.gateway")


@contextlib.asynccontextmanager
async def gateway_service(settings: GatewaySettings) -> AsyncIterator[GatewayRuntime]:
    """A ready-to-run gateway: backends, the API key store when auth uses keys, the app. Its HTTP client,
    channels and key pool are closed on exit, in reverse order."""
    async with contextlib.AsyncExitStack() as resources:
        checks: list[DependencyCheck] = []
        keys: KeyStore | None = None
        migrations: SchemaMigrations | None = None
        if settings.auth_mode in ("api_key", "any"):
            migrations = SchemaMigrations(settings.database_url, COMPONENT, MIGRATIONS)
            pool = create_pool(settings.database_url, name="gateway", min_size=1, max_size=8)
            await pool.open(wait=False)
            resources.push_async_callback(pool.close)
            keys = KeyStore(pool, migrations=migrations)
            checks += [PostgresCheck(pool, name="postgresql (api keys)"), migrations]
        authenticator = Authenticator(settings, keys)
        backends = Backends(settings)
        resources.push_async_callback(backends.close)
        http = httpx.AsyncClient(timeout=settings.health_timeout_seconds)
        resources.push_async_callback(http.aclose)
        ctx = GatewayContext(
            settings=settings,
            backends=backends,
            authenticator=authenticator,
            limiter=RateLimiter(settings.rate_limit) if settings.rate_limit_enabled else None,
            health=HealthProbe(settings, backends, http, checks),
            http=http,
        )
        log.info(authenticator.describe(), auth_mode=settings.auth_mode)
        yield GatewayRuntime(ctx, create_app(ctx), migrations)


class GatewayRuntime:
    """The gateway's runtime for :func:`~mesh.kit.runtime.run_service`: uvicorn, with the key store's
    migrations in the background while it serves."""

    def __init__(self, ctx: GatewayContext, app: ASGIApp, migrations: SchemaMigrations | None) -> None:
        self._ctx = ctx
        self._app = app
        self._migrations = migrations

    async def run(self) -> None:
        """Serve until SIGTERM/SIGINT, then drain for ``grace_seconds``."""
        settings = self._ctx.settings
        log.info(
            "gateway starting",
            address=f"http://localhost:{settings.http_port}/",
            rate_limit=settings.rate_limit if settings.rate_limit_enabled else "off",
            cors_origins=settings.cors_origins,
        )
        server = DrainingServer(self._ctx, http_server_config(settings, self._app))
        migrations = self._migrations
        migrating = (
            asyncio.create_task(migrations.run_until_applied(self._ctx.draining)) if migrations else None
        )
        # uvicorn drains on SIGTERM/SIGINT, then re-raises the signal under the handlers it found at start.
        # Handlers that do nothing make that a no-op, so a drained gateway exits 0 like the other services.
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, _already_drained)
        try:
            # uvicorn logs why it cannot bind its port and exits the process (SystemExit) from inside the
            # event loop: as the other services do, the start ends with one line naming the port.
            try:
                await server.serve()
            except SystemExit:
                address = f"{settings.http_host}:{settings.http_port}"
                raise StartupError(
                    f"HTTP port {address} could not be bound (in use by another process?); stop what holds it, "
                    "or set MESH_HTTP_PORT"
                ) from None
        finally:
            if migrating is not None:
                migrating.cancel()
                await asyncio.gather(migrating, return_exceptions=True)
            log.info("gateway stopped")


def http_server_config(settings: GatewaySettings, app: ASGIApp) -> uvicorn.Config:
    """uvicorn's configuration of the gateway: the app behind the proxies ``settings`` trusts, without
    uvicorn's own logging (the app logs each request), draining for ``grace_seconds`` on a stop signal."""
    return uvicorn.Config(
        app,
        host=settings.http_host,
        port=settings.http_port,
        log_config=None,
        access_log=False,
        proxy_headers=True,
        forwarded_allow_ips=settings.forwarded_allow_ips,
        timeout_graceful_shutdown=int(settings.grace_seconds),
    )


class DrainingServer(uvicorn.Server):
    """uvicorn's server that also ends open event streams when a stop signal arrives."""

    def __init__(self, ctx: GatewayContext, config: uvicorn.Config) -> None:
        super().__init__(config)
        self._ctx = ctx
        self._loop = asyncio.get_running_loop()

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # Called by a signal handler, outside the event loop's callbacks.
        self._loop.call_soon_threadsafe(self._ctx.draining.set)
        super().handle_exit(sig, frame)


def _already_drained(signum: int, frame: FrameType | None) -> None:
    """The re-raised signal after uvicorn's graceful shutdown: nothing is left to do."""


def run() -> None:
    """Serve until SIGTERM or Ctrl-C, then drain; exits 0 once drained."""
    # Every image request moves a body and a gRPC message of megabytes through this process.
    run_service("gateway", GatewaySettings, gateway_service, large_messages=True)


if __name__ == "__main__":
    run()
