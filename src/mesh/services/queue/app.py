"""The queue service assembled: repository, broker, relay, reconciler, dead-letter consumer and the API.

``server.queue_service`` runs it under the kit's :class:`~mesh.kit.runtime.ServiceRuntime`; tests build it
the same way with their own settings::

    app = QueueApp(settings)
    await app.start()                      # migrate (or go on migrating in the background), open the pool
    runtime = app.runtime()                # health checks, and the API refused until the schema is in place
    app.install(runtime)                   # servicer, background tasks
    ...
    await app.close()
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Awaitable, Callable
from datetime import timedelta

from prometheus_client import Gauge

from mesh.kit.db import PostgresCheck
from mesh.kit.health import Degrading, DependencyCheck, FunctionCheck
from mesh.kit.logging import describe, get_logger
from mesh.kit.migrations import SchemaMigrations
from mesh.kit.runtime import ServiceRuntime, sleep_unless_stopping
from mesh.queue.v1 import queue_service_pb2_grpc
from mesh.services.queue import repository
from mesh.services.queue.broker import Broker
from mesh.services.queue.dead_letters import DeadLetterConsumer
from mesh.services.queue.reconciler import Reconciler
from mesh.services.queue.references import ServiceReferences
from mesh.services.queue.relay import OUTBOX_BACKLOG, OutboxRelay
from mesh.services.queue.relay_process import RelayProcess
from mesh.services.queue.repository import JobRepository, open_pool
from mesh.services.queue.servicer import QueueServicer
from mesh.services.queue.settings import SERVICE_NAME, QueueSettings
from mesh.services.queue.states import JobState

log = get_logger(__name__)

MIGRATIONS = repository.MIGRATIONS

QUEUE_DEPTH = Gauge("mesh_queue_jobs", "Jobs per queue and state.", ["queue", "state"])
OLDEST_QUEUED = Gauge(
    "mesh_queue_oldest_queued_age_seconds", "Age of the oldest queued job per queue.", ["queue"]
)
OUTBOX_OLDEST = Gauge("mesh_queue_outbox_oldest_age_seconds", "Age of the oldest unconfirmed dispatch.")

STARTUP_MIGRATION_SECONDS = 10.0
"""How long start-up waits for PostgreSQL to migrate before it serves and goes on in the background (the file
service's ``MESH_STARTUP_MIGRATION_SECONDS`` default)."""


class QueueApp:
    """Everything the queue service process runs."""

    def __init__(self, settings: QueueSettings) -> None:
        self.settings = settings
        self.migrations = SchemaMigrations(settings.database_url, "queue", MIGRATIONS)
        self.pool = open_pool(settings.database_url, name="queue", max_size=settings.db_pool_max_size)
        self.repository = JobRepository(self.pool)
        self.broker = Broker(
            settings.amqp_url,
            delivery_limit=settings.delivery_limit,
            reconnect_seconds=settings.amqp_reconnect_seconds,
            name="queue-service",
        )
        self.relay: OutboxRelay | RelayProcess = (
            RelayProcess(settings)
            if settings.relay_process
            else OutboxRelay(
                self.repository,
                self.broker,
                batch_size=settings.relay_batch_size,
                poll_seconds=settings.relay_poll_seconds,
                lock_seconds=settings.relay_lock_seconds,
                publish_timeout=settings.publish_timeout_seconds,
            )
        )
        self.servicer = QueueServicer(
            self.repository,
            queue_prefix=settings.queue_prefix,
            default_max_attempts=settings.default_max_attempts,
            backoff_base_seconds=settings.backoff_base_seconds,
            backoff_cap_seconds=settings.backoff_cap_seconds,
            watch_poll_seconds=settings.watch_poll_seconds,
            on_dispatch=self.relay.wake,
            broker=self.broker,
        )
        self.reconciler = Reconciler(
            self.repository,
            ready_count=self.broker.ready_count,
            queues=self.servicer.queues,
            interval_seconds=settings.reconcile_interval_seconds,
            stale_queued_seconds=settings.stale_queued_seconds,
            retention_seconds=timedelta(days=settings.job_retention_days).total_seconds(),
            prune_interval_seconds=settings.prune_interval_seconds,
            on_dispatch=self.relay.wake,
        )
        self.broker_ready = asyncio.Event()
        """Set once RabbitMQ answered and the job queues are declared."""
        self.dead_letters = DeadLetterConsumer(
            self.repository,
            self.broker,
            self.servicer.queues,
            delivery_limit=settings.delivery_limit,
            on_dispatch=self.relay.wake,
            declared=self.broker_ready,
        )

    def checks(self) -> list[DependencyCheck]:
        """PostgreSQL through the service's pool, the schema's migrations, and two whose failure only degrades
        the service (submits are kept in the outbox and every other call reads PostgreSQL): the RabbitMQ
        connection, and the outbox's age, which tells whether jobs are dispatched at all."""
        return [
            PostgresCheck(self.pool),
            self.migrations,
            Degrading(FunctionCheck("rabbitmq", self.broker.check)),
            Degrading(FunctionCheck("outbox", self.check_outbox)),
        ]

    async def check_outbox(self) -> str:
        """Raise while the oldest dispatch in the outbox has waited over ``outbox_stale_seconds``. The rabbitmq
        check tests this process's connection, not the relay's, and a relay child that hangs stays alive: only
        the outbox shows that accepted jobs are not being dispatched."""
        if not self.migrations.applied.is_set():
            return "not checked until the schema is in place"
        waiting, age = await self.repository.outbox_backlog()
        limit = self.settings.outbox_stale_seconds
        if age > limit:
            raise RuntimeError(
                f"jobs are not being dispatched: the oldest of {waiting} dispatches in the outbox has waited"
                f" {age:.0f}s (over {limit:g}s)"
            )
        return f"{waiting} dispatches waiting, the oldest for {age:.1f}s"

    def runtime(self) -> ServiceRuntime:
        """The service's runtime: its health checks, and its API answering UNAVAILABLE until the schema is in
        place."""
        return ServiceRuntime(
            "queue",
            self.settings,
            service_names=[SERVICE_NAME],
            checks=self.checks(),
            interceptors=[self.migrations.gate([SERVICE_NAME])],
        )

    async def start(self, *, migration_seconds: float = STARTUP_MIGRATION_SECONDS) -> None:
        """Migrate, waiting up to ``migration_seconds`` for PostgreSQL, and open the pool. Without PostgreSQL
        the service still starts, NOT_SERVING, and ``install`` migrates in the background: migrating before
        serving made a pod started during a longer outage exit, into a crash loop. RabbitMQ is connected to
        in the background too (``connect_broker``)."""
        await self.migrations.try_once(timeout=migration_seconds)
        await self.pool.open(wait=False)
        if self.settings.reference_check_seconds > 0:
            self.servicer.references = ServiceReferences.connect(
                self.settings, self.settings.reference_check_seconds
            )

    async def connect_broker(self) -> None:
        """Connect to RabbitMQ, retrying until it answers, and declare the job queues (both lanes of each, with
        their dead-letter exchange and queue). The service serves meanwhile, as in any broker outage: submits
        wait in the outbox and the health check says degraded; a pod started while the broker is away is
        therefore not restarted by its startup probe. A connection refused, reset or timed out on the way is
        tried again with backoff (``Broker.connect``, ``Broker.declare_retrying``); only a declaration the
        broker refuses (a queue declared elsewhere with other arguments: PRECONDITION_FAILED) stops the
        service."""
        await self.broker.connect()
        for queue in self.servicer.queues:
            await self.broker.declare_retrying(queue)
        self.broker_ready.set()

    def install(self, runtime: ServiceRuntime) -> None:
        """Add the API to the runtime's server and the background loops to its tasks: the migrations until
        they are in, and the loops that use the tables once they are."""
        queue_service_pb2_grpc.add_QueueServiceServicer_to_server(self.servicer, runtime.server)
        stopping = runtime.stopping
        self.servicer.stopping = stopping
        runtime.add_background(lambda: self.migrations.run_until_applied(stopping))
        runtime.add_background(self.connect_broker)
        for loop in (self.relay.run, self.reconciler.run, self.dead_letters.run, self.refresh_gauges):
            runtime.add_background(functools.partial(self._once_migrated, loop, stopping))

    async def _once_migrated(
        self, loop: Callable[[asyncio.Event], Awaitable[None]], stopping: asyncio.Event
    ) -> None:
        """``loop`` once the schema is in place, unless the service stops first."""
        if await self.migrations.wait(stopping):
            await loop(stopping)

    async def refresh_gauges(self, stopping: asyncio.Event) -> None:
        """Keep the depth and age gauges current."""
        while not stopping.is_set():
            try:
                counts = await self.repository.counts()
                # Every state of every queue is set, 0 included: the counts hold only the states that have
                # jobs, and a gauge left alone keeps its last value (phantom QUEUED jobs once a queue drains).
                for queue in {*self.servicer.queues, *(q for q, _ in counts.by_queue_state)}:
                    for state in JobState:
                        QUEUE_DEPTH.labels(queue, state).set(counts.by_queue_state.get((queue, state), 0))
                    oldest = counts.oldest_queued_at.get(queue)
                    age = (counts.now - oldest).total_seconds() if oldest else 0.0
                    OLDEST_QUEUED.labels(queue).set(max(0.0, age))
                backlog, age = await self.repository.outbox_backlog()
                OUTBOX_BACKLOG.set(backlog)
                OUTBOX_OLDEST.set(age)
            except Exception as exc:
                log.warning("queue gauges not refreshed", error=describe(exc))
            await sleep_unless_stopping(stopping, self.settings.stats_interval_seconds)

    async def close(self) -> None:
        """Close the lookup channels, disconnect from RabbitMQ and close the pool."""
        await self.servicer.references.close()
        await self.broker.close()
        await self.pool.close()
