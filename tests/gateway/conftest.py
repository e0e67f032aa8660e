"""Fixtures of the gateway tests: fake services over real gRPC, and gateways in front of them."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from mesh.kit import tracing
from mesh.services.gateway.auth import KeyLookup
from tests.gateway.harness import FakeMesh, GatewayFactory, build_gateway, close_gateway, start_fake_mesh

# As in the real process: an SDK tracer provider, so spans have ids (nothing is exported).
tracing.configure_tracing("gateway-tests")


@pytest.fixture(scope="session")
async def mesh() -> AsyncIterator[FakeMesh]:
    """The four fake services, shared by every gateway test."""
    fake_mesh = await start_fake_mesh()
    yield fake_mesh
    await fake_mesh.stop()


@pytest.fixture
async def make_client(mesh: FakeMesh) -> AsyncIterator[GatewayFactory]:
    """Builds a gateway with settings overrides and returns an HTTP client for it (in-process ASGI)."""
    contexts = []
    clients: list[httpx.AsyncClient] = []

    async def factory(keys: KeyLookup | None = None, **overrides: Any) -> httpx.AsyncClient:
        app, ctx = build_gateway(mesh.gateway_settings(**overrides), keys)
        contexts.append(ctx)
        client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gateway")
        clients.append(client)
        return client

    yield factory
    for client in clients:
        await client.aclose()
    for ctx in contexts:
        await close_gateway(ctx)


@pytest.fixture
async def client(make_client: GatewayFactory, mesh: FakeMesh) -> httpx.AsyncClient:
    """A gateway with the default settings (auth off, generous rate limit)."""
    mesh.switch.up = True
    mesh.fakes.queue.hold = False
    mesh.fakes.queue.fail_next = False
    return await make_client()
