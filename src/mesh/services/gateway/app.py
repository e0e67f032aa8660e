"""The FastAPI application: routers, error handlers, middleware, CORS and the web page's static files."""

from __future__ import annotations

import base64
import hashlib
import re
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
from starlette.datastructures import Headers
from starlette.formparsers import MultiPartParser
from starlette.responses import Response
from starlette.types import Message, Receive, Scope, Send

from mesh.kit import errors
from mesh.services.gateway import http_errors
from mesh.services.gateway.auth import (
    ACCESS_TOKEN_QUERY,
    API_KEY_HEADER,
    API_KEY_QUERY,
    takes_query_credentials,
)
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
from mesh.services.gateway.routes.system import PAGE_POLICY
from mesh.services.gateway.schemas import PredictIn, ProcessIn
from mesh.services.gateway.settings import UPLOAD_FORM_HEADROOM_BYTES, AuthMode

SWAGGER_UI = "/static/vendor/swagger-ui"
DESCRIPTION = """REST and JSON in front of the image analysis mesh's gRPC services.

Errors are `{"error": {"code", "message", "details"}}` with the gRPC status code name in `code`.
Every response carries the W3C `traceparent` of its trace; a prediction takes an `X-Request-Id` and returns it
(or the one it was given) on its answers, all but a 400 refusing that header and a 413 refused by
Content-Length. Authentication (when turned on) is an `X-API-Key` header or a JWT bearer token; rate-limited
routes send `RateLimit-Limit`, `RateLimit-Remaining` and `RateLimit-Reset`, and a 429 carries `Retry-After`.
"""


ROUTERS = (system.router, images.router, processing.router, models.router, jobs.router)

SECURITY_HEADERS = (
    (b"x-content-type-options", b"nosniff"),
    # The page has Cancel and Retry buttons and an API key field: no other site may show it in a frame, where a
    # click could be stolen (X-Frame-Options for browsers that predate frame-ancestors). The page and /docs
    # send stricter policies of their own, which include this.
    (b"content-security-policy", b"frame-ancestors 'none'"),
    (b"x-frame-options", b"DENY"),
)


class SecurityHeaders(HttpMiddleware):
    """``SECURITY_HEADERS`` on every response, the 500s of the safety net and CORS preflights included, except
    those a response sets itself (two policies would both apply)."""

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                present = {bytes(name).lower() for name, _ in headers}
                headers += [(name, value) for name, value in SECURITY_HEADERS if name not in present]
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, with_headers)


class ContractCors(CORSMiddleware):
    """CORS whose refused preflight is the contract's error body, saying what was refused and what is allowed;
    Starlette answers it in plain text ("Disallowed CORS origin"), which no client of the API parses."""

    def preflight_response(self, request_headers: Headers) -> Response:
        answer = super().preflight_response(request_headers)
        if answer.status_code < 400:
            return answer
        # The preflight's own headers (Vary, Access-Control-Allow-*) stay: they are what the browser reads.
        headers = {
            name: value
            for name, value in answer.headers.items()
            if name not in ("content-length", "content-type")
        }
        violations = self.refusals(request_headers)
        refused = errors.InvalidArgument(
            errors.clip(f"CORS preflight refused: {errors.listing(violations)}", errors.WIRE_MESSAGE_BYTES),
            reason="CORS_PREFLIGHT_REFUSED",
            field_violations=violations,
        )
        return http_errors.error_response(refused, status=400, headers=headers)

    def refusals(self, request_headers: Headers) -> list[errors.FieldViolation]:
        """What of the preflight the policy refuses, each with what it allows (the origins excepted: the
        allowlist is no stranger's business)."""
        found: list[errors.FieldViolation] = []
        origin = request_headers["origin"]
        if not self.is_allowed_origin(origin):
            found.append(_refusal("Origin", f"{origin} is not an origin allowed to call this API"))
        method = request_headers["access-control-request-method"]
        if method not in self.allow_methods:
            allowed = ", ".join(self.allow_methods)
            found.append(
                _refusal("Access-Control-Request-Method", f"{method} is not allowed; allowed: {allowed}")
            )
        asked = request_headers.get("access-control-request-headers")
        names = [name.strip() for name in (asked or "").split(",") if name.strip()]
        other = [name for name in names if name.lower() not in self.allow_headers]
        if other and not self.allow_all_headers:
            allowed = self.preflight_headers.get("Access-Control-Allow-Headers", "")  # in their own case
            found.append(
                _refusal(
                    "Access-Control-Request-Headers", f"not allowed: {', '.join(other)}; allowed: {allowed}"
                )
            )
        if "access-control-request-private-network" in request_headers and not self.allow_private_network:
            found.append(
                _refusal("Access-Control-Request-Private-Network", "private network access is not allowed")
            )
        # A refusal this list missed (Starlette's checks of a future release) still names the policy.
        return found or [_refusal("preflight", "refused by the gateway's CORS policy")]


def _refusal(header: str, description: str) -> errors.FieldViolation:
    # Origins, methods and header names are the client's text, of any length.
    return errors.FieldViolation(header, errors.clip(description, errors.WIRE_TEXT_BYTES))


class PageFiles(StaticFiles):
    """The page's script and style (and Swagger UI's files): revalidated on every use, and under the page's
    policy. Without Cache-Control the browser reused them for days by heuristic, so that a page from a new
    release could run the script of an old one; an unchanged file costs a 304 (its ETag)."""

    async def get_response(self, path: str, scope: Scope) -> Response:
        response = await super().get_response(path, scope)
        response.headers["Cache-Control"] = "no-cache"
        response.headers["Content-Security-Policy"] = PAGE_POLICY
        return response


def docs_policy(page: bytes) -> str:
    """The Content-Security-Policy of the Swagger UI page ``page``: its own inline script (by hash), scripts and
    styles from here, the inline styles Swagger UI sets and the ``data:`` images of its style sheet."""
    hashes = " ".join(
        f"'sha256-{base64.b64encode(hashlib.sha256(script).digest()).decode()}'"
        for script in re.findall(rb"<script>(.*?)</script>", page, re.DOTALL)
    )
    return (
        f"default-src 'self'; script-src 'self' {hashes}; style-src 'self' 'unsafe-inline'; "
        "img-src 'self' data:; object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
    )


def create_app(ctx: GatewayContext) -> FastAPI:
    """The gateway's ASGI app around ``ctx``; whoever made ``ctx`` closes it (the process's wiring,
    ``gateway_service``)."""
    app = FastAPI(
        title="Image analysis mesh",
        version="1.0.0",
        description=DESCRIPTION,
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
    app.mount("/static", PageFiles(directory=static), name="static")
    docs_page = bytes(
        get_swagger_ui_html(
            openapi_url="/openapi.json",
            title="Image analysis mesh - API",
            swagger_js_url=f"{SWAGGER_UI}/swagger-ui-bundle.js",
            swagger_css_url=f"{SWAGGER_UI}/swagger-ui.css",
            swagger_favicon_url=f"{SWAGGER_UI}/favicon-32x32.png",
            swagger_ui_parameters={"validatorUrl": None},
        ).body
    )
    docs_headers = {"Content-Security-Policy": docs_policy(docs_page)}

    @app.get("/docs", include_in_schema=False)
    async def docs() -> HTMLResponse:
        return HTMLResponse(docs_page, headers=docs_headers)

    settings = ctx.settings

    def limit_for(scope: Scope) -> int:
        path = scope["path"].rstrip("/")
        if scope["method"] == "POST" and path == "/v1/images":
            return settings.max_upload_bytes + UPLOAD_FORM_HEADROOM_BYTES
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
            ContractCors,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST", "DELETE"],
            allow_headers=[
                "Authorization",
                API_KEY_HEADER,
                "Content-Type",
                "Last-Event-ID",
                "Idempotency-Key",
                "If-None-Match",
                "X-Request-Id",
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
                "X-Request-Id",
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
QUERY_SECURITY_SCHEMES: dict[str, dict[str, str]] = {
    "APIKeyQuery": {
        "type": "apiKey",
        "in": "query",
        "name": API_KEY_QUERY,
        "description": "An API key in the query, for clients that cannot set headers (a browser's "
        "EventSource); only the job event stream takes it.",
    },
    "AccessTokenQuery": {
        "type": "apiKey",
        "in": "query",
        "name": ACCESS_TOKEN_QUERY,
        "description": "A JWT in the query, for clients that cannot set headers (a browser's EventSource); "
        "only the job event stream takes it.",
    },
}
_QUERY_SCHEME_OF = {"APIKeyHeader": "APIKeyQuery", "HTTPBearer": "AccessTokenQuery"}


def exact_openapi(app: FastAPI, auth_mode: AuthMode) -> dict[str, Any]:
    """FastAPI's document, made to say what the gateway really does.

    Validation errors are 400 with the mesh's error body, never FastAPI's 422; security requirements are
    listed only for the schemes the configured auth mode accepts (none when authentication is off), with
    their query forms on the routes that take credentials in the query (the job event stream).
    """
    if app.openapi_schema:
        return app.openapi_schema
    document = get_openapi(
        title=app.title, version=app.version, description=app.description, routes=app.routes
    )
    allowed = sorted(_SCHEMES_BY_MODE[auth_mode])
    in_query = [_QUERY_SCHEME_OF[scheme] for scheme in allowed]
    schemes = {**SECURITY_SCHEMES, **QUERY_SECURITY_SCHEMES}
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
                accepted = allowed + in_query if takes_query_credentials(path) else allowed
                operation["security"] = [{scheme: []} for scheme in accepted]
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
        components["securitySchemes"] = {scheme: schemes[scheme] for scheme in allowed + in_query}
    app.openapi_schema = document
    return document
