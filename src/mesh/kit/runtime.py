"""The one server bootstrap: gRPC server, health, reflection, metrics/health HTTP port, graceful drain.

Usage: a service's wiring is one ``@asynccontextmanager`` that builds what the service needs, yields the ready
runtime and closes what it opened, in reverse order, on exit; its ``__main__`` hands it to :func:`run_service`::

    @asynccontextmanager
    async def file_service(settings: FileSettings) -> AsyncIterator[ServiceRuntime]:
        runtime = ServiceRuntime("file", settings, service_names=[...], checks=[...])
        add_FileServiceServicer_to_server(servicer, runtime.server)
        yield runtime            # run() returns after SIGTERM/SIGINT and a graceful drain

    run_service("file", FileSettings, file_service)

On SIGTERM: every health name goes NOT_SERVING (so load balancers stop sending), ``stopping`` is set (so
workers stop taking jobs, and calls that would last, such as a watch or a client stream, end:
:func:`pause_unless_stopping`, :func:`until_stopping`),
and the gRPC server turns new calls away. In-flight RPCs and background tasks (job workers) then share one
``grace_seconds``: whatever is still running at its end is cancelled. The HTTP port (``/healthz`` answering
503 NOT_SERVING, ``/metrics``) serves until the rest has stopped, then closes within what is left of the
grace (at least ``HTTP_STOP_SECONDS``), so a drain lasts at most ``grace_seconds`` plus that.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.metadata
import signal
from collections.abc import AsyncIterable, AsyncIterator, Callable, Coroutine, Sequence
from typing import Any, Protocol, TypeVar

import grpc
import uvicorn
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio  # type: ignore[attr-defined]
from grpc_reflection.v1alpha import reflection, reflection_pb2, reflection_pb2_grpc
from grpc_reflection.v1alpha._async import ReflectionServicer  # what reflection.aio names, typed
from prometheus_client import Info, disable_created_metrics, make_asgi_app
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Mount, Route
from starlette.types import ASGIApp, Receive, Scope, Send

from mesh.kit import errors, tracing
from mesh.kit.health import DependencyCheck, HealthMonitor
from mesh.kit.interceptors import ServerInterceptor, preinitialise_metrics
from mesh.kit.logging import configure_logging, get_logger
from mesh.kit.memory import limit_arenas, tune_allocator
from mesh.kit.settings import CommonSettings, ServerSettings, load_settings
from mesh.kit.supervision import stop_with_supervisor
from mesh.kit.tls import server_credentials

log = get_logger(__name__)

T = TypeVar("T")

LIVENESS_SERVICE = "liveness"
"""A health name that is SERVING while the process serves, whatever its dependencies say: liveness probes
ask it, so an outage of PostgreSQL makes pods unready (NOT_SERVING on the service names) but never
restarts them."""

KEEPALIVE_OPTIONS = [
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_recv_ping_interval_without_data_ms", 10_000),
    # A Service balances connections, not calls: closing each connection after about 5 minutes (gRPC adds
    # jitter) makes clients reconnect, so replicas an autoscaler adds get calls. Calls in flight then have 10
    # minutes to finish; a longer stream ends UNAVAILABLE (the gateway reopens its WatchJob streams).
    ("grpc.max_connection_age_ms", 300_000),
    ("grpc.max_connection_age_grace_ms", 600_000),
]


BUILD = Info("mesh_build", "The process's service and the mesh's version (value 1).")

HTTP_STOP_SECONDS = 1.0
"""The least time the HTTP port is given to close after the rest of a drain, even one that used its whole
grace: it answers only short requests (probes, scrapes)."""

RESTARTING = "the service is restarting; retry the call"
"""What a call that would outlast the drain (a watch) ends with, as UNAVAILABLE, when its service stops."""


async def sleep_unless_stopping(stopping: asyncio.Event, seconds: float) -> bool:
    """Wait ``seconds``, or only until ``stopping`` is set; True when it is set (at once when it already
    was), so that a loop that waits between its rounds ends as soon as its service stops."""
    if not stopping.is_set():
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await stopping.wait()
    return stopping.is_set()


async def pause_unless_stopping(stopping: asyncio.Event, seconds: float) -> None:
    """Wait ``seconds`` between the steps of a long call, ending the call with UNAVAILABLE (``RESTARTING``)
    as soon as ``stopping`` (``ServiceRuntime.stopping``) is set: the drain then does not wait out its whole
    grace for a call that would not end by itself, while the server turns new calls away, and the caller,
    told to retry, reopens it on another replica or after the restart."""
    if await sleep_unless_stopping(stopping, seconds):
        raise errors.Unavailable(RESTARTING)


async def until_stopping(requests: AsyncIterable[T], stopping: asyncio.Event) -> AsyncIterator[T]:
    """A client stream's requests until the client ends it or the service stops, and then UNAVAILABLE
    (``RESTARTING``): a stream the client keeps open would otherwise hold the drain for the whole grace.

    A handler reads its requests through this and answers the ones it has read before the error reaches it, so
    that a client learns from the responses it got which requests to send again on the stream it reopens.
    """
    iterator = aiter(requests)
    stopped = asyncio.ensure_future(stopping.wait())
    received: asyncio.Future[T] | None = None
    try:
        while True:
            received = asyncio.ensure_future(anext(iterator))
            await asyncio.wait((received, stopped), return_when=asyncio.FIRST_COMPLETED)
            if not received.done():
                raise errors.Unavailable(RESTARTING)
            try:
                request = received.result()
            except StopAsyncIteration:
                return
            yield request
    finally:
        stopped.cancel()
        # A read left behind (the service stops, or the handler is cancelled with its call) is cancelled, or its
        # outcome collected: nothing else would, and asyncio logs an uncollected one ("Task exception was
        # never retrieved") at ERROR.
        if received is not None:
            if not received.done():
                received.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await received


def message_limit_options(max_bytes: int) -> list[tuple[str, int]]:
    """Receive and send limits large enough for 4K frames."""
    return [("grpc.max_receive_message_length", max_bytes), ("grpc.max_send_message_length", max_bytes)]


def configure_observability(service: str, settings: CommonSettings | None = None) -> None:
    """Logging, tracing and metrics for a process; call once at start, before anything logs."""
    level = settings.log_level if settings else "info"
    fmt = settings.log_format if settings else "json"
    configure_logging(service, level=level, fmt=fmt)
    tracing.configure_tracing(service)
    # prometheus-client adds a `<name>_created` gauge beside every counter and histogram series, which
    # doubles what Prometheus stores for a timestamp that the process start time already tells.
    disable_created_metrics()  # type: ignore[no-untyped-call]


ServiceSettingsT = TypeVar("ServiceSettingsT", bound=CommonSettings)


def start_service(
    service: str, settings_type: type[ServiceSettingsT], *, large_messages: bool = False
) -> ServiceSettingsT:
    """The first steps of every service's process: few malloc arenas (:func:`~mesh.kit.memory.limit_arenas`,
    before any thread of its own), its settings from the environment (exit 2 naming each bad variable), logs,
    traces and metrics, a stop when the ``make up`` supervisor that started it dies, and for a service that
    moves frames of megabytes (``large_messages``), their buffers kept in the heap."""
    limit_arenas()
    settings = load_settings(settings_type)
    configure_observability(service, settings)
    # Which service answers on a metrics port, for dashboards and for MeshProcessDown, which tells the mesh's
    # scrape targets from others by it.
    BUILD.info({"service": service, "version": importlib.metadata.version("mesh")})
    stop_with_supervisor()
    if large_messages:
        tune_allocator()
    return settings


class Runnable(Protocol):
    """What a service's wiring yields: a :class:`ServiceRuntime`, or the gateway's ``GatewayRuntime`` (uvicorn,
    no gRPC server)."""

    async def run(self) -> None:
        """Serve until SIGTERM/SIGINT, then drain and return."""


ServiceWiring = Callable[[ServiceSettingsT], contextlib.AbstractAsyncContextManager[Runnable]]
"""A service's wiring: from its settings, a context manager that builds the service, yields it ready to run,
and closes what it opened (in reverse order) on exit, whether ``run()`` ended or the wiring failed half way."""


def run_service(
    service: str,
    settings_type: type[ServiceSettingsT],
    wiring: ServiceWiring[ServiceSettingsT],
    *,
    large_messages: bool = False,
) -> None:
    """A service's whole process, the one way every ``python -m mesh.services.<name>`` starts: settings, logs
    and traces (:func:`start_service`), then the event loop, in which ``wiring`` builds the service and its
    ``run()`` serves until SIGTERM. A :class:`~mesh.kit.errors.StartupError` on the way (a volume it may not
    write to, MESH_DEVICE=gpu without a GPU) ends the process with one line and exit status 2."""
    settings = start_service(service, settings_type, large_messages=large_messages)
    with errors.exit_on_startup_error(service):
        asyncio.run(_serve(wiring, settings))


async def _serve(wiring: ServiceWiring[ServiceSettingsT], settings: ServiceSettingsT) -> None:
    async with wiring(settings) as runtime:
        await runtime.run()


class BackgroundTaskCrashed(RuntimeError):
    """Raised by ServiceRuntime.run after the service stopped because a background task raised."""


REFLECTION_V1 = "grpc.reflection.v1.ServerReflection"


def enable_reflection(service_names: list[str], server: grpc.aio.Server) -> None:
    """Server reflection under both names clients ask for: ``grpc.reflection.v1alpha`` (what grpcio-reflection
    serves) and ``grpc.reflection.v1`` (what grpcurl and Postman try first; a client that knows only v1 found
    nothing). v1 is v1alpha renamed, field for field, so one servicer answers both; only v1alpha is listed, as
    the only one whose descriptor the servicer can give."""
    servicer = ReflectionServicer(service_names)
    reflection_pb2_grpc.add_ServerReflectionServicer_to_server(servicer, server)
    info = grpc.stream_stream_rpc_method_handler(
        servicer.ServerReflectionInfo,
        request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
        response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString,
    )
    server.add_generic_rpc_handlers(
        [grpc.method_handlers_generic_handler(REFLECTION_V1, {"ServerReflectionInfo": info})]
    )


class ServiceRuntime:
    """A gRPC service process: server, health monitor, HTTP port and signal-driven drain."""

    def __init__(
        self,
        name: str,
        settings: ServerSettings,
        *,
        service_names: Sequence[str],
        checks: Sequence[DependencyCheck] = (),
        interceptors: Sequence[grpc.aio.ServerInterceptor] = (),  # type: ignore[type-arg]
        options: Sequence[tuple[str, int]] = (),
    ) -> None:
        """``options``: the service's own gRPC server options, besides the kit's (message limits, keepalive),
        which they do not override (gRPC takes the first of a repeated key)."""
        self.name = name
        self.settings = settings
        self.stopping = asyncio.Event()
        self.started = asyncio.Event()
        self.health = health_aio.HealthServicer()
        self.server = grpc.aio.server(
            interceptors=[tracing.server_interceptor(), ServerInterceptor(), *interceptors],
            options=[*message_limit_options(settings.max_message_bytes), *KEEPALIVE_OPTIONS, *options],
        )
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        self._service_names = list(service_names)
        self.monitor = HealthMonitor(
            self.health,
            self._service_names,
            checks,
            interval=settings.health_interval_seconds,
            timeout=settings.health_timeout_seconds,
        )
        self._background: list[Callable[[], Coroutine[Any, Any, None]]] = []
        self.failure: BaseException | None = None
        """The exception of a background task that crashed: the service then stops, and run() raises
        BackgroundTaskCrashed."""
        self.grpc_port = 0
        self.http_port = 0

    def add_background(self, task: Callable[[], Coroutine[Any, Any, None]]) -> None:
        """Run ``task`` while serving; it should watch ``stopping`` and return, or it is cancelled."""
        self._background.append(task)

    def _bind(self) -> int:
        address = f"{self.settings.grpc_host}:{self.settings.grpc_port}"
        credentials = server_credentials(self.settings)
        try:
            if credentials is None:
                port = self.server.add_insecure_port(address)
            else:
                port = self.server.add_secure_port(address, credentials)
        except RuntimeError:  # gRPC's own words name no cause ("set GRPC_VERBOSITY=debug ...")
            port = 0
        if port == 0:
            # On a wildcard address gRPC only logs the failure and answers port 0: the process ran on, healthy
            # on its HTTP port, with no gRPC port at all.
            raise errors.StartupError(
                f"gRPC port {address} could not be bound (in use by another process?); stop what holds it, or "
                "set MESH_GRPC_PORT"
            )
        return port

    def http_app(self) -> Starlette:
        """/metrics (Prometheus) and /healthz (dependency results, 503 when not serving)."""

        async def healthz(_: Request) -> JSONResponse:
            body = {
                "service": self.name,
                "status": "SERVING" if self.monitor.serving and not self.stopping.is_set() else "NOT_SERVING",
                "checks": [r.as_dict() for r in self.monitor.results],
            }
            return JSONResponse(body, status_code=200 if body["status"] == "SERVING" else 503)

        metrics = make_asgi_app()
        # The mount alone answers /metrics, the path scrape configs and probes name, with a 307 to /metrics/.
        return Starlette(
            routes=[
                Route("/healthz", healthz),
                Route("/metrics", _Asgi(metrics)),
                Mount("/metrics", app=metrics),
            ]
        )

    async def run(self) -> None:
        """Serve until SIGTERM/SIGINT, then drain and stop."""
        names = [
            *self._service_names,
            reflection.SERVICE_NAME,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
        ]
        enable_reflection(names, self.server)
        preinitialise_metrics(self._service_names)
        for name in ["", *self._service_names]:
            await self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        try:
            self.grpc_port = self._bind()
        except errors.StartupError:
            await self.server.stop(None)  # never started, but gRPC shuts it down on collection otherwise
            raise
        await self.server.start()
        await self.health.set(LIVENESS_SERVICE, health_pb2.HealthCheckResponse.SERVING)
        http = uvicorn.Server(
            uvicorn.Config(
                self.http_app(),
                host=self.settings.http_host,
                port=self.settings.http_port,
                log_config=None,
                access_log=False,
                lifespan="off",
                # Its start and stop lines ("Uvicorn running on ... (Press CTRL+C to quit)") only repeated,
                # misleadingly under `make up` or Kubernetes, what "service started" says with both ports.
                log_level="warning",
            )
        )
        http_task = asyncio.create_task(_serve_http(http), name="http")
        while not http.started and not http_task.done():
            await asyncio.sleep(0.01)
        if http_task.done():
            # The gRPC server, started, stops here rather than on collection, when the loop that would await
            # its shutdown has gone.
            await self.server.stop(None)
            address = f"{self.settings.http_host}:{self.settings.http_port}"
            raise errors.StartupError(
                f"HTTP port {address} could not be bound (in use by another process?); stop what holds it, or "
                "set MESH_HTTP_PORT"
            )
        self.http_port = http.servers[0].sockets[0].getsockname()[1]
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stopping.set)
        monitor_task = asyncio.create_task(self.monitor.run(), name="health-monitor")
        await self.monitor.check_now()
        tasks = [asyncio.create_task(c, name=_name_of(c)) for c in [t() for t in self._background]]
        for task in tasks:
            task.add_done_callback(self._on_background_end)
        log.info(
            "service started",
            grpc_port=self.grpc_port,
            http_port=self.http_port,
            tls=self.settings.tls_mode,
            serving=self.monitor.serving,
        )
        self.started.set()
        await self.stopping.wait()
        grace = self.settings.grace_seconds
        deadline = loop.time() + grace
        log.info("draining", grace_seconds=grace)
        monitor_task.cancel()
        await self.health.enter_graceful_shutdown()
        # One deadline for the whole drain: the server refuses new calls from now on and its calls in flight
        # run out their grace alongside the background tasks, rather than one after the other (twice the
        # grace, past the kubelet's SIGKILL), with new calls still let in meanwhile.
        server_stopped = asyncio.create_task(self.server.stop(grace), name="grpc-stop")
        await _finish(tasks, max(deadline - loop.time(), 0.0))
        await server_stopped
        http.should_exit = True
        await _finish([http_task, monitor_task], max(deadline - loop.time(), HTTP_STOP_SECONDS))
        tracing.shutdown_tracing()
        log.info("stopped")
        if self.failure is not None:
            # The process exits 1 for its supervisor to restart it; the cause was logged when it happened.
            raise BackgroundTaskCrashed("a background task crashed; see the log line above") from self.failure

    def _on_background_end(self, task: asyncio.Task[None]) -> None:
        """A background task (a job worker, the relay, a sweep) that raised stops the service: serving on
        without it, the process would look healthy and do nothing, and its error would show nowhere."""
        if task.cancelled() or (error := task.exception()) is None:
            return
        log.error("background task crashed; stopping", task=task.get_name(), exc_info=error)
        if self.failure is None:
            self.failure = error
        self.stopping.set()


async def _serve_http(http: uvicorn.Server) -> None:
    """uvicorn's ``serve``, ending (before ``started``) where uvicorn would exit the process: it logs why it
    cannot bind its port and raises SystemExit, which, raised in a task, leaves the event loop itself and
    abandoned the start half way (exit status 3, the started gRPC server never stopped)."""
    with contextlib.suppress(SystemExit):
        await http.serve()


class _Asgi:
    """An ASGI app as a route's endpoint: Starlette takes a plain function (what prometheus_client's app is)
    for a request handler."""

    def __init__(self, app: ASGIApp) -> None:
        self._app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self._app(scope, receive, send)


def _name_of(coroutine: Coroutine[Any, Any, None]) -> str:
    """What a log line calls a background task: its code's name (``OutboxRelay.run``)."""
    code = getattr(coroutine, "cr_code", None)
    return str(code.co_qualname) if code is not None else type(coroutine).__name__


async def _finish(tasks: Sequence[asyncio.Task[None]], timeout: float) -> None:
    """Wait for tasks to end by themselves, cancel what is left."""
    if not tasks:
        return
    _, pending = await asyncio.wait(tasks, timeout=timeout)
    for task in pending:
        task.cancel()
    for task in tasks:
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
