"""A dispatch lost while its lane keeps a standing backlog, on the real PostgreSQL and RabbitMQ.

The reconciler dispatches a stale QUEUED job again behind a backlog (its queue holds ready messages) only
when a worker claimed a later dispatch of the same lane, at the job's priority or below, written over the
margin (60 s) after the job's: the lane is FIFO, so nothing of the job waits ahead of it in the broker.
The lane's backlog is real (dispatches published and waiting in RabbitMQ); the ages of the dispatches are
set in PostgreSQL (``_age``), and the reconciler under test is one of the test's own, with a stale period
the service's own never reaches.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator

import aio_pika
import pytest

from mesh.queue.v1 import job_pb2
from mesh.services.queue.reconciler import OVERTAKEN_MARGIN_SECONDS, Reconciler
from mesh.services.queue.repository import ClaimStore
from mesh.services.queue.topology import lane_for
from tests.queue.harness import Harness, fast_settings, running_queue

pytestmark = pytest.mark.integration

STALE_SECONDS = 100.0
"""The test reconciler's stale period; the dispatches made stale are 400 s old and more."""
LOST_AGO = 1000.0
"""How old the lost job's dispatch is made."""
BACKLOG_AGO = 400.0
"""How old the backlog's dispatches are made: stale, and written after every claimed dispatch."""
OVERTAKEN_REASON = "re-dispatched: a later dispatch of its lane was claimed before it"


@pytest.fixture
async def quiet_service(database_url: str, amqp_url: str, unique_name: str) -> AsyncIterator[Harness]:
    """A queue service, no worker, whose own reconciler finds no job stale (a 30-day period)."""
    settings = fast_settings(database_url, amqp_url, unique_name, stale_queued_seconds=30 * 86400.0)
    async with running_queue(settings) as queue:
        yield queue


def reconciler(queue: Harness) -> Reconciler:
    """A reconciler over the service's repository and broker, with a 100 s stale period."""
    return Reconciler(
        queue.app.repository,
        ready_count=queue.app.broker.ready_count,
        queues=[queue.inference_queue],
        stale_queued_seconds=STALE_SECONDS,
    )


async def _lane_ready(queue: Harness, priority: int, expected: int) -> int:
    """The ready count of the inference queue's lane for ``priority``, once it is ``expected`` (10 s at most)."""
    lane = lane_for(queue.inference_queue, priority)
    deadline = time.monotonic() + 10
    while (
        ready := await queue.app.broker.lane_ready_count(lane)
    ) != expected and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    return ready


async def _published(queue: Harness, *job_ids: str) -> None:
    """Wait until the relay published (and the broker confirmed) the dispatches of these jobs."""
    deadline = time.monotonic() + 10
    while await queue.sql("SELECT 1 FROM outbox WHERE job_id = ANY(%s::uuid[])", list(job_ids)):
        assert time.monotonic() < deadline, "the relay did not publish the dispatches"
        await asyncio.sleep(0.05)


async def _age(queue: Harness, ages: dict[str, float]) -> None:
    """Make each job's dispatch (and queueing) ``ages[job_id]`` seconds old, as if time had passed: no new
    dispatch is written (the outbox rows that the change of a QUEUED job's dispatch time writes are deleted
    in the same transaction)."""
    async with queue.app.pool.connection() as conn, conn.transaction():
        for job_id, seconds in ages.items():
            await conn.execute(
                "UPDATE jobs SET dispatched_at = now() - make_interval(secs => %s),"
                " enqueued_at = now() - make_interval(secs => %s) WHERE id = %s",
                (seconds, seconds, job_id),
            )
        await conn.execute("DELETE FROM outbox WHERE job_id = ANY(%s::uuid[])", (list(ages),))


async def _claimed(queue: Harness, priority: int, seconds_ago: float) -> job_pb2.Job:
    """A job a worker claimed (RUNNING, a long lease) whose dispatch is ``seconds_ago`` old; its message
    stays ready in its lane, as a duplicate nobody took yet."""
    job = await queue.submit(priority=priority)
    await _published(queue, job.id)
    store = ClaimStore(queue.app.pool)
    assert await store.claim(uuid.UUID(job.id), 1, uuid.uuid4(), redelivered=False, lease_seconds=3600)
    await _age(queue, {job.id: seconds_ago})
    return job


async def _purge(queue: Harness, lane: str) -> None:
    """Drop every message of ``lane`` (dispatches lost, as a purged queue or broker data loss loses them)."""
    connection = await aio_pika.connect(queue.settings.amqp_url)
    async with connection:
        channel = await connection.channel()
        declared = await channel.declare_queue(lane, passive=True)
        await declared.purge()


async def _lost_behind_a_backlog(queue: Harness, priority: int = 0) -> tuple[job_pb2.Job, list[job_pb2.Job]]:
    """A QUEUED job of ``priority`` whose dispatch was lost (its lane purged) and, after it, a backlog of three
    dispatches of that priority waiting in the lane; the lost one 1000 s old, the backlog's 400 s."""
    lost = await queue.submit(priority=priority)
    assert await _lane_ready(queue, priority, 1) == 1
    await _purge(queue, lane_for(queue.inference_queue, priority))
    backlog = [await queue.submit(priority=priority) for _ in range(3)]
    await _published(queue, *(job.id for job in backlog))
    await _age(queue, {lost.id: LOST_AGO, **{job.id: BACKLOG_AGO for job in backlog}})
    return lost, backlog


def _ids(rows: list[dict[str, object]]) -> list[str]:
    return [str(row["id"]) for row in rows]


async def _reasons(queue: Harness, jobs: list[job_pb2.Job]) -> list[str]:
    rows = await queue.sql(
        "SELECT state_reason FROM jobs WHERE id = ANY(%s::uuid[]) ORDER BY array_position(%s::uuid[], id)",
        [job.id for job in jobs],
        [job.id for job in jobs],
    )
    return [str(row["state_reason"]) for row in rows]


async def test_a_lost_dispatch_behind_a_standing_backlog_is_sent_again_once_a_later_one_of_its_lane_runs(
    quiet_service: Harness,
) -> None:
    """Pins the overtaken rule: the lane holds a backlog (ready messages: the quiet-queue rule sends nothing
    there), a job's dispatch was lost 1000 s ago and a job of the same lane and priority dispatched 800 s ago
    runs. The lost job is dispatched again (one more message in the lane); the backlog's jobs, stale too but
    dispatched after the running one, are not."""
    queue = quiet_service
    lost, backlog = await _lost_behind_a_backlog(queue)
    await _claimed(queue, 0, LOST_AGO - 200)
    assert await _lane_ready(queue, 0, 4) == 4  # the backlog and the claimed job's own message

    assert _ids(await reconciler(queue).redispatch_stale()) == [lost.id]
    assert await _lane_ready(queue, 0, 5) == 5
    assert await _reasons(queue, [lost, *backlog]) == [OVERTAKEN_REASON] + ["submitted"] * 3


@pytest.mark.parametrize(
    ("lost_priority", "priority", "seconds_ago"),
    [
        pytest.param(5, 4, LOST_AGO - 200, id="other-lane"),
        pytest.param(0, 3, LOST_AGO - 200, id="higher-priority"),
        pytest.param(0, 0, LOST_AGO - OVERTAKEN_MARGIN_SECONDS / 2, id="within-the-margin"),
    ],
)
async def test_a_running_job_of_the_other_lane_of_higher_priority_or_within_the_margin_is_no_evidence(
    quiet_service: Harness, lost_priority: int, priority: int, seconds_ago: float
) -> None:
    """A running job of the other lane (priority 4, normal, for a lost 5 of the high lane: lower, but
    another FIFO), of a higher priority in the lost job's lane (3 for a 0, which the relay may publish ahead
    of it), or dispatched only 30 s after it (within the 60 s margin for publishes that reorder) proves
    nothing about the lost dispatch: nothing is sent. Once a job of its lane and priority, dispatched 200 s
    after it, runs, the lost job is sent."""
    queue = quiet_service
    lost, backlog = await _lost_behind_a_backlog(queue, lost_priority)
    await _claimed(queue, priority, seconds_ago)
    sweeper = reconciler(queue)

    assert await sweeper.redispatch_stale() == []
    assert await _reasons(queue, [lost, *backlog]) == ["submitted"] * 4

    await _claimed(queue, lost_priority, LOST_AGO - 200)
    assert _ids(await sweeper.redispatch_stale()) == [lost.id]


async def test_a_job_dispatched_again_is_not_sent_once_more_without_a_later_claimed_dispatch(
    quiet_service: Harness,
) -> None:
    """The re-dispatch moves the job's dispatch time to now, so the claim that proved it lost proves nothing
    any more: a sweep a stale period later (the re-dispatch 1000 s old, the claim 1800 s) sends nothing, as a
    worker may hold the job's first message. Only a claim of a dispatch written after the re-dispatch sends
    it once more: one copy per stale period at most."""
    queue = quiet_service
    lost, _ = await _lost_behind_a_backlog(queue)
    claimed = await _claimed(queue, 0, LOST_AGO - 200)
    sweeper = reconciler(queue)
    assert _ids(await sweeper.redispatch_stale()) == [lost.id]
    await _published(queue, lost.id)

    await _age(queue, {lost.id: LOST_AGO, claimed.id: 2 * LOST_AGO - 200})
    assert await sweeper.redispatch_stale() == []
    assert await sweeper.redispatch_stale() == []

    await _claimed(queue, 0, LOST_AGO - 200)
    assert _ids(await sweeper.redispatch_stale()) == [lost.id]


async def test_a_quiet_queue_is_asked_again_once_its_stale_jobs_are_found(quiet_service: Harness) -> None:
    """Pins the recount: the broker's count, read before the relay's publish of a stale job landed, says 0,
    and the database, read after the relay confirmed it, shows no dispatch pending. Asked again once the job
    is found, the broker holds its message, so nothing is sent (before, a copy was). Once the message is
    really gone (its lane purged), the job is sent again."""
    queue = quiet_service
    job = await queue.submit()
    await _published(queue, job.id)
    await _age(queue, {job.id: LOST_AGO})
    assert await _lane_ready(queue, 0, 1) == 1
    asked: list[str] = []

    async def first_before_the_publish(name: str) -> int:
        asked.append(name)
        return 0 if len(asked) == 1 else await queue.app.broker.ready_count(name)

    sweeper = Reconciler(
        queue.app.repository,
        ready_count=first_before_the_publish,
        queues=[queue.inference_queue],
        stale_queued_seconds=STALE_SECONDS,
    )
    assert await sweeper.redispatch_stale() == []
    assert asked == [queue.inference_queue] * 2
    assert await _lane_ready(queue, 0, 1) == 1
    assert await _reasons(queue, [job]) == ["submitted"]

    await _purge(queue, lane_for(queue.inference_queue, 0))
    assert _ids(await sweeper.redispatch_stale()) == [job.id]
    assert await _lane_ready(queue, 0, 1) == 1
    assert await _reasons(queue, [job]) == ["re-dispatched: no worker took it"]
