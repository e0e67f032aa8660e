"""The FastAPI application: routers, error handlers, middleware, CORS and the web page's static files."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from importlib import resources
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.openapi.utils import get_openapi
from fastapi.responses import HTMLResponse
from fastapi.routing import APIRoute
from fastapi.staticfiles import StaticFiles
from starlette.formparsers import MultiPartParser
from starlette.types import Message, Receive, Scope, Send

from mesh.services.gateway import http_errors
from mesh.services.gateway.auth import API_KEY_HEADER
from mesh.services.gateway.context import SECURITY_SCHEMES, GatewayContext, guard
from mesh.services.gateway.middleware import (
    BodyLimit,
    CancelOnDisconnect,
    HeadAsGet,
    HttpMiddleware,
    ObservedRequests,
    SafetyNet,
)
from mesh.services.gateway.routes import images, jobs, models, processing, system
from mesh.services.gateway.schemas import PredictIn, ProcessIn
from mesh.services.gateway.settings import AuthMode

SWAGGER_UI = "/static/vendor/swagger-ui"
DESCRIPTION = """REST and JSON in front of the image analysis mesh's gRPC services.

Errors are `{"error": {"code", "message", "details"}}` with the gRPC status code name in `code`.
Every response carries the W3C `traceparent` of its trace. Authentication (when turned on) is an
`X-API-Key` header or a JWT bearer token; rate-limited routes send `RateLimit-Limit`,
`RateLimit-Remaining` and `RateLimit-Reset`, and a 429 carries `Retry-After`.
"""


ROUTERS = (system.router, images.router, processing.router, models.router, jobs.router)

SECURITY_HEADERS = (
    (b"x-content-type-options", b"nosniff"),
    # The page has Cancel and Retry buttons and an API key field: no other site may show it in a frame, where a
    # click could be stolen (X-Frame-Options for browsers that predate frame-ancestors).
    (b"content-security-policy", b"frame-ancestors 'none'"),
    (b"x-frame-options", b"DENY"),
)


class SecurityHeaders(HttpMiddleware):
    """``SECURITY_HEADERS`` on every response, the 500s of the safety net and CORS preflights included."""

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *SECURITY_HEADERS]}
            await send(message)

        await self.app(scope, receive, with_headers)


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
        # The gateway makes its own server span (ObservedRequests), which also returns the traceparent;
        # FastAPI's native one would be a second server span per request.
        telemetry={"tracing": False, "metrics": False, "logs": False},
        # FastAPI's viewers load their scripts from a CDN; /docs is served from vendored files instead,
        # so it works on machines without internet access.
        docs_url=None,
        redoc_url=None,
    )
    app.state.gateway = ctx
    app.openapi = lambda: exact_openapi(app, ctx.settings.auth_mode)  # type: ignore[method-assign]
    http_errors.install(app)
    for router in ROUTERS:
        app.include_router(router)
    static = Path(str(resources.files("mesh.services.gateway").joinpath("static")))
    app.mount("/static", StaticFiles(directory=static), name="static")

    @app.get("/docs", include_in_schema=False)
    async def docs() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url="/openapi.json",
            title="Image analysis mesh - API",
            swagger_js_url=f"{SWAGGER_UI}/swagger-ui-bundle.js",
            swagger_css_url=f"{SWAGGER_UI}/swagger-ui.css",
            swagger_favicon_url=f"{SWAGGER_UI}/favicon-32x32.png",
            swagger_ui_parameters={"validatorUrl": None},
        )

    settings = ctx.settings

    def limit_for(scope: Scope) -> int:
        path = scope["path"].rstrip("/")
        if scope["method"] == "POST" and path == "/v1/images":
            return settings.max_upload_bytes
        if scope["method"] == "POST" and (path == "/v1/process" or path.endswith(":predict")):
            return settings.max_json_bytes
        # A job, a cancel: a few KB at most, so a body of megabytes is refused before it is read or parsed.
        return settings.max_body_bytes

    app.add_middleware(HeadAsGet)
    app.add_middleware(BodyLimit, limit_for=limit_for)
    app.add_middleware(CancelOnDisconnect)
    # An uploaded file is read into memory whole (it goes on to the file service), so a multipart part
    # up to the upload limit stays in memory: Starlette's default spools parts over 1 MiB to a temporary
    # file, written through a worker thread chunk by chunk, which made a 1 MB upload ~10 ms slower.
    MultiPartParser.spool_max_size = max(MultiPartParser.spool_max_size, settings.max_upload_bytes)
    app.add_middleware(SafetyNet)
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
                "If-None-Match",
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
                "X-Image-Width",
                "X-Image-Height",
                "X-Device",
                "ETag",
                "Content-Disposition",
            ],
        )
    app.add_middleware(SecurityHeaders)
    app.add_middleware(ObservedRequests)
    return app


_SCHEMES_BY_MODE: dict[str, set[str]] = {
    "off": set(),
    "api_key": {"APIKeyHeader"},
    "jwt": {"HTTPBearer"},
    "any": {"APIKeyHeader", "HTTPBearer"},
}


def exact_openapi(app: FastAPI, auth_mode: AuthMode) -> dict[str, Any]:
    """FastAPI's document, made to say what the gateway really does.

    Validation errors are 400 with the mesh's error body, never FastAPI's 422; security requirements are
    listed only for the schemes the configured auth mode accepts (none when authentication is off).
    """
    if app.openapi_schema:
        return app.openapi_schema
    document = get_openapi(
        title=app.title, version=app.version, description=app.description, routes=app.routes
    )
    allowed = sorted(_SCHEMES_BY_MODE[auth_mode])
    guarded = {
        (method.lower(), route.path_format)
        for router in ROUTERS
        for route in router.routes
        if isinstance(route, APIRoute) and any(d.call is guard for d in route.dependant.dependencies)
        for method in route.methods or ()
    }
    for path, path_item in document.get("paths", {}).items():
        for method, operation in path_item.items():
            operation.get("responses", {}).pop("422", None)
            if allowed and (method, path) in guarded:
                operation["security"] = [{scheme: []} for scheme in allowed]
    components = document.setdefault("components", {})
    # Routes that parse their body themselves (bodies.py) name its schema, which FastAPI does not register.
    registered = components.setdefault("schemas", {})
    for model in (PredictIn, ProcessIn):
        schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
        for name, nested in schema.pop("$defs", {}).items():
            registered.setdefault(name, nested)
        registered[model.__name__] = schema
    for unused in ("HTTPValidationError", "ValidationError"):
        components.get("schemas", {}).pop(unused, None)
    if allowed:
        components["securitySchemes"] = {scheme: SECURITY_SCHEMES[scheme] for scheme in allowed}
    app.openapi_schema = document
    return document
