"""Job calls while PostgreSQL is silent (connections accepted, nothing answered: a hung server, or a proxy that
stopped forwarding): each answers UNAVAILABLE within the repository's retry window, plus a second of slack,
whether its pool's connections were open before the silence or are opened during it.

The window is 2 s here (``JobRepository.retry_timeout``; 10 s in the service). A submit that arrived while an
earlier one's batch waited on PostgreSQL used to get a window of its own once that batch gave up: it answered
after nearly two windows (3.9 s here, 19.9 s in the service). So did a worker's claim or outcome behind another
(``ClaimStore.retry_timeout``, 60 s in a worker), and a call that reads several times gave each read a window of
its own.

A worker's claims and outcomes fail as a worker handles PostgreSQL away, not UNAVAILABLE: the worker hands the
dispatch back."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import cast

import grpc
import psycopg
import pytest

from mesh.kit import errors
from mesh.kit.db import DatabaseStalled
from mesh.queue.v1 import queue_service_pb2
from mesh.services.queue.repository import ClaimStore, JobPool, JobRepository, Outcome, open_pool
from mesh.services.queue.servicer import Context, QueueServicer
from mesh.services.queue.states import JobState
from tests.silent_proxy import SilentProxy, silent_proxy

WINDOW = 2.0
SLACK = 1.0
"""What a call may take past its window: the event loop's turns, the servicer's own work."""

SUBMIT = queue_service_pb2.SubmitJobRequest(image_id=str(uuid.uuid4()), model="script:noop")
NO_CONTEXT = cast(Context, None)
"""SubmitJob and GetJob do not use their gRPC context."""


@contextlib.asynccontextmanager
async def pool_through(proxy: SilentProxy, url: str, *, wait: bool) -> AsyncIterator[JobPool]:
    """A pool on ``url`` (through ``proxy``), opened, its connections too with ``wait``. On the way out the proxy
    closes first: the hung calls and connection attempts end, and the pool closes at once."""
    pool = open_pool(url, name="test-silent", min_size=2, max_size=4)
    await pool.open(wait=wait)
    try:
        yield pool
    finally:
        await proxy.close()
        await pool.close()


@dataclass
class Silenced:
    proxy: SilentProxy
    url: str
    connections: str
    """"open before": the pool's connections were open when PostgreSQL fell silent; "fresh": it opens them
    after."""

    @contextlib.asynccontextmanager
    async def pool(self) -> AsyncIterator[JobPool]:
        """A pool through the proxy, silenced as ``connections`` says."""
        if self.connections == "fresh":
            self.proxy.silence()  # before the pool opens its connections
        async with pool_through(self.proxy, self.url, wait=self.connections == "open before") as pool:
            self.proxy.silence()  # "open before": now that they are open
            yield pool

    @contextlib.asynccontextmanager
    async def api(self, *, submit_batch: int = 128) -> AsyncIterator[QueueServicer]:
        """The queue's API on :meth:`pool`."""
        async with self.pool() as pool:
            yield QueueServicer(JobRepository(pool, submit_batch=submit_batch, retry_timeout=WINDOW))

    @contextlib.asynccontextmanager
    async def claims(self) -> AsyncIterator[ClaimStore]:
        """A worker's claim store on :meth:`pool`."""
        async with self.pool() as pool:
            yield ClaimStore(pool, retry_timeout=WINDOW)


@pytest.fixture(params=["open before", "fresh"])
async def silenced(request: pytest.FixtureRequest, migrated: str) -> AsyncIterator[Silenced]:
    async with silent_proxy(migrated) as (proxy, url):
        yield Silenced(proxy, url, request.param)


async def seconds_to_unavailable(call: Awaitable[object]) -> float:
    """Seconds until ``call`` failed, having checked that it failed UNAVAILABLE saying the database is."""
    started = asyncio.get_running_loop().time()
    with pytest.raises(errors.Unavailable, match="the job database is unavailable") as failed:
        await asyncio.wait_for(call, 4 * WINDOW)
    assert failed.value.code is grpc.StatusCode.UNAVAILABLE
    return asyncio.get_running_loop().time() - started


async def test_a_submit_and_a_read_are_unavailable_within_the_window(silenced: Silenced) -> None:
    """A guard (this held before the fix too): SubmitJob, then GetJob, each alone, answer UNAVAILABLE once the
    window has passed, not at their callers' deadlines."""
    async with silenced.api() as api:
        assert await seconds_to_unavailable(api.SubmitJob(SUBMIT, NO_CONTEXT)) < WINDOW + SLACK
        get = queue_service_pb2.GetJobRequest(job_id=str(uuid.uuid4()))
        assert await seconds_to_unavailable(api.GetJob(get, NO_CONTEXT)) < WINDOW + SLACK


async def test_a_submit_left_unanswered_says_its_outcome_is_unknown_and_how_to_retry(
    silenced: Silenced,
) -> None:
    """A submit whose statement PostgreSQL left unanswered may still commit: the answer says so, and how to
    retry without a second job (with its idempotency key; without one, that a plain retry may queue it twice).
    It said only "unavailable; retry shortly"."""
    keyed = queue_service_pb2.SubmitJobRequest()
    keyed.CopyFrom(SUBMIT)
    keyed.idempotency_key = "silent-key"
    async with silenced.api() as api:
        with pytest.raises(errors.Unavailable, match="whether the job was queued is unknown") as failed:
            await asyncio.wait_for(api.SubmitJob(keyed, NO_CONTEXT), 4 * WINDOW)
        assert "same idempotency_key" in str(failed.value)
        with pytest.raises(errors.Unavailable, match="give submits an idempotency_key"):
            await asyncio.wait_for(api.SubmitJob(SUBMIT, NO_CONTEXT), 4 * WINDOW)


async def test_a_submit_behind_an_unanswered_one_is_unavailable_within_its_own_window(
    silenced: Silenced,
) -> None:
    """A SubmitJob that arrives while an earlier one's statement waits on PostgreSQL (it goes in the next batch)
    answers within its own window: it waited for the earlier batch to give up, then got a whole window of its
    own (two windows less 0.1 s)."""
    async with silenced.api() as api:
        first = asyncio.ensure_future(seconds_to_unavailable(api.SubmitJob(SUBMIT, NO_CONTEXT)))
        await asyncio.sleep(0.1)
        second = asyncio.ensure_future(seconds_to_unavailable(api.SubmitJob(SUBMIT, NO_CONTEXT)))
        assert max(await asyncio.gather(first, second)) < WINDOW + SLACK


async def test_submits_beyond_one_batch_are_unavailable_within_their_window(silenced: Silenced) -> None:
    """Submits that arrive together but fill more than one batch (one job per batch here) each answer within
    their window: the later batches start with their window spent, or nearly, and give up at once rather than
    try for another window each (they answered after 2, 4 and 6 s)."""
    async with silenced.api(submit_batch=1) as api:
        calls = [seconds_to_unavailable(api.SubmitJob(SUBMIT, NO_CONTEXT)) for _ in range(3)]
        assert max(await asyncio.gather(*calls)) < WINDOW + SLACK


async def seconds_to_stalled(call: Awaitable[object]) -> float:
    """Seconds until ``call`` (a worker's claim or outcome) failed saying PostgreSQL did not answer in time."""
    started = asyncio.get_running_loop().time()
    with pytest.raises(DatabaseStalled):
        await asyncio.wait_for(call, 4 * WINDOW)
    return asyncio.get_running_loop().time() - started


def claim(store: ClaimStore) -> Awaitable[object]:
    return store.claim(uuid.uuid4(), 1, uuid.uuid4(), redelivered=False, lease_seconds=30.0)


def outcome(store: ClaimStore) -> Awaitable[object]:
    return store.finish(
        uuid.uuid4(), uuid.uuid4(), Outcome(JobState.SUCCEEDED, reason="succeeded", result=b"")
    )


@pytest.mark.parametrize("operation", [claim, outcome], ids=["claim", "outcome"])
async def test_a_claim_or_outcome_behind_an_unanswered_one_fails_within_its_own_window(
    silenced: Silenced, operation: Callable[[ClaimStore], Awaitable[object]]
) -> None:
    """A worker's claim (or outcome) that arrives while an earlier one's statement waits on PostgreSQL (it goes
    in the next batch) fails within its own window: it waited for the earlier batch to give up, then got a
    whole window of its own (two windows less 0.1 s; 120 s in a worker)."""
    async with silenced.claims() as store:
        first = asyncio.ensure_future(seconds_to_stalled(operation(store)))
        await asyncio.sleep(0.1)
        second = asyncio.ensure_future(seconds_to_stalled(operation(store)))
        assert max(await asyncio.gather(first, second)) < WINDOW + SLACK


LOCKED = 1.5
"""How long the first read of a call waits behind a lock before it is answered: over SLACK, under WINDOW."""


async def test_a_get_that_postgres_leaves_unanswered_after_its_first_read_is_unavailable_within_the_window(
    migrated: str,
) -> None:
    """GetJob reads the job's row, then its position and history, within one window. Here its first read waits
    1.5 s behind a lock and is answered, and PostgreSQL falls silent right after: the call answers UNAVAILABLE
    when its window ends. Each read had a window of its own: it answered after 1.5 s and a whole window more."""
    async with silent_proxy(migrated) as (proxy, url), pool_through(proxy, url, wait=True) as pool:
        api = QueueServicer(JobRepository(pool, retry_timeout=WINDOW))
        job = (await api.SubmitJob(SUBMIT, NO_CONTEXT)).job  # QUEUED: GetJob reads its position too
        get = queue_service_pb2.GetJobRequest(job_id=job.id)
        async with await psycopg.AsyncConnection.connect(migrated) as locker:  # straight to PostgreSQL
            await locker.execute("LOCK TABLE jobs IN ACCESS EXCLUSIVE MODE")
            reading = asyncio.ensure_future(seconds_to_unavailable(api.GetJob(get, NO_CONTEXT)))
            await asyncio.sleep(LOCKED)
            proxy.silence_after_next_answer()
            await locker.commit()  # the lock goes, and the row read comes back through the proxy
        assert await reading < WINDOW + SLACK
