"""The queue service's own transactions (RetryJob, CancelJob, a dead letter, the lease sweep) when the answer to
their COMMIT is lost: the next try on a fresh connection gives the answer the first try would have given, and
the change takes effect once.

A proxy between the repository's pool and PostgreSQL cuts the connection at COMMIT, either after PostgreSQL
answered it (the transaction is durable, the client never hears so) or before forwarding it (the transaction
stays open on its backend, or aborts when the proxy closes that side too).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from mesh.kit import errors
from mesh.services.queue.repository import JobRepository, open_pool
from mesh.services.queue.states import JobState
from tests.postgres import CommitCutter, commit_cutter
from tests.queue.record import sql, submit


@pytest.fixture
async def proxied(migrated: str) -> AsyncIterator[tuple[CommitCutter, str]]:
    async with commit_cutter(migrated) as proxied:
        yield proxied


@pytest.fixture
def cutter(proxied: tuple[CommitCutter, str]) -> CommitCutter:
    return proxied[0]


@pytest.fixture
async def repository(proxied: tuple[CommitCutter, str]) -> AsyncIterator[JobRepository]:
    """A repository whose connections go through ``cutter``."""
    pool = open_pool(proxied[1], name="test-commit-cut", max_size=2)
    await pool.open()
    yield JobRepository(pool, retry_timeout=1.5)
    await pool.close()


async def test_a_retry_whose_commit_answer_was_lost_answers_with_the_retried_job(
    repository: JobRepository, cutter: CommitCutter, migrated: str
) -> None:
    """RetryJob of a FAILED job whose COMMIT succeeded unheard answers with the job it queued (attempt 2),
    not FAILED_PRECONDITION "a QUEUED job cannot be retried", and the job was retried once."""
    job_id = await submit(repository)
    await sql(migrated, "UPDATE jobs SET state = 'FAILED', finished_at = now() WHERE id = %s", job_id)
    cutter.arm("answered")
    row = await repository.retry(job_id)
    assert cutter.fired == 1
    assert (row["state"], row["attempt"], row["state_reason"]) == ("QUEUED", 2, "retried by user")
    stored = await sql(migrated, "SELECT state, attempt FROM jobs WHERE id = %s", job_id)
    assert stored == [{"state": "QUEUED", "attempt": 2}]
    moves = await sql(migrated, "SELECT count(*) AS n FROM job_history WHERE job_id = %s", job_id)
    assert moves == [{"n": 3}]  # submitted, FAILED (by hand), retried: once


async def test_a_cancel_whose_commit_answer_was_lost_answers_with_the_cancelled_job(
    repository: JobRepository, cutter: CommitCutter, migrated: str
) -> None:
    """CancelJob of a QUEUED job whose COMMIT succeeded unheard answers with the CANCELLED job, not
    FAILED_PRECONDITION "a CANCELLED job cannot be cancelled"."""
    job_id = await submit(repository)
    cutter.arm("answered")
    row = await repository.cancel(job_id)
    assert cutter.fired == 1
    assert (row["state"], row["state_reason"]) == ("CANCELLED", "cancelled by user")
    assert await sql(migrated, "SELECT state FROM jobs WHERE id = %s", job_id) == [{"state": "CANCELLED"}]


async def test_a_dead_letter_whose_commit_answer_was_lost_counts_once(
    repository: JobRepository, cutter: CommitCutter, migrated: str
) -> None:
    """A collateral dead letter whose COMMIT succeeded unheard is counted once (it was counted twice, so the
    job went DEAD one dead letter early): the second one is still dispatched again, the third is DEAD."""
    job_id = await submit(repository)
    cutter.arm("answered")
    assert await repository.dead_letter(job_id, 1, "dead-lettered", delivery_limit=3) is JobState.QUEUED
    assert cutter.fired == 1
    rows = await sql(migrated, "SELECT state, dead_letters FROM jobs WHERE id = %s", job_id)
    assert rows == [{"state": "QUEUED", "dead_letters": 1}]
    assert await repository.dead_letter(job_id, 1, "dead-lettered", delivery_limit=3) is JobState.QUEUED
    assert await repository.dead_letter(job_id, 1, "dead-lettered", delivery_limit=3) is JobState.DEAD


async def test_a_lease_sweep_whose_commit_answer_was_lost_reports_what_it_moved(
    repository: JobRepository, cutter: CommitCutter, migrated: str
) -> None:
    """The reconciler's lease sweep whose COMMIT succeeded unheard reports the jobs it moved (the re-run found
    none and reported nothing, so the metrics and the log missed them)."""
    job_id = await submit(repository)
    await sql(
        migrated,
        "UPDATE jobs SET state = 'RUNNING', lease_owner = gen_random_uuid(),"
        " lease_expires_at = now() - interval '1 second' WHERE id = %s",
        job_id,
    )
    cutter.arm("answered")
    moved = await repository.expire_leases()
    assert cutter.fired == 1
    assert [moved_id for moved_id, _ in moved].count(job_id) == 1


async def test_a_commit_whose_outcome_stays_unknown_is_unavailable_not_run_again(
    repository: JobRepository, cutter: CommitCutter, migrated: str
) -> None:
    """A COMMIT lost on its way, its transaction still open on PostgreSQL (the backend has not noticed that its
    client is gone): the cancel is not run again (it waited on the open transaction's row lock for ever) but
    answers UNAVAILABLE within the retry window, saying the outcome is unknown; once that transaction aborts,
    the job is as it was and a new cancel works."""
    job_id = await submit(repository)
    cutter.arm("held")
    try:
        with pytest.raises(errors.Unavailable, match="unknown"):
            await asyncio.wait_for(repository.cancel(job_id), 10)
        assert cutter.fired == 1
    finally:
        cutter.release()
    # The new cancel waits for the open transaction's row lock until its backend sees the reset and aborts.
    assert (await asyncio.wait_for(repository.cancel(job_id), 10))["state"] == "CANCELLED"
    history = await sql(migrated, "SELECT to_state FROM job_history WHERE job_id = %s ORDER BY id", job_id)
    assert history == [{"to_state": "QUEUED"}, {"to_state": "CANCELLED"}]


async def test_a_commit_lost_on_its_way_runs_again(
    repository: JobRepository, cutter: CommitCutter, migrated: str
) -> None:
    """A guard for the look-up (this passed before the fix too): a COMMIT that never reached PostgreSQL, whose
    transaction aborted, is run again on a fresh connection and takes effect once."""
    job_id = await submit(repository)
    await sql(migrated, "UPDATE jobs SET state = 'FAILED', finished_at = now() WHERE id = %s", job_id)
    cutter.arm("aborted")
    row = await repository.retry(job_id)
    assert cutter.fired == 1
    assert (row["state"], row["attempt"]) == ("QUEUED", 2)
    assert await sql(migrated, "SELECT attempt FROM jobs WHERE id = %s", job_id) == [{"attempt": 2}]


async def test_a_database_that_stops_answering_is_unavailable_within_the_retry_window(
    repository: JobRepository, cutter: CommitCutter
) -> None:
    """With PostgreSQL silent (no answer, no reset: a hung server, or a path TCP has not given up on), a read and
    a cancel answer UNAVAILABLE once the repository's retry window (1.5 s here) has passed; before, each waited
    until its caller's deadline (the gateway's 504 after 28 s) and a job's watch, which has none, for ever."""
    job_id = await submit(repository)
    cutter.arm("silent")
    for operation in (repository.get(job_id), repository.cancel(job_id)):
        started = asyncio.get_running_loop().time()
        with pytest.raises(errors.Unavailable, match=r"unavailable|unknown"):
            await asyncio.wait_for(operation, 20)
        assert asyncio.get_running_loop().time() - started < 4
