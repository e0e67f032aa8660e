"""Open routes: liveness, readiness, the health dashboard's data, Prometheus metrics and the web page."""

from __future__ import annotations

from importlib import resources

from fastapi import APIRouter
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest
from starlette.responses import HTMLResponse, Response

from mesh.services.gateway import schemas
from mesh.services.gateway.context import Context

router = APIRouter(tags=["system"])

PAGE_POLICY = (
    "default-src 'self'; img-src 'self' data: blob:; object-src 'none'; base-uri 'none'; "
    "form-action 'self'; frame-ancestors 'none'"
)
"""The page's Content-Security-Policy (on "/" and /static): it has no inline code, its icon is a ``data:`` URL
and its result images ``blob:`` URLs. The API key is kept in localStorage, where any injected script could
read it; this keeps such a script from running or sending it elsewhere."""


@router.get("/healthz", summary="Liveness")
async def healthz() -> dict[str, str]:
    """200 while the process serves."""
    return {"status": "ok"}


@router.get(
    "/readyz",
    response_model=schemas.ReadyOut,
    responses={503: {"model": schemas.ReadyOut, "description": "Something the gateway needs is failing."}},
    summary="Readiness",
)
async def readyz(ctx: Context) -> JSONResponse:
    """200 when every service and dependency the gateway needs answers; else 503 naming the failing ones.
    The probes' answers are at most about 2 s old (one round serves every request meanwhile)."""
    ready = await ctx.health.readiness()
    return JSONResponse(ready.model_dump(mode="json"), status_code=200 if ready.status == "ready" else 503)


@router.get("/v1/health", response_model=schemas.HealthOut, summary="The health dashboard's data")
async def health(ctx: Context) -> schemas.HealthOut:
    """Every service (gRPC health) and dependency (PostgreSQL, RabbitMQ, blob store, GPU), with latency,
    and the queue's statistics; at most about 2 s old (one round serves every request meanwhile)."""
    return await ctx.health.collect()


@router.get("/metrics", include_in_schema=False)
async def prometheus_metrics() -> Response:
    """Prometheus exposition of this process's metrics."""
    return Response(generate_latest(REGISTRY), media_type=CONTENT_TYPE_LATEST)


@router.get("/", include_in_schema=False)
async def web_page() -> HTMLResponse:
    """The web page (static HTML; its script and style come from /static)."""
    page = resources.files("mesh.services.gateway").joinpath("static/index.html").read_text()
    return HTMLResponse(page, headers={"Cache-Control": "no-cache", "Content-Security-Policy": PAGE_POLICY})
