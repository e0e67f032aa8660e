"""The dead-letter consumer: what each outcome of a dead letter does to the message and the counters."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Any, cast

from prometheus_client import REGISTRY

from mesh.queue.v1 import job_pb2
from mesh.services.queue.dead_letters import DeadLetterConsumer
from mesh.services.queue.states import JobState


@dataclass
class OneOutcome:
    """A repository whose every dead letter moves its job to ``target``."""

    target: JobState | None
    seen: list[tuple[uuid.UUID, int]] = field(default_factory=list)
    generations: list[int | None] = field(default_factory=list)

    async def dead_letter(
        self,
        job_id: uuid.UUID,
        attempt: int,
        reason: str,
        *,
        delivery_limit: int,
        generation: int | None = None,
    ) -> JobState | None:
        self.seen.append((job_id, attempt))
        self.generations.append(generation)
        return self.target


@dataclass
class Message:
    """The parts of an incoming message the consumer reads, recording what it answered."""

    body: bytes
    headers: dict[str, Any] = field(default_factory=dict)
    acked: bool = False

    async def ack(self) -> None:
        self.acked = True

    async def reject(self, requeue: bool = False) -> None:
        raise AssertionError("a recorded dead letter is acked, not rejected")


async def test_a_dead_letter_that_cancels_its_job_is_acked_and_counted() -> None:
    """A dead letter of a job its user asked to cancel ends it CANCELLED (the repository's answer): the message
    is acked and counted under ``cancelled``; the consumer had no effect for that state (a KeyError after the
    commit left the message unacked until its channel closed)."""
    repository = OneOutcome(JobState.CANCELLED)
    consumer = DeadLetterConsumer(cast(Any, repository), cast(Any, None), ["dl-cancel.q"], delivery_limit=3)
    job_id = uuid.uuid4()
    message = Message(job_pb2.JobDispatch(job_id=str(job_id), attempt=2).SerializeToString())
    labels = {"queue": "dl-cancel.q", "effect": "cancelled"}
    before = REGISTRY.get_sample_value("mesh_queue_dead_letters_total", labels)
    await consumer.handle("dl-cancel.q", cast(Any, message))
    assert repository.seen == [(job_id, 2)]
    assert message.acked
    assert before == 0
    assert REGISTRY.get_sample_value("mesh_queue_dead_letters_total", labels) == 1


async def test_the_dispatch_generation_reaches_the_record_and_an_undated_one_is_not_checked() -> None:
    """The consumer hands the record the dispatch's generation (``dead_letters``), 0 included, so a redelivered
    dead letter of an earlier generation is found stale; a dispatch without the field (written before it
    existed) is passed as None, which the record does not check."""
    repository = OneOutcome(None)
    consumer = DeadLetterConsumer(cast(Any, repository), cast(Any, None), ["dl-gen.q"], delivery_limit=3)
    job_id = str(uuid.uuid4())
    for dispatch in (
        job_pb2.JobDispatch(job_id=job_id, attempt=1, dead_letters=0),
        job_pb2.JobDispatch(job_id=job_id, attempt=1, dead_letters=2),
        job_pb2.JobDispatch(job_id=job_id, attempt=1),
    ):
        message = Message(dispatch.SerializeToString())
        await consumer.handle("dl-gen.q", cast(Any, message))
        assert message.acked
    assert repository.generations == [0, 2, None]
