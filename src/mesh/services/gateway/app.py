"""The FastAPI application: routers, error handlers, middleware, CORS and the web page's static files."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from importlib import resources
from pathlib import Path

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi.staticfiles import StaticFiles
from starlette.types import Scope

from mesh.services.gateway import http_errors
from mesh.services.gateway.auth import API_KEY_HEADER
from mesh.services.gateway.context import GatewayContext
from mesh.services.gateway.middleware import BodyLimit, ObservedRequests
from mesh.services.gateway.routes import images, jobs, models, processing, system

DESCRIPTION = """REST and JSON in front of the image analysis mesh's gRPC services.

Errors are `{"error": {"code", "message", "details"}}` with the gRPC status code name in `code`.
Every response carries the W3C `traceparent` of its trace. Authentication (when turned on) is an
`X-API-Key` header or a JWT bearer token; rate-limited routes send `RateLimit-Limit`,
`RateLimit-Remaining` and `RateLimit-Reset`, and a 429 carries `Retry-After`.
"""


def create_app(ctx: GatewayContext) -> FastAPI:
    """The gateway's ASGI app around ``ctx`` (whose backends it closes on shutdown)."""

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        await ctx.http.aclose()
        await ctx.backends.close()

    app = FastAPI(
        title="Image analysis mesh",
        version="1.0.0",
        description=DESCRIPTION,
        lifespan=lifespan,
    )
    app.state.gateway = ctx
    http_errors.install(app)
    for router in (system.router, images.router, processing.router, models.router, jobs.router):
        app.include_router(router)
    static = Path(str(resources.files("mesh.services.gateway").joinpath("static")))
    app.mount("/static", StaticFiles(directory=static), name="static")

    settings = ctx.settings

    def limit_for(scope: Scope) -> int:
        if scope["path"].rstrip("/") == "/v1/images" and scope["method"] == "POST":
            return settings.max_upload_bytes
        return settings.max_json_bytes

    app.add_middleware(BodyLimit, limit_for=limit_for)
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST", "DELETE"],
            allow_headers=[
                "Authorization",
                API_KEY_HEADER,
                "Content-Type",
                "Last-Event-ID",
                "Idempotency-Key",
                "traceparent",
                "tracestate",
            ],
            expose_headers=[
                "traceparent",
                "Location",
                "RateLimit-Limit",
                "RateLimit-Remaining",
                "RateLimit-Reset",
                "Retry-After",
            ],
        )
    app.add_middleware(ObservedRequests)
    return app
