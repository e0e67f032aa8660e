"""What every route needs (settings, backends, auth, rate limits), and the guard that protects /v1 routes."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Annotated

import httpx
from fastapi import Depends, Request

from mesh.services.gateway import metrics
from mesh.services.gateway.auth import API_KEY_HEADER, Authenticator, Principal
from mesh.services.gateway.backends import Backends
from mesh.services.gateway.health import HealthProbe
from mesh.services.gateway.middleware import add_response_headers, route_template
from mesh.services.gateway.ratelimit import RateLimiter
from mesh.services.gateway.settings import GatewaySettings


@dataclass
class GatewayContext:
    """The gateway's collaborators, built once by ``create_app``'s caller and shared by every request."""

    settings: GatewaySettings
    backends: Backends
    authenticator: Authenticator
    limiter: RateLimiter | None
    health: HealthProbe
    http: httpx.AsyncClient = field(default_factory=lambda: httpx.AsyncClient(timeout=2.0))
    draining: asyncio.Event = field(default_factory=asyncio.Event)
    """Set on SIGTERM: event streams end at once (clients reconnect elsewhere) instead of holding the drain."""


async def get_context(request: Request) -> GatewayContext:
    """The context stored on the app.

    ``async`` although it awaits nothing: FastAPI runs a plain ``def`` dependency in a worker thread, and
    that hop cost every request about a millisecond of CPU and a thread wake-up.
    """
    ctx: GatewayContext = request.app.state.gateway
    return ctx


Context = Annotated[GatewayContext, Depends(get_context)]

SECURITY_SCHEMES: dict[str, dict[str, str]] = {
    "APIKeyHeader": {"type": "apiKey", "in": "header", "name": API_KEY_HEADER, "description": "An API key."},
    "HTTPBearer": {
        "type": "http",
        "scheme": "bearer",
        "description": "A JWT (issuer, audience and expiry checked).",
    },
}
"""What the OpenAPI document lists for routes behind :func:`guard` (filtered by the auth mode)."""


async def guard(request: Request) -> Principal:
    """Authenticate the caller, then count the request against its rate limit for this route.

    It reads the credentials itself and takes no sub-dependencies (FastAPI's security classes would only
    re-read the same headers): dependency resolution is a large part of a small request's cost here.
    The document's security requirements are added by ``app.exact_openapi`` instead.
    """
    ctx: GatewayContext = request.app.state.gateway
    principal = await ctx.authenticator.authenticate(request)
    if ctx.limiter is not None:
        route = route_template(request.scope)
        headers, refused = await ctx.limiter.check(principal.rate_key, route)
        add_response_headers(request.scope, headers)
        if refused is not None:
            metrics.RATE_LIMITED.labels(route).inc()
            raise refused
    return principal


Caller = Annotated[Principal, Depends(guard)]
