"""RabbitMQ faults at the queue service's and the workers' edge, injected through a proxy (``amqp_proxy``) so the
shared broker keeps running: a connection reset at a chosen step of a start, a broker that stops answering
(black hole), and questions about a queue that does not exist."""

from __future__ import annotations

import asyncio
import contextlib
import time
import types
import uuid
from collections.abc import AsyncIterator
from typing import Any, cast

import aio_pika
import aiormq
import grpc
import pytest
from aiormq.exceptions import ChannelPreconditionFailed

from mesh.kit.jobs import IMAGE_JOBS_QUEUE, INFERENCE_JOBS_QUEUE
from mesh.kit.runtime import BackgroundTaskCrashed, ServiceRuntime
from mesh.queue.v1 import job_pb2, queue_service_pb2
from mesh.services.queue.app import QueueApp
from mesh.services.queue.broker import HEARTBEAT_SECONDS, Broker
from mesh.services.queue.reconciler import Reconciler
from mesh.services.queue.repository import JobRepository
from mesh.services.queue.scripted import scripted_handler
from mesh.services.queue.settings import SERVICE_NAME, QueueSettings
from mesh.services.queue.topology import dead_letter_queue, lanes
from mesh.services.queue.worker import JobWorker
from tests.queue.amqp_proxy import BASIC_CONSUME, QUEUE_DECLARE, AmqpProxy, amqp_proxy
from tests.queue.harness import FAST_OPTIONS, Harness, delete_queues, fast_settings, running_queue

pytestmark = pytest.mark.integration


@contextlib.asynccontextmanager
async def started(settings: QueueSettings) -> AsyncIterator[tuple[QueueApp, asyncio.Task[None]]]:
    """The queue service running (not waiting for RabbitMQ, unlike ``running_queue``), with its runtime's task;
    stopped after, whether it crashed or not."""
    app = QueueApp(settings)
    runtime = ServiceRuntime("queue", settings, service_names=[SERVICE_NAME], checks=app.checks())
    await app.start()
    app.install(runtime)
    task = asyncio.create_task(runtime.run())
    try:
        yield app, task
    finally:
        runtime.stopping.set()
        with contextlib.suppress(BackgroundTaskCrashed):
            await asyncio.wait_for(task, 20)
        await app.close()
        await delete_queues(
            "amqp://guest:guest@localhost:5672/%2F",
            [settings.queue_prefix + q for q in (IMAGE_JOBS_QUEUE, INFERENCE_JOBS_QUEUE)],
        )


async def _ready_or_crashed(app: QueueApp, task: asyncio.Task[None], seconds: float = 15.0) -> None:
    """Wait until the job queues are declared; fail at once when the service stopped instead."""
    ready = asyncio.ensure_future(app.broker_ready.wait())
    await asyncio.wait([ready, task], timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
    ready.cancel()
    if task.done():
        raise AssertionError(f"the queue service stopped: {task.exception()!r}")
    assert app.broker_ready.is_set(), f"the job queues were not declared within {seconds}s"


async def _consumers(queue_name: str) -> int:
    connection = await aio_pika.connect("amqp://guest:guest@localhost:5672/%2F")
    async with connection:
        channel = await connection.channel()
        declared = await channel.declare_queue(queue_name, passive=True)
        return int(declared.declaration_result.consumer_count or 0)


# --- F1: one reset while a service starts ------------------------------------------------------------------


async def test_a_reset_while_the_queue_service_declares_its_queues_does_not_stop_it(
    database_url: str, unique_name: str
) -> None:
    """Pins F1 (QueueApp.connect_broker): the connection reset by the broker at the first queue declaration
    of the start is retried until the job queues are declared; the service keeps running (before, the
    background task raised and ServiceRuntime stopped the whole service)."""
    async with amqp_proxy() as proxy:
        proxy.reset_on(QUEUE_DECLARE)
        settings = fast_settings(database_url, proxy.url, unique_name, relay_process=False)
        async with started(settings) as (app, task):
            await _ready_or_crashed(app, task)
            assert proxy.resets == 1
            assert await app.broker.ready_count(settings.queue_prefix + INFERENCE_JOBS_QUEUE) == 0
            await asyncio.sleep(0.5)
            assert not task.done()


async def test_a_reset_while_the_dead_letter_consumers_start_does_not_stop_the_service(
    database_url: str, unique_name: str
) -> None:
    """Pins F1 (DeadLetterConsumer.run -> Broker.consume_dead_letters): the connection reset at the first
    basic.consume of the queue service (its dead-letter consumers' start) is retried; both dead-letter
    queues get their consumer and the service keeps running."""
    async with amqp_proxy() as proxy:
        proxy.reset_on(BASIC_CONSUME)
        settings = fast_settings(database_url, proxy.url, unique_name, relay_process=False)
        async with started(settings) as (app, task):
            await _ready_or_crashed(app, task)
            dead = [
                dead_letter_queue(settings.queue_prefix + q) for q in (IMAGE_JOBS_QUEUE, INFERENCE_JOBS_QUEUE)
            ]
            deadline = time.monotonic() + 10
            while [await _consumers(name) for name in dead] != [1, 1]:
                assert not task.done(), f"the queue service stopped: {task.exception()!r}"
                assert time.monotonic() < deadline, "the dead-letter consumers did not start"
                await asyncio.sleep(0.1)
            assert proxy.resets == 1
            assert not task.done()


async def test_a_declaration_the_broker_refuses_still_stops_the_service(
    database_url: str, amqp_url: str, unique_name: str
) -> None:
    """The other side of F1, a guard (it passed before the fix too): a job queue that exists with other
    arguments (PRECONDITION_FAILED) is a wrong setup, not an outage; retrying would hide it, so the service
    stops, naming the refusal."""
    settings = fast_settings(database_url, amqp_url, unique_name, relay_process=False)
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel()
        await channel.declare_queue(lanes(settings.queue_prefix + IMAGE_JOBS_QUEUE)[0], durable=True)
    async with started(settings) as (app, task):
        with pytest.raises(BackgroundTaskCrashed) as crashed:
            await asyncio.wait_for(asyncio.shield(task), 15)
        assert isinstance(crashed.value.__cause__, ChannelPreconditionFailed)
        assert not app.broker_ready.is_set()


@pytest.mark.parametrize("method", [QUEUE_DECLARE, BASIC_CONSUME], ids=["queue.declare", "basic.consume"])
async def test_a_reset_while_a_worker_starts_consuming_does_not_stop_it(
    queue: Harness, method: tuple[int, int]
) -> None:
    """Pins F1 (JobWorker.run -> Broker.consume): the worker's connection reset at its first queue declaration
    or basic.consume is retried; the worker starts consuming and runs a job (before, ``run`` raised, which
    stops the image or inference service it is attached to)."""
    async with amqp_proxy() as proxy:
        proxy.reset_on(method)
        settings = queue.settings.model_copy(update={"amqp_url": proxy.url})
        worker = JobWorker(
            settings,
            queue=queue.inference_queue,
            handler=scripted_handler,
            options=FAST_OPTIONS,
            name="reset",
        )
        stopping = asyncio.Event()
        task = asyncio.create_task(worker.run(stopping))
        try:
            ready = asyncio.ensure_future(worker.ready.wait())
            await asyncio.wait([ready, task], timeout=15, return_when=asyncio.FIRST_COMPLETED)
            ready.cancel()
            if task.done():
                raise AssertionError(f"the worker stopped: {task.exception()!r}")
            assert worker.ready.is_set()
            assert proxy.resets == 1
            job = await queue.submit("script:noop")
            assert (await queue.wait_for(job.id, timeout=15)).state == job_pb2.JOB_STATE_SUCCEEDED
        finally:
            stopping.set()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(task, 15)


# --- F2: a broker that stops answering ---------------------------------------------------------------------


@contextlib.asynccontextmanager
async def behind_proxy(
    database_url: str, unique_name: str, **overrides: Any
) -> AsyncIterator[tuple[Harness, AmqpProxy]]:
    """A queue service reaching RabbitMQ through a proxy the test may freeze (thawed before it stops)."""
    async with amqp_proxy() as proxy:
        settings = fast_settings(database_url, proxy.url, unique_name, relay_process=False, **overrides)
        async with running_queue(settings) as queue:
            try:
                yield queue, proxy
            finally:
                proxy.thaw()


async def test_the_reconciler_keeps_sweeping_while_rabbitmq_does_not_answer(
    database_url: str, unique_name: str
) -> None:
    """Pins F2 (Reconciler.redispatch_stale -> Broker.lane_ready_count): with a stale QUEUED job to look at and
    RabbitMQ not answering (no reset, no reply), the reconciler's wait for the ready count is bounded, so due
    retries and expired leases still move within seconds (before, every sweep stopped until the AMQP
    heartbeat gave up, minutes later)."""
    async with behind_proxy(database_url, unique_name, stale_queued_seconds=0.3) as (queue, proxy):
        stale, retry, lease = await queue.submit(), await queue.submit(), await queue.submit()
        deadline = time.monotonic() + 5
        while await queue.sql("SELECT 1 FROM outbox"):
            assert time.monotonic() < deadline, "the dispatches were not confirmed"
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.5)  # stale now, dispatches sent: every sweep asks the broker about their queue
        proxy.freeze()
        await asyncio.sleep(0.5)  # a sweep is waiting for the broker's answer now
        await queue.sql(
            "UPDATE jobs SET state = 'RETRY_WAIT', next_run_at = now() - interval '1 second' WHERE id = %s",
            retry.id,
        )
        await queue.sql(
            "UPDATE jobs SET state = 'RUNNING', lease_owner = gen_random_uuid(),"
            " lease_expires_at = now() - interval '1 second' WHERE id = %s",
            lease.id,
        )
        deadline = time.monotonic() + 8
        while True:
            rows = await queue.sql(
                "SELECT id::text, state, attempt FROM jobs WHERE id = ANY(%s::uuid[])", [retry.id, lease.id]
            )
            moved = {r["id"]: (r["state"], r["attempt"]) for r in rows}
            # The due retry is queued as attempt 2; the expired lease leaves RUNNING (for RETRY_WAIT or QUEUED).
            if moved[retry.id] == ("QUEUED", 2) and moved[lease.id][0] != "RUNNING":
                break
            assert time.monotonic() < deadline, f"not reconciled while the broker is a black hole: {moved}"
            await asyncio.sleep(0.1)
        assert (await queue.get(stale.id)).state == job_pb2.JOB_STATE_QUEUED


async def test_queue_stats_answer_while_rabbitmq_does_not_answer(database_url: str, unique_name: str) -> None:
    """Pins F2 (GetQueueStats): with RabbitMQ not answering, the statistics still answer within seconds, each
    queue's ``broker_ready`` -1 (unknown, as the proto documents), the job counts from PostgreSQL (before, the
    call hung until the client's deadline)."""
    async with behind_proxy(database_url, unique_name) as (queue, proxy):
        proxy.freeze()
        await queue.submit()
        started_at = time.monotonic()
        try:
            stats = await queue.stub.GetQueueStats(queue_service_pb2.GetQueueStatsRequest(), timeout=10)
        except grpc.aio.AioRpcError as exc:
            raise AssertionError(f"GetQueueStats did not answer: {exc.code().name}") from None
        assert time.monotonic() - started_at < 7
        depths = {d.queue: d for d in stats.queues}
        assert {d.broker_ready for d in depths.values()} == {-1}
        assert depths[queue.inference_queue].jobs_by_state["QUEUED"] == 1


async def test_the_health_check_notices_a_broker_that_does_not_answer(
    database_url: str, unique_name: str
) -> None:
    """Pins the health side of F2: the ``rabbitmq`` check asks the broker (a round trip) instead of reading a
    flag, so a black hole shows as degraded within seconds, and the check passes again once RabbitMQ answers
    (before, it said "connected" until the AMQP heartbeat gave up)."""

    def rabbitmq(queue: Harness) -> str:
        return next(r.status for r in queue.runtime.monitor.results if r.name == "rabbitmq")

    async def until(queue: Harness, status: str, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while rabbitmq(queue) != status:
            assert time.monotonic() < deadline, f"rabbitmq check still {rabbitmq(queue)} after {seconds}s"
            await asyncio.sleep(0.1)

    async with amqp_proxy() as proxy:
        settings = fast_settings(database_url, proxy.url, unique_name, relay_process=False)
        async with running_queue(settings) as queue:
            await until(queue, "ok", 5)
            proxy.freeze()
            try:
                await until(queue, "degraded", 8)
            finally:
                proxy.thaw()
            await until(queue, "ok", 10)


# --- F3: questions about a queue that does not exist -------------------------------------------------------


@contextlib.asynccontextmanager
async def connected(url: str, name: str) -> AsyncIterator[tuple[Broker, aiormq.Connection]]:
    """A connected :class:`Broker` and its AMQP connection underneath (closed after)."""
    broker = Broker(url, delivery_limit=3, name=name)
    await broker.connect()
    try:
        connection = broker._connection
        assert connection is not None
        assert connection.transport is not None
        amqp = connection.transport.connection
        assert isinstance(amqp, aiormq.Connection)
        yield broker, amqp
    finally:
        await broker.close()


async def test_asking_about_a_missing_queue_leaves_no_channel_open(amqp_url: str) -> None:
    """Pins F3 (Broker.lane_ready_count): a ready count of a queue that does not exist is -1 and leaves no
    channel open on the connection (before, each call left one open: aio-pika reopened the robust channel the
    broker closed, and the check saw it closed; at channel_max the connection failed)."""
    async with connected(amqp_url, "test-missing-lane") as (broker, amqp):
        channels = amqp.channels
        before = len(channels)
        missing = f"t{uuid.uuid4().hex[:10]}.no-such-lane"
        for _ in range(10):
            assert await broker.lane_ready_count(missing) == -1
        assert await broker.ready_count(missing) == -1
        await asyncio.sleep(1.5)  # aio-pika reopens a closed robust channel after a pause
        assert len(channels) == before
        await broker.check()
        assert len(channels) == before


async def test_questions_their_callers_give_up_on_never_cut_the_connection(amqp_url: str) -> None:
    """Ready counts (GetQueueStats, the reconciler) and health checks whose callers stop waiting at every
    point between a channel's open and its close (a client's 1-5 ms deadline) leave the broker's connection
    open and no channel behind: each question finishes in the broker's own task. Cancelled half-way, RabbitMQ
    closed the whole connection within the first 20 questions (``CHANNEL_ERROR - expected 'channel.open'``)."""
    async with connected(amqp_url, "test-cancelled-questions") as (broker, amqp):
        queue = f"t{uuid.uuid4().hex[:10]}.cancelled-questions"
        await broker.declare(queue)
        try:
            before = len(amqp.channels)
            given_up = 0
            for step in range(300):
                question = broker.ready_count(queue) if step % 3 else broker.check()
                try:
                    await asyncio.wait_for(question, (step % 50) / 10_000)
                except TimeoutError:
                    given_up += 1
                assert not amqp.is_closed, (
                    f"RabbitMQ closed the connection at question {step}: {amqp.closing}"
                )
            # A third were cut short here, 99 on a CI machine: a tenth still cuts questions at every stage.
            assert given_up > 30, "the timeouts did not cut the questions short; the test needs tighter ones"
            assert await broker.ready_count(queue) == 0
            await broker.check()
            deadline = time.monotonic() + broker.answer_seconds
            while (len(amqp.channels), len(broker._asking)) != (before, 0) and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            assert (len(amqp.channels), len(broker._asking)) == (before, 0)
            assert not amqp.is_closed
        finally:
            await delete_queues(amqp_url, [queue])


# --- F2 and F7 in the reconciler alone ----------------------------------------------------------------------


class Jobs:
    """A repository with one due retry, one expired lease and stale jobs in ``stale`` queues."""

    def __init__(self, stale: list[str]) -> None:
        self.stale = stale
        self.calls: list[str] = []
        self.redispatched: list[list[str]] = []
        self.overtaken: list[list[str]] = []

    async def requeue_due_retries(self) -> list[Any]:
        self.calls.append("requeue_due_retries")
        return [("retry", "q")]

    async def expire_leases(self) -> list[Any]:
        self.calls.append("expire_leases")
        return []

    async def stale_queues(self, seconds: float) -> list[str]:
        self.calls.append("stale_queues")
        return self.stale

    async def stale_jobs(self, seconds: float, queues: list[str], limit: int = 200) -> list[Any]:
        return [{"id": queue, "queue": queue} for queue in queues if queue in self.stale]

    async def redispatch_stale(self, seconds: float, job_ids: list[str]) -> list[Any]:
        self.calls.append("redispatch_stale")
        self.redispatched.append(list(job_ids))
        return []

    async def redispatch_overtaken(
        self, seconds: float, queues: list[str], *, margin_seconds: float
    ) -> list[Any]:
        self.calls.append("redispatch_overtaken")
        self.overtaken.append(list(queues))
        return []


async def test_a_sweep_does_not_wait_for_a_broker_that_does_not_answer() -> None:
    """Pins F2 in the reconciler itself: a ready count that never returns is given up after
    ``ready_timeout_seconds`` and taken as unknown (nothing re-dispatched), and the sweep ends, so the next
    ones requeue and expire as usual (before, the sweep waited for ever)."""
    asked = 0

    async def never(queue: str) -> int:
        nonlocal asked
        asked += 1
        await asyncio.Event().wait()
        return 0

    jobs = Jobs(stale=["q"])
    sweeper = Reconciler(cast(JobRepository, jobs), ready_count=never, stale_check_seconds=0)
    sweeper.ready_timeout_seconds = 0.2
    for _ in range(2):
        assert await asyncio.wait_for(sweeper.sweep(), 2) == 1
    assert asked == 2
    assert jobs.calls.count("requeue_due_retries") == 2
    assert jobs.redispatched == []


async def test_the_broker_is_asked_before_the_database_about_stale_jobs() -> None:
    """Pins F7: given its job queues, the reconciler asks the broker first and runs no stale-job query for a
    queue that cannot be asked (-1); a queue holding ready messages is only looked for dispatches a claim
    overtook, and a quiet queue (0 ready) for all its stale jobs, each kind in one statement, without the
    query that listed the queues with stale jobs."""
    ready = {"busy": 7, "away": -1}
    jobs = Jobs(stale=["busy", "away"])

    async def count(queue: str) -> int:
        return ready[queue]

    sweeper = Reconciler(
        cast(JobRepository, jobs), ready_count=count, queues=["busy", "away"], stale_check_seconds=0
    )
    await sweeper.sweep()
    assert "stale_queues" not in jobs.calls
    assert (jobs.redispatched, jobs.overtaken) == ([], [["busy"]])

    ready["away"] = 0
    await sweeper.sweep()
    assert "stale_queues" not in jobs.calls
    assert (jobs.redispatched, jobs.overtaken) == ([["away"]], [["busy"], ["busy"]])

    ready["busy"] = -1
    await sweeper.sweep()
    assert (jobs.redispatched, jobs.overtaken) == ([["away"], ["away"]], [["busy"], ["busy"]])


async def test_the_queue_service_gives_the_reconciler_its_job_queues(
    database_url: str, amqp_url: str
) -> None:
    """F7's wiring: the queue service's reconciler is given the job queues the service submits to, so it asks
    the broker about them before it looks for stale jobs in PostgreSQL."""
    app = QueueApp(fast_settings(database_url, amqp_url, "twiring"))
    try:
        assert app.reconciler.queues == app.servicer.queues
    finally:
        await app.pool.close()


class _SlowOnceChannels:
    """An AMQP connection whose first channel takes ten seconds to open and whose later ones open at once."""

    def __init__(self) -> None:
        self.slow = True

    async def channel(self, publisher_confirms: bool = True) -> Any:
        if self.slow:
            self.slow = False
            await asyncio.sleep(10)
        return _Channel()


class _Channel:
    is_closed = False

    async def close(self) -> None:
        self.is_closed = True

    async def queue_declare(self, queue: str, passive: bool = False) -> Any:
        return types.SimpleNamespace(message_count=4)


async def test_a_question_its_caller_gave_up_on_does_not_hold_the_next_ones_off() -> None:
    """A health check cancelled by the monitor's own timeout (2 s, under the broker's 3 s) is not a broker that
    does not answer: the next question is asked (it answered -1 at once for 3 s, the reconciler blind)."""
    connected = asyncio.Event()
    connected.set()
    connection = types.SimpleNamespace(
        transport=types.SimpleNamespace(connection=_SlowOnceChannels()), is_closed=False, connected=connected
    )
    broker = Broker("amqp://unused", delivery_limit=3)
    broker._connection = cast(Any, connection)
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(broker.check(), 0.05)
    assert await broker.lane_ready_count("lane") == 4


@pytest.mark.parametrize(("query", "expected"), [("", HEARTBEAT_SECONDS), ("heartbeat=7", 7)])
async def test_the_connection_asks_for_a_short_heartbeat_unless_the_url_names_one(
    amqp_url: str, query: str, expected: int
) -> None:
    """The connection's AMQP heartbeat is 15 s (a silent broker is taken for gone after about 48 s, where
    RabbitMQ's default 60 s took 183 s), and a ``heartbeat`` in the URL is the operator's choice and wins."""
    url = f"{amqp_url}{'&' if '?' in amqp_url else '?'}{query}" if query else amqp_url
    async with connected(url, "test-heartbeat") as (_, amqp):
        assert amqp.heartbeat_timeout == expected


async def test_the_health_check_says_why_the_broker_is_not_connected_yet(amqp_url: str) -> None:
    """While a refused login is retried, the ``rabbitmq`` check names it instead of a bare "connecting", which
    left an operator with a wrong password looking for a broker that was up."""
    wrong = amqp_url.replace("guest:guest@", "guest:wrong-password@")
    assert wrong != amqp_url, "the test needs the guest user's URL"
    broker = Broker(wrong, delivery_limit=3, name="test-refused-login", reconnect_seconds=0.1)
    connecting = asyncio.create_task(broker.connect())
    try:
        deadline = time.monotonic() + 10
        while True:
            with pytest.raises(ConnectionError) as refused:
                await broker.check()
            if "ACCESS_REFUSED" in str(refused.value) or "authentication" in str(refused.value).lower():
                break
            assert time.monotonic() < deadline, f"the check never said why: {refused.value}"
            await asyncio.sleep(0.05)
        assert str(refused.value).startswith("not connected to RabbitMQ yet (connecting; connect failed:")
    finally:
        connecting.cancel()
        await asyncio.gather(connecting, return_exceptions=True)
        await broker.close()
