"""The gateway's settings (``MESH_*`` variables); it serves HTTP only, no gRPC of its own."""

from __future__ import annotations

from typing import Annotated, Literal, get_args

from limits import parse_many
from pydantic import BeforeValidator, Field, field_validator
from pydantic_settings import NoDecode

from mesh.kit.settings import (
    FileServiceAddress,
    ImageServiceAddress,
    InferenceServiceAddress,
    QueueServiceAddress,
    json_list,
)

AuthMode = Literal["off", "api_key", "jwt", "any"]

ServiceName = Literal["file", "image", "inference", "queue"]


UPLOAD_FORM_HEADROOM_BYTES = 64 * 1024
"""What a ``POST /v1/images`` body may carry beyond the image itself: a multipart form's boundaries, part headers
and small fields (a filename, labels)."""


class GatewaySettings(FileServiceAddress, ImageServiceAddress, InferenceServiceAddress, QueueServiceAddress):
    """Settings of the REST gateway, which calls every service."""

    http_host: str = "0.0.0.0"
    """Interface the HTTP server binds."""

    http_port: int = Field(default=8080, ge=0, le=65535)
    """HTTP port of the REST API, the web page, /metrics and the health endpoints."""

    forwarded_allow_ips: str = "127.0.0.1"
    """Proxies whose ``X-Forwarded-For`` and ``X-Forwarded-Proto`` are believed (comma-separated addresses or
    networks, ``*`` for any peer). Behind an ingress, set it to the ingress's addresses: the client's own address
    then keys rate limits (with authentication off) and logs, and redirects keep the client's scheme. Only a
    peer that cannot be reached past the proxy may be trusted with ``*``."""

    max_upload_bytes: int = Field(default=25 * 1024 * 1024, gt=0)
    """Largest image accepted by ``POST /v1/images``: the file service's setting of the same name, which one
    value should set for both. The request body may be 64 KiB larger (``UPLOAD_FORM_HEADROOM_BYTES``: a multipart
    form's boundaries and other fields); a larger body -> 413 before it is read."""

    max_json_bytes: int = Field(default=36 * 1024 * 1024, gt=0)
    """Largest body of ``POST /v1/process`` and ``POST /v1/models/{name}:predict``, which carry images inline
    (base64 is 4/3 of the image); larger -> 413."""

    max_body_bytes: int = Field(default=1024 * 1024, gt=0)
    """Largest body of every other request (a job, a cancel), which carries no image; larger -> 413."""

    auth_mode: AuthMode = "off"
    """``off`` (local use), ``api_key`` (X-API-Key header), ``jwt`` (Bearer token) or ``any`` of the two."""

    jwt_secret: str = ""
    """HS256 secret for bearer tokens (used when ``MESH_JWT_PUBLIC_KEY`` is empty)."""

    jwt_public_key: str = ""
    """PEM public key for bearer tokens, RSA (RS256), EC (ES256/384/512) or Ed25519 (EdDSA), read at start;
    takes precedence over ``MESH_JWT_SECRET``."""

    jwt_issuer: str = "mesh"
    """Required ``iss`` claim of bearer tokens."""

    jwt_audience: str = "mesh-gateway"
    """Required ``aud`` claim of bearer tokens."""

    jwt_leeway_seconds: float = Field(default=30.0, ge=0)
    """Clock skew tolerated when checking ``exp``/``nbf``/``iat``."""

    cors_origins: Annotated[list[str], NoDecode, BeforeValidator(json_list)] = Field(default_factory=list)
    """Origins allowed to call the API from a browser (JSON list); empty allows none but the page itself."""

    rate_limit: str = "600/minute"
    """Requests allowed per caller (API key, token subject or client IP) and route, in ``limits`` notation."""

    rate_limit_enabled: bool = True
    """Whether rate limits are enforced at all."""

    health_timeout_seconds: float = Field(default=1.5, gt=0)
    """How long one probe of the health dashboard may take before it counts as failing."""

    required_services: Annotated[list[ServiceName], NoDecode, BeforeValidator(json_list)] = Field(
        default_factory=lambda: list(get_args(ServiceName))
    )
    """Services that must answer SERVING for /readyz to be 200 (JSON list of ``file``, ``image``,
    ``inference``, ``queue``)."""

    file_service_http: str = "localhost:9101"
    """host:port of the file service's HTTP port (its /healthz feeds the dashboard)."""

    image_service_http: str = "localhost:9102"
    """host:port of the image processing service's HTTP port."""

    inference_service_http: str = "localhost:9103"
    """host:port of the inference service's HTTP port."""

    queue_service_http: str = "localhost:9104"
    """host:port of the queue service's HTTP port."""

    sse_keepalive_seconds: float = Field(default=15.0, gt=0)
    """Interval of SSE comment lines that keep idle event streams open through proxies."""

    grace_seconds: float = Field(default=10.0, ge=0)
    """How long in-flight requests may run after SIGTERM."""

    @field_validator("rate_limit")
    @classmethod
    def _one_rate_limit(cls, value: str) -> str:
        """Parsed as the rate limiter parses it, so that a bad limit stops the start here, named, rather than
        the gateway's wiring with a traceback; the limiter applies one limit, so a second would be ignored."""
        try:
            limits = parse_many(value)
        except ValueError:
            raise ValueError("not a rate limit such as 600/minute or 10/second") from None
        if len(limits) != 1:
            raise ValueError("one limit only (such as 600/minute): the gateway applies a single limit")
        return value
