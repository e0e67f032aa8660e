"""Job calls while PostgreSQL is silent (connections accepted, nothing answered: a hung server, or a proxy that
stopped forwarding): each answers UNAVAILABLE within the repository's retry window, plus a second of slack,
whether its pool's connections were open before the silence or are opened during it.

The window is 2 s here (``JobRepository.retry_timeout``; 10 s in the service). A submit that arrived while an
earlier one's batch waited on PostgreSQL used to get a window of its own once that batch gave up: it answered
after nearly two windows (3.9 s here, 19.9 s in the service)."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass
from typing import cast

import grpc
import pytest

from mesh.kit import errors
from mesh.queue.v1 import queue_service_pb2
from mesh.services.queue.repository import JobRepository, open_pool
from mesh.services.queue.servicer import Context, QueueServicer
from tests.silent_proxy import SilentProxy, silent_proxy

WINDOW = 2.0
SLACK = 1.0
"""What a call may take past its window: the event loop's turns, the servicer's own work."""

SUBMIT = queue_service_pb2.SubmitJobRequest(image_id=str(uuid.uuid4()), model="script:noop")
NO_CONTEXT = cast(Context, None)
"""SubmitJob and GetJob do not use their gRPC context."""


@dataclass
class Silenced:
    proxy: SilentProxy
    url: str
    connections: str
    """"open before": the pool's connections were open when PostgreSQL fell silent; "fresh": it opens them
    after."""

    @contextlib.asynccontextmanager
    async def api(self, *, submit_batch: int = 128) -> AsyncIterator[QueueServicer]:
        """The queue's API on a pool through the proxy, silenced as ``connections`` says."""
        pool = open_pool(self.url, name="test-silent", min_size=2, max_size=4)
        if self.connections == "open before":
            await pool.open(wait=True)
            self.proxy.silence()
        else:
            self.proxy.silence()
            await pool.open()
        try:
            yield QueueServicer(JobRepository(pool, submit_batch=submit_batch, retry_timeout=WINDOW))
        finally:
            await (
                self.proxy.close()
            )  # the hung calls and connection attempts end, and the pool closes at once
            await pool.close()


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
