"""The dead-letter consumer: a dispatch that reached ``<queue>.dead`` ends its job as DEAD.

Dispatches get there, from either lane of the job queue (both dead-letter through ``<queue>.dlx`` with the
job queue's name as routing key), when a worker rejected them (undecodable) or when RabbitMQ delivered them
more often than the lane's delivery limit (a job that crashes its worker every time). The job is marked DEAD
only when it is still at that attempt and generation (``JobDispatch.dead_letters``) and not finished, so a
stale dead letter, or one redelivered because its ack was lost, changes nothing; and only when it was claimed
on every delivery: a job whose dispatch merely sat in the prefetch of workers that other jobs killed is
dispatched again instead (``states.dead_letter_outcome``).
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable, Sequence

from aio_pika.abc import AbstractIncomingMessage
from google.protobuf.message import DecodeError
from prometheus_client import Counter

from mesh.kit.logging import get_logger
from mesh.queue.v1 import job_pb2
from mesh.services.queue.broker import Broker, MessageHandler
from mesh.services.queue.repository import JobRepository
from mesh.services.queue.states import JobState

log = get_logger(__name__)

DEAD_LETTERS = Counter(
    "mesh_queue_dead_letters_total",
    "Dead-lettered dispatches, by what they did to their job.",
    ["queue", "effect"],
)
EFFECTS = {
    JobState.DEAD: "marked_dead",
    JobState.QUEUED: "dispatched_again",
    JobState.CANCELLED: "cancelled",
    None: "stale",
}
"""What a dead letter did to its job, by the state it moved the job to (None: the job had moved on)."""
UNDECODABLE_EFFECT = "undecodable"


class DeadLetterConsumer:
    """Consumes the dead-letter queues of ``queues``."""

    def __init__(
        self,
        repository: JobRepository,
        broker: Broker,
        queues: Sequence[str],
        *,
        delivery_limit: int,
        on_dispatch: Callable[[], None] = lambda: None,
        declared: asyncio.Event | None = None,
    ) -> None:
        self.repository = repository
        self.declared = declared
        self.broker = broker
        self.queues = list(queues)
        # Exported at 0 so that the first dead letter after a restart shows in increase() and alerts.
        for queue in self.queues:
            for effect in (*EFFECTS.values(), UNDECODABLE_EFFECT):
                DEAD_LETTERS.labels(queue, effect)
        self.delivery_limit = delivery_limit
        self.on_dispatch = on_dispatch

    async def run(self, stopping: asyncio.Event) -> None:
        """Consume until ``stopping`` is set (the broker's connection restores the consumers), once the job
        queues are ``declared``. Setting the consumers up is retried through connection resets
        (``Broker.consume_dead_letters``): one while the service starts does not stop it."""
        if self.declared is not None:
            await self.declared.wait()
        for queue in self.queues:
            await self.broker.consume_dead_letters(queue, self._handler(queue), prefetch=32)
        await stopping.wait()

    def _handler(self, queue: str) -> MessageHandler:
        async def handle(message: AbstractIncomingMessage) -> None:
            await self.handle(queue, message)

        return handle

    async def handle(self, queue: str, message: AbstractIncomingMessage) -> None:
        """Mark the dispatch's job DEAD, then ack (a failure to write leaves it for a redelivery)."""
        try:
            dispatch = job_pb2.JobDispatch.FromString(message.body)
            job_id = uuid.UUID(dispatch.job_id)
        except (DecodeError, ValueError):
            DEAD_LETTERS.labels(queue, UNDECODABLE_EFFECT).inc()
            log.warning("undecodable dead letter dropped", queue=queue, size=len(message.body))
            await message.ack()
            return
        reason = _death_reason(message)
        try:
            target = await self.repository.dead_letter(
                job_id,
                dispatch.attempt,
                reason,
                delivery_limit=self.delivery_limit,
                generation=dispatch.dead_letters if dispatch.HasField("dead_letters") else None,
            )
        except Exception as exc:
            log.warning("dead letter not recorded; will retry", job_id=str(job_id), error=str(exc))
            await message.reject(requeue=True)
            return
        effect = EFFECTS[target]
        DEAD_LETTERS.labels(queue, effect).inc()
        if target is JobState.DEAD:
            log.warning("job dead-lettered", job_id=str(job_id), attempt=dispatch.attempt, reason=reason)
        elif target is JobState.QUEUED:
            log.info("collateral dead letter dispatched again", job_id=str(job_id), attempt=dispatch.attempt)
            self.on_dispatch()
        await message.ack()


def _death_reason(message: AbstractIncomingMessage) -> str:
    """Why RabbitMQ dead-lettered the message, from its ``x-death`` header."""
    deaths = (message.headers or {}).get("x-death")
    if isinstance(deaths, list) and deaths and isinstance(deaths[0], dict):
        why = deaths[0].get("reason", "unknown")
        why = why.decode() if isinstance(why, bytes) else str(why)
        if why == "delivery_limit":
            return "dead-lettered: delivered too often without an ack (the job crashes its worker)"
        return f"dead-lettered: {why}"
    return "dead-lettered"
