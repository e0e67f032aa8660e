"""The health dashboard's data and readiness: every service and dependency, probed concurrently, with latency.

Sources: each service's ``grpc.health.v1`` Check (the gateway's own view), each service's HTTP ``/healthz``
(its dependency checks: PostgreSQL, RabbitMQ, blob store, GPU...), the queue service's statistics (depths),
the image service's device (GPU or CPU backend), and the gateway's own checks (its key store). The blob store
is the file service's (its ``blob_store`` check), so it shows once, as the file service sees it.

The routes are open, so the details they show name no network address (``public_detail``: a driver's error
names its database's host), and a round of probes is shared: requests within ``FRESH_SECONDS`` of a round get its
result, and requests during a round wait for it (one round however many tabs or probes ask).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from typing import Generic, Literal, TypeVar

import grpc
import httpx
from grpc_health.v1 import health_pb2

from mesh.image.v1 import image_processing_service_pb2 as image_pb
from mesh.kit.health import DependencyCheck, public_detail, run_check
from mesh.kit.logging import get_logger
from mesh.queue.v1 import queue_service_pb2 as queue_pb
from mesh.services.gateway import convert
from mesh.services.gateway.backends import Backends, ServiceEndpoint
from mesh.services.gateway.schemas import ComponentHealth, HealthOut, QueueHealth, ReadyOut
from mesh.services.gateway.settings import GatewaySettings

log = get_logger(__name__)

GATEWAY = "gateway"
FRESH_SECONDS = 2.0
"""How long the result of a round of probes answers the dashboard and readiness."""
# What a service's /healthz says of a check, as the dashboard shows it; anything else is failing.
_REPORTED: dict[str, Literal["ok", "degraded", "failing"]] = {
    "ok": "ok",
    "degraded": "degraded",
    "failing": "failing",
}


def _service_component(key: str) -> str:
    return f"{key} service"


T = TypeVar("T")


class _Shared(Generic[T]):
    """One producer's result shared: callers within ``fresh_seconds`` of the start of the last round get its
    result, and callers while a round runs wait for that round. Whatever a round returns is kept, a failing
    answer too: while a backend is down, each caller would otherwise wait out its timeout again."""

    def __init__(self, produce: Callable[[], Awaitable[T]], fresh_seconds: float) -> None:
        self._produce = produce
        self._fresh_seconds = fresh_seconds
        self._last: tuple[float, T] | None = None
        self._round: asyncio.Task[T] | None = None

    async def get(self) -> T:
        if self._last is not None and time.monotonic() - self._last[0] < self._fresh_seconds:
            return self._last[1]
        if self._round is None:
            self._round = asyncio.create_task(self._run())
        # A caller that goes away (its client disconnected) leaves the round to the others.
        return await asyncio.shield(self._round)

    async def _run(self) -> T:
        started = time.monotonic()
        try:
            value = await self._produce()
        finally:
            self._round = None
        self._last = (started, value)
        return value


class HealthProbe:
    """Collects the dashboard and decides readiness."""

    def __init__(
        self,
        settings: GatewaySettings,
        backends: Backends,
        http: httpx.AsyncClient,
        own_checks: Sequence[DependencyCheck] = (),
        fresh_seconds: float = FRESH_SECONDS,
    ) -> None:
        self._settings = settings
        self._backends = backends
        self._http = http
        self._own_checks = list(own_checks)
        self._timeout = settings.health_timeout_seconds
        self._components = _Shared(self._probe_components, fresh_seconds)
        # Its own round, which readiness does not wait for: the statistics count jobs in PostgreSQL.
        self._queue = _Shared(self._queue_stats, fresh_seconds)

    async def collect(self) -> HealthOut:
        """The dashboard: every probe, at once, at most about ``fresh_seconds`` old; never raises."""
        (checked_at, components), queue = await asyncio.gather(self._components.get(), self._queue.get())
        # "failing" where the mesh is not ready (what /readyz answers 503 for); "degraded" where something
        # fails or degrades but every required service still serves. A service down read "degraded" before.
        if self._blocking(components):
            status: Literal["ok", "degraded", "failing"] = "failing"
        elif any(c.status in ("failing", "degraded") for c in components):
            status = "degraded"
        else:
            status = "ok"
        return HealthOut(status=status, checked_at=checked_at, components=components, queue=queue)

    async def readiness(self) -> ReadyOut:
        """Ready when every required service answers and none of them, nor the gateway, reports an essential
        dependency failing (a degraded one, such as RabbitMQ behind the queue's outbox, does not count)."""
        _, components = await self._components.get()
        failing = self._blocking(components)
        return ReadyOut(status="not ready" if failing else "ready", failing=failing)

    async def _probe_components(self) -> tuple[str, list[ComponentHealth]]:
        """When the round started, and every service's and dependency's state."""
        checked_at = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        probes: list[Awaitable[list[ComponentHealth]]] = []
        for endpoint in self._backends.endpoints:
            probes.append(self._grpc_health(endpoint))
            probes.append(self._http_health(endpoint))
        probes.append(self._device())
        probes.append(self._gateway_checks())
        groups = await asyncio.gather(*probes)
        return checked_at, [c for group in groups for c in group]

    def _blocking(self, components: list[ComponentHealth]) -> list[ComponentHealth]:
        """The failing components that make the mesh not ready: a required service, or an essential
        dependency of one (or of the gateway)."""
        required = {_service_component(k) for k in self._settings.required_services} | {GATEWAY}
        return [
            c
            for c in components
            if c.status == "failing" and (c.name if c.kind == "service" else c.source) in required
        ]

    async def _timed(
        self, component: str, probe: Callable[[], Awaitable[str]]
    ) -> tuple[bool | None, float, str]:
        """Whether ``probe`` answered, how long it took, and a detail fit for the open dashboard: gRPC's own
        text names addresses ("ipv4:10.0.3.7:50053: Connection refused"), so it goes to the log only."""
        started = time.perf_counter()
        try:
            detail = await asyncio.wait_for(probe(), self._timeout)
            ok: bool | None = True
        except TimeoutError:
            ok, detail = False, f"no answer within {self._timeout:g}s"
        except _Failing as failing:
            ok, detail = False, str(failing)
        except grpc.aio.AioRpcError as error:
            log.warning(
                "health probe failed", component=component, code=error.code().name, error=error.details()
            )
            ok, detail = False, _rpc_detail(error.code(), self._timeout)
        except Exception as error:
            log.warning("health probe failed", component=component, error=f"{type(error).__name__}: {error}")
            ok, detail = False, f"the probe failed ({type(error).__name__})"
        return ok, (time.perf_counter() - started) * 1000, detail

    async def _grpc_health(self, endpoint: ServiceEndpoint) -> list[ComponentHealth]:
        async def probe() -> str:
            response = await endpoint.health.Check(
                health_pb2.HealthCheckRequest(service=endpoint.service), timeout=self._timeout
            )
            name = health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
            if response.status != health_pb2.HealthCheckResponse.SERVING:
                raise _Failing(f"{endpoint.service} is {name}")
            return f"{endpoint.service} is {name}"

        ok, latency, detail = await self._timed(_service_component(endpoint.key), probe)
        return [
            ComponentHealth(
                name=_service_component(endpoint.key),
                kind="service",
                status="ok" if ok else "failing",
                latency_ms=round(latency, 3),
                detail=detail,
                source=GATEWAY,
            )
        ]

    async def _http_health(self, endpoint: ServiceEndpoint) -> list[ComponentHealth]:
        source = _service_component(endpoint.key)
        try:
            response = await self._http.get(f"http://{endpoint.http_address}/healthz", timeout=self._timeout)
            checks = response.json().get("checks", [])
        except (httpx.HTTPError, ValueError, AttributeError) as error:
            # The gRPC check above already says whether the service answers; this only adds detail.
            return [
                ComponentHealth(
                    name=f"{endpoint.key} /healthz",
                    kind="dependency",
                    status="unknown",
                    latency_ms=None,
                    detail=f"dependency report unavailable: {type(error).__name__}",
                    source=source,
                )
            ]
        return [
            ComponentHealth(
                name=str(check.get("name", "?")),
                kind="dependency",
                status=_REPORTED.get(str(check.get("status")), "failing"),
                latency_ms=check.get("latency_ms"),
                detail=public_detail(str(check.get("detail", ""))),
                source=source,
            )
            for check in checks
            if isinstance(check, dict)
        ]

    async def _device(self) -> list[ComponentHealth]:
        device = ""

        async def probe() -> str:
            nonlocal device
            response = await self._backends.image_stub.ListFilters(
                image_pb.ListFiltersRequest(), timeout=self._timeout
            )
            device = convert.device(response.device)
            return "image processing runs on the GPU" if device == "gpu" else "no GPU in use: CPU backend"

        ok, latency, detail = await self._timed("gpu", probe)
        return [
            ComponentHealth(
                name="gpu",
                kind="dependency",
                status="ok" if ok else "unknown",
                latency_ms=round(latency, 3),
                detail=detail,
                source=_service_component("image"),
            )
        ]

    async def _gateway_checks(self) -> list[ComponentHealth]:
        results = await asyncio.gather(*(run_check(c, self._timeout) for c in self._own_checks))
        components = [
            ComponentHealth(
                name=r.name,
                kind="gateway",
                status="ok" if r.ok else "failing",
                latency_ms=round(r.latency_seconds * 1000, 3),
                detail=public_detail(r.detail),
                source=GATEWAY,
            )
            for r in results
        ]
        return components

    async def _queue_stats(self) -> QueueHealth | None:
        try:
            stats = await self._backends.queue_stub.GetQueueStats(
                queue_pb.GetQueueStatsRequest(), timeout=self._timeout
            )
        except grpc.aio.AioRpcError:
            return None
        return QueueHealth(
            jobs_by_state={k.removeprefix("JOB_STATE_"): v for k, v in stats.jobs_by_state.items()},
            queues=[
                {
                    "queue": q.queue,
                    "jobs_by_state": {k.removeprefix("JOB_STATE_"): v for k, v in q.jobs_by_state.items()},
                    "broker_ready": q.broker_ready,
                }
                for q in stats.queues
            ],
            oldest_queued_age_seconds=stats.oldest_queued_age_seconds,
            recent_throughput_per_second=stats.recent_throughput_per_second,
            dead_letters=stats.dead_letters,
        )


def _rpc_detail(code: grpc.StatusCode, timeout: float) -> str:
    """What a failed probe call says on the dashboard: plain words and the status name."""
    if code == grpc.StatusCode.UNAVAILABLE:
        return "not answering (UNAVAILABLE)"
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return f"no answer within {timeout:g}s (DEADLINE_EXCEEDED)"
    return f"the health check failed ({code.name})"


class _Failing(Exception):
    """A probe answered, and the answer is bad."""
