"""RabbitMQ names and arguments shared by the relay, the workers and the dead-letter consumer.

Each job queue is two durable quorum queues, its lanes: ``<queue>`` (normal, priority 0-4) and
``<queue>.high`` (priority 5-9). Both have the same delivery limit and dead-letter through the job queue's
own exchange ``<queue>.dlx`` (routing key ``<queue>``) into ``<queue>.dead``: a dispatch delivered more often
than the limit (a worker that crashes on it every time) or rejected by a worker (undecodable) ends there,
whichever lane it came from. Every party declares both lanes with the same arguments, so whoever comes first
creates them and the others agree with them.
"""

from __future__ import annotations

from aiormq.abc import FieldTable

HIGH_PRIORITY = 5
"""The least priority that goes to the high lane. RabbitMQ 3.x quorum queues have no priorities at all;
RabbitMQ 4.0 gives them two levels, priority above 4 being "high" and the rest "normal", and so do these
two lanes (a worker consumes both and starts what it holds highest priority first, see ``worker``)."""

MAX_PRIORITY = 9
"""The highest job priority (``SubmitJobRequest.priority`` is 0-9)."""

HIGH_LANE_SUFFIX = ".high"
"""Appended to a job queue's name to name its high lane."""


def high_lane(queue: str) -> str:
    """The high-priority lane of job queue ``queue``."""
    return queue + HIGH_LANE_SUFFIX


def lanes(queue: str) -> tuple[str, str]:
    """The RabbitMQ queues of job queue ``queue``: its normal lane (the job queue's own name), then its high
    lane."""
    return queue, high_lane(queue)


def lane_for(queue: str, priority: int) -> str:
    """The lane of job queue ``queue`` that a dispatch of ``priority`` goes to."""
    return high_lane(queue) if priority >= HIGH_PRIORITY else queue


def dead_letter_exchange(queue: str) -> str:
    """The dead-letter exchange of job queue ``queue`` (both lanes)."""
    return f"{queue}.dlx"


def dead_letter_queue(queue: str) -> str:
    """The queue that collects job queue ``queue``'s dead letters (from both lanes)."""
    return f"{queue}.dead"


def queue_arguments(queue: str, delivery_limit: int) -> FieldTable:
    """Declaration arguments of either lane of job queue ``queue`` (the same for both)."""
    return {
        "x-queue-type": "quorum",
        "x-delivery-limit": delivery_limit,
        "x-dead-letter-exchange": dead_letter_exchange(queue),
        "x-dead-letter-routing-key": queue,
    }
