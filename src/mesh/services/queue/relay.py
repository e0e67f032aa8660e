"""The outbox relay: publishes dispatches written by PostgreSQL transactions to RabbitMQ.

A round locks a batch of outbox rows (highest priority first), publishes each as a ``JobDispatch`` with
publisher confirms to the lane of its job queue that its priority selects (``topology.lane_for``: 5-9 to
``<queue>.high``, 0-4 to ``<queue>``) with the priority in the AMQP ``priority`` property, and deletes
exactly the rows the broker confirmed; rows that failed are released for a later round. Rows whose lock ran
out without a confirm (a relay that died mid-round) are taken again by any relay, so a dispatch is published
at least once; workers drop duplicates by fencing. The metrics' ``queue`` label is the job queue, not the
lane.

Each publish is a PRODUCER span, the child of the trace context stored with the job at submit, and its
context travels in the message headers (W3C ``traceparent``/``tracestate``): the worker's consumer span is
its child and links to it, so a job, and a retry dispatched hours later, stays in the submitter's trace.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from opentelemetry import trace
from prometheus_client import Counter, Gauge

from mesh.kit import tracing
from mesh.kit.logging import describe, get_logger
from mesh.queue.v1 import job_pb2
from mesh.services.queue.broker import Broker
from mesh.services.queue.repository import JobRepository
from mesh.services.queue.topology import lane_for

log = get_logger(__name__)
tracer = tracing.tracer(__name__)

PUBLISHED = Counter("mesh_queue_dispatches_published_total", "Dispatches confirmed by RabbitMQ.", ["queue"])
PUBLISH_FAILURES = Counter(
    "mesh_queue_dispatch_publish_failures_total", "Dispatches RabbitMQ did not confirm.", ["queue"]
)
OUTBOX_BACKLOG = Gauge("mesh_queue_outbox_backlog", "Dispatches waiting in the outbox for a confirm.")
DISPATCH_TYPE = job_pb2.JobDispatch.DESCRIPTOR.full_name


class OutboxRelay:
    """Publishes outbox rows; wake it after a commit that wrote one, or it polls."""

    def __init__(
        self,
        repository: JobRepository,
        broker: Broker,
        *,
        batch_size: int = 256,
        poll_seconds: float = 0.5,
        lock_seconds: float = 30.0,
        publish_timeout: float = 10.0,
        retry_delay_seconds: float = 0.5,
    ) -> None:
        self.repository = repository
        self.broker = broker
        self.batch_size = batch_size
        self.poll_seconds = poll_seconds
        self.lock_seconds = lock_seconds
        self.publish_timeout = publish_timeout
        self.retry_delay_seconds = retry_delay_seconds
        self._wake = asyncio.Event()

    def wake(self) -> None:
        """Something was written to the outbox: publish it now rather than at the next poll."""
        self._wake.set()

    async def run(self, stopping: asyncio.Event) -> None:
        """Publish rounds until ``stopping`` is set."""
        while not stopping.is_set():
            self._wake.clear()
            try:
                published, failed = await self.publish_round()
            except Exception as exc:
                log.warning("outbox round failed", error=describe(exc))
                published, failed = 0, 1
            if published >= self.batch_size and not failed:
                continue  # a full batch: more is likely waiting
            delay = self.retry_delay_seconds if failed else self.poll_seconds
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(_first(self._wake, stopping), delay)

    async def publish_round(self) -> tuple[int, int]:
        """One round: returns (confirmed, failed) dispatch counts."""
        rows = await self.repository.lock_outbox(self.batch_size, self.lock_seconds)
        if not rows:
            return 0, 0
        results = await asyncio.gather(*(self._publish(row) for row in rows), return_exceptions=True)
        confirmed = [row["id"] for row, result in zip(rows, results, strict=True) if result is None]
        failed = [row for row, result in zip(rows, results, strict=True) if result is not None]
        await self.repository.confirm_outbox(confirmed)
        if failed:
            first = next(r for r in results if r is not None)
            log.warning("dispatches not confirmed", count=len(failed), error=describe(first))
            await self.repository.release_outbox([row["id"] for row in failed], self.retry_delay_seconds)
        return len(confirmed), len(failed)

    async def _publish(self, row: dict[str, Any]) -> None:
        queue = row["queue"]
        priority = int(row["priority"])
        stored = {"traceparent": row["traceparent"]} if row["traceparent"] else {}
        if row["tracestate"]:
            stored["tracestate"] = row["tracestate"]
        body = job_pb2.JobDispatch(
            job_id=str(row["job_id"]), attempt=row["attempt"], queue=queue, dead_letters=row["dead_letters"]
        ).SerializeToString()
        with tracer.start_as_current_span(
            f"{queue} publish",
            context=tracing.extract(stored),
            kind=trace.SpanKind.PRODUCER,
            attributes={
                "messaging.system": "rabbitmq",
                "messaging.destination.name": lane_for(queue, priority),
                "messaging.operation": "publish",
                "mesh.job.id": str(row["job_id"]),
                "mesh.job.attempt": row["attempt"],
                "mesh.job.priority": priority,
            },
        ):
            message_id = f"{row['job_id']}:{row['attempt']}"
            await self._send(queue, priority, body, dict(tracing.inject({})), message_id)

    async def _send(
        self, queue: str, priority: int, body: bytes, headers: dict[str, str], message_id: str
    ) -> None:
        """Publish to ``queue``'s lane for ``priority``; the counters are labelled with the job queue."""
        try:
            await self.broker.declare(queue)
            await self.broker.publish(
                lane_for(queue, priority),
                body,
                headers=headers,
                message_id=message_id,
                message_type=DISPATCH_TYPE,
                timeout=self.publish_timeout,
                priority=priority,
            )
        except Exception:
            PUBLISH_FAILURES.labels(queue).inc()
            raise
        PUBLISHED.labels(queue).inc()


async def _first(*events: asyncio.Event) -> None:
    """Return when any of ``events`` is set."""
    waiters = [asyncio.ensure_future(e.wait()) for e in events]
    try:
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()
