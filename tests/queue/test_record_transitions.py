"""Moves the job record makes without a worker, as CONTRACT.md's job states have them: an expired lease is a
SYSTEM error of the attempt (RUNNING -> RETRY_WAIT -> QUEUED with backoff, or FAILED when the attempts are
spent), and a running job whose user asked to cancel it ends CANCELLED when a dead letter takes it from its
worker, rather than being dispatched again."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Any, cast

import pytest

from mesh.queue.v1 import job_pb2
from mesh.services.queue.relay import OutboxRelay
from mesh.services.queue.repository import ClaimStore, JobRepository, open_pool
from mesh.services.queue.states import JobState
from tests.queue.record import sql, submit

LOST = "the worker stopped renewing its lease"


@pytest.fixture
async def repository(migrated: str) -> AsyncIterator[JobRepository]:
    pool = open_pool(migrated, name="test-record", max_size=2)
    await pool.open()
    yield JobRepository(pool)
    await pool.close()


async def _running(repository: JobRepository, *, max_attempts: int = 3) -> tuple[uuid.UUID, uuid.UUID]:
    """A job claimed by a worker (attempt 1); returns its id and the claim token."""
    job_id = await submit(
        repository, max_attempts=max_attempts, backoff_base_seconds=10.0, backoff_cap_seconds=20.0
    )
    token = uuid.uuid4()
    assert await ClaimStore(repository.pool).claim(job_id, 1, token, redelivered=False, lease_seconds=60)
    return job_id, token


async def _expire(url: str, job_id: uuid.UUID) -> None:
    await sql(url, "UPDATE jobs SET lease_expires_at = now() - interval '1 second' WHERE id = %s", job_id)


async def test_an_expired_lease_waits_for_a_retry_as_a_system_error(
    repository: JobRepository, migrated: str
) -> None:
    """A running job whose lease expired goes RUNNING -> RETRY_WAIT with the job's backoff (not straight to
    QUEUED as the next attempt), records its attempt's error (SYSTEM, the worker stopped renewing its lease)
    and is fenced from its lost worker; the next attempt is queued once the backoff elapsed."""
    job_id, token = await _running(repository)
    await _expire(migrated, job_id)
    assert (job_id, JobState.RETRY_WAIT) in await repository.expire_leases()
    rows = await sql(
        migrated,
        "SELECT state, attempt, error_category, error_message, lease_owner, finished_at,"
        " extract(epoch FROM next_run_at - now()) AS wait FROM jobs WHERE id = %s",
        job_id,
    )
    row = rows[0]
    assert (row["state"], row["attempt"], row["error_category"]) == ("RETRY_WAIT", 1, "SYSTEM")
    assert LOST in row["error_message"]
    assert row["lease_owner"] is None
    assert row["finished_at"] is None
    assert 0 <= row["wait"] <= 10.5  # full jitter under the first ceiling (the job's base, 10 s)
    history = await sql(
        migrated,
        "SELECT from_state, to_state, attempt, reason, next_run_at FROM job_history WHERE job_id = %s ORDER BY id",
        job_id,
    )
    last = history[-1]
    assert (last["from_state"], last["to_state"], last["attempt"]) == ("RUNNING", "RETRY_WAIT", 1)
    assert last["reason"].startswith("lease expired: SYSTEM error, retry 1 in ")
    assert last["next_run_at"] is not None
    assert not await sql(migrated, "SELECT 1 FROM outbox WHERE job_id = %s AND attempt = 2", job_id)
    # The lost worker, back, commits nothing.
    assert await ClaimStore(repository.pool).beat(job_id, token, lease_seconds=60) is None

    await sql(migrated, "UPDATE jobs SET next_run_at = now() - interval '1 second' WHERE id = %s", job_id)
    assert job_id in {row["id"] for row in await repository.requeue_due_retries()}
    rows = await sql(migrated, "SELECT state, attempt FROM jobs WHERE id = %s", job_id)
    assert rows == [{"state": "QUEUED", "attempt": 2}]


async def test_an_expired_lease_of_the_last_attempt_fails_with_a_system_error(
    repository: JobRepository, migrated: str
) -> None:
    """With its attempts spent, a job whose lease expired is FAILED with the attempt's error recorded as the
    error (SYSTEM, the worker stopped renewing its lease), not a message about attempts used."""
    job_id, _ = await _running(repository, max_attempts=1)
    await _expire(migrated, job_id)
    assert (job_id, JobState.FAILED) in await repository.expire_leases()
    rows = await sql(
        migrated,
        "SELECT state, error_category, error_message, next_run_at, finished_at FROM jobs WHERE id = %s",
        job_id,
    )
    row = rows[0]
    assert (row["state"], row["error_category"]) == ("FAILED", "SYSTEM")
    assert LOST in row["error_message"]
    assert row["next_run_at"] is None
    assert row["finished_at"] is not None


async def test_a_dead_letter_of_a_running_job_asked_to_cancel_cancels_it(
    repository: JobRepository, migrated: str
) -> None:
    """A collateral dead letter of a running job whose user asked to cancel it ends it CANCELLED (it was sent
    back to QUEUED with cancel_requested set, and a worker could claim it and run it again)."""
    job_id, _ = await _running(repository)
    assert (await repository.cancel(job_id))["cancel_requested"]
    target = await repository.dead_letter(job_id, 1, "dead-lettered: delivery_limit", delivery_limit=3)
    assert target is JobState.CANCELLED
    rows = await sql(
        migrated,
        "SELECT state, lease_owner, finished_at IS NOT NULL AS finished FROM jobs WHERE id = %s",
        job_id,
    )
    assert rows == [{"state": "CANCELLED", "lease_owner": None, "finished": True}]
    outbox = await sql(migrated, "SELECT count(*) AS n FROM outbox WHERE job_id = %s", job_id)
    assert outbox == [{"n": 1}]  # the submit's dispatch (no relay runs here), no second one
    again = await ClaimStore(repository.pool).claim(
        job_id, 1, uuid.uuid4(), redelivered=False, lease_seconds=60
    )
    assert again is None


async def test_a_dead_letter_redelivered_after_its_ack_was_lost_counts_once(
    repository: JobRepository, migrated: str
) -> None:
    """A collateral dead letter of generation 0 sends the job back to QUEUED with a dispatch of generation 1;
    the same dead letter again (its ack lost after the commit) is stale: no second dispatch, no second count.
    Without generations it was counted twice and the job went DEAD one dead letter early."""
    job_id = await submit(repository)
    first = await repository.dead_letter(job_id, 1, "dead-lettered", delivery_limit=3, generation=0)
    assert first is JobState.QUEUED
    again = await repository.dead_letter(job_id, 1, "dead-lettered", delivery_limit=3, generation=0)
    assert again is None
    rows = await sql(migrated, "SELECT state, dead_letters FROM jobs WHERE id = %s", job_id)
    assert rows == [{"state": "QUEUED", "dead_letters": 1}]
    outbox = await sql(migrated, "SELECT dead_letters FROM outbox WHERE job_id = %s ORDER BY id", job_id)
    assert outbox == [{"dead_letters": 0}, {"dead_letters": 1}]
    # The dispatch of generation 1 dead-lettered is counted; an undated one (written before generations) is
    # counted whatever the job's generation.
    assert await repository.dead_letter(job_id, 1, "dead-lettered", delivery_limit=3, generation=1) is (
        JobState.QUEUED
    )
    assert await repository.dead_letter(job_id, 1, "dead-lettered", delivery_limit=3) is JobState.DEAD


class RecordingBroker:
    """The two broker calls the relay makes, recording each published body."""

    def __init__(self) -> None:
        self.bodies: list[bytes] = []

    async def declare(self, queue: str) -> None:
        pass

    async def publish(self, lane: str, body: bytes, **_: Any) -> None:
        self.bodies.append(body)


async def test_the_relay_publishes_each_dispatch_with_its_generation(repository: JobRepository) -> None:
    """The submit's dispatch goes out with ``dead_letters`` 0 (present, not absent) and the one a collateral dead
    letter wrote with 1, so the consumer can tell a redelivered dead letter of the first from one of the second."""
    job_id = await submit(repository)
    assert await repository.dead_letter(job_id, 1, "dead-lettered", delivery_limit=3, generation=0) is (
        JobState.QUEUED
    )
    broker = RecordingBroker()
    relay = OutboxRelay(repository, cast(Any, broker))
    while (await relay.publish_round())[0]:
        pass
    dispatches = [job_pb2.JobDispatch.FromString(body) for body in broker.bodies]
    mine = [d for d in dispatches if d.job_id == str(job_id)]
    assert [(d.attempt, d.HasField("dead_letters"), d.dead_letters) for d in mine] == [
        (1, True, 0),
        (1, True, 1),
    ]
