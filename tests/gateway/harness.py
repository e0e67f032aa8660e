"""Starting the fake services and a gateway in front of them (shared by the tests and the benchmark)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import httpx
import uvicorn
from fastapi import FastAPI

from mesh.kit.runtime import ServiceRuntime
from mesh.kit.settings import ServerSettings
from mesh.services.gateway.app import create_app
from mesh.services.gateway.auth import Authenticator, KeyLookup
from mesh.services.gateway.backends import Backends
from mesh.services.gateway.context import GatewayContext
from mesh.services.gateway.health import HealthProbe
from mesh.services.gateway.ratelimit import RateLimiter
from mesh.services.gateway.settings import GatewaySettings
from tests.gateway.fakes import SERVICE_NAMES, Fakes

GatewayFactory = Callable[..., Awaitable[httpx.AsyncClient]]
"""``await make_client(keys=None, **settings_overrides)`` -> a client of a new gateway."""


@dataclass
class SwitchCheck:
    """A dependency of the fakes that a test can break (reported as ``name``)."""

    name: str = "postgresql"
    up: bool = True

    async def check(self) -> str:
        if not self.up:
            raise ConnectionError("connection refused")
        return "pool 1 connections"


@dataclass
class FakeMesh:
    """The four fake services on one gRPC server (and one HTTP /healthz port)."""

    fakes: Fakes
    runtime: ServiceRuntime
    task: asyncio.Task[None]
    switch: SwitchCheck

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.runtime.grpc_port}"

    def gateway_settings(self, **overrides: Any) -> GatewaySettings:
        """Gateway settings pointing every service at the fakes."""
        http = f"127.0.0.1:{self.runtime.http_port}"
        values: dict[str, Any] = {
            "file_service_address": self.address,
            "image_service_address": self.address,
            "inference_service_address": self.address,
            "queue_service_address": self.address,
            "file_service_http": http,
            "image_service_http": http,
            "inference_service_http": http,
            "queue_service_http": http,
            "rpc_timeout_seconds": 10.0,
            "health_timeout_seconds": 2.0,
            **overrides,
        }
        return GatewaySettings(**values)

    async def stop(self) -> None:
        """Stop the fakes' server."""
        await self.fakes.queue.stop()
        self.runtime.stopping.set()
        await self.task


async def start_fake_mesh(step_seconds: float = 0.05) -> FakeMesh:
    """Serve the fakes with the kit's ServiceRuntime on free ports."""
    fakes = Fakes.create(step_seconds)
    switch = SwitchCheck()
    runtime = ServiceRuntime(
        "fakes",
        ServerSettings(grpc_port=0, http_port=0, grace_seconds=0.2, health_interval_seconds=0.1),
        service_names=SERVICE_NAMES,
        checks=[switch],
    )
    fakes.add_to(runtime.server)
    task = asyncio.create_task(runtime.run())
    started = asyncio.create_task(runtime.started.wait())
    await asyncio.wait([task, started], return_when=asyncio.FIRST_COMPLETED)
    if task.done():
        started.cancel()
        await task
    return FakeMesh(fakes, runtime, task, switch)


def build_gateway(
    settings: GatewaySettings, keys: KeyLookup | None = None, *, health_fresh_seconds: float = 0.0
) -> tuple[FastAPI, GatewayContext]:
    """The gateway app in front of ``settings``' services (the caller closes the context). Its health rounds
    are not reused by default (``health_fresh_seconds``), since tests change what the fakes report between
    two requests."""
    backends = Backends(settings)
    http = httpx.AsyncClient(timeout=settings.health_timeout_seconds)
    ctx = GatewayContext(
        settings=settings,
        backends=backends,
        authenticator=Authenticator(settings, keys),
        limiter=RateLimiter(settings.rate_limit) if settings.rate_limit_enabled else None,
        health=HealthProbe(settings, backends, http, fresh_seconds=health_fresh_seconds),
        http=http,
    )
    return create_app(ctx), ctx


async def close_gateway(ctx: GatewayContext) -> None:
    """Close what ``build_gateway`` opened."""
    with contextlib.suppress(Exception):
        await ctx.http.aclose()
    await ctx.backends.close()


@asynccontextmanager
async def serve_app(app: FastAPI) -> AsyncIterator[str]:
    """Serve ``app`` over real HTTP on a free loopback port (for streaming, browsers and fuzzers)."""
    server = uvicorn.Server(
        uvicorn.Config(
            app,
            host="127.0.0.1",
            port=0,
            log_config=None,
            access_log=False,
            lifespan="off",
            timeout_graceful_shutdown=1,
        )
    )
    task = asyncio.create_task(server.serve())
    while not server.started and not task.done():
        await asyncio.sleep(0.01)
    if task.done():
        await task
        raise RuntimeError("the test server did not start")
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await task


async def serve_fakes_forever() -> None:
    """Serve the fakes until SIGTERM, printing ``PORTS <grpc> <http>`` (for the benchmark's subprocess)."""
    fake_mesh = await start_fake_mesh()
    print(f"PORTS {fake_mesh.runtime.grpc_port} {fake_mesh.runtime.http_port}", flush=True)
    await fake_mesh.task
