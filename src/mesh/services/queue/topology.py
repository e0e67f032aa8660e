"""RabbitMQ names and arguments shared by the relay, the workers and the dead-letter consumer.

Each job queue is a durable quorum queue with a delivery limit; a dispatch delivered more often than the
limit (a worker that crashes on it every time) or rejected by a worker (undecodable) is dead-lettered
through the queue's own exchange ``<queue>.dlx`` into ``<queue>.dead``. Every party declares with the same
arguments, so whoever comes first creates the queue and the others agree with it.
"""

from __future__ import annotations

from aiormq.abc import FieldTable


def dead_letter_exchange(queue: str) -> str:
    """The dead-letter exchange of ``queue``."""
    return f"{queue}.dlx"


def dead_letter_queue(queue: str) -> str:
    """The queue that collects ``queue``'s dead letters."""
    return f"{queue}.dead"


def queue_arguments(queue: str, delivery_limit: int) -> FieldTable:
    """Declaration arguments of a job queue."""
    return {
        "x-queue-type": "quorum",
        "x-delivery-limit": delivery_limit,
        "x-dead-letter-exchange": dead_letter_exchange(queue),
        "x-dead-letter-routing-key": queue,
    }
