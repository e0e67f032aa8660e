"""Priorities past the broker: two quorum lanes per job queue (``<queue>`` for 0-4, ``<queue>.high`` for
5-9, like RabbitMQ 4's quorum queues) and a worker that starts what it holds highest priority first."""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable
from dataclasses import replace
from types import SimpleNamespace
from typing import Any, cast

import aio_pika
import pytest
from aio_pika.abc import AbstractIncomingMessage
from prometheus_client import REGISTRY

from mesh.kit.jobs import JobContext
from mesh.kit.settings import BrokerSettings
from mesh.queue.v1 import job_pb2, queue_service_pb2
from mesh.services.queue.scripted import scripted_handler
from mesh.services.queue.topology import HIGH_PRIORITY, high_lane, lane_for, lanes
from mesh.services.queue.worker import JobWorker, WaitingDeliveries, delivery_priority
from tests.queue.harness import FAST_OPTIONS, Harness

HOLD = "script:hold"


async def _until(check: Callable[[], Awaitable[bool]], what: str, timeout: float = 30.0) -> None:
    """Poll ``check`` until it holds (patient: the relay's child process starts slowly on a loaded machine)."""
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"still not {what} after {timeout}s")
        await asyncio.sleep(0.02)


class Gated:
    """A handler that records the order jobs start in; ``script:hold`` jobs run until released one by one,
    the rest run their script."""

    def __init__(self) -> None:
        self.started: list[str] = []
        self.gates: defaultdict[str, asyncio.Event] = defaultdict(asyncio.Event)

    async def __call__(self, context: JobContext) -> job_pb2.JobResult:
        self.started.append(context.job.id)
        if context.job.model == HOLD:
            await self.gates[context.job.id].wait()
            return job_pb2.JobResult(output_image_id=context.result_key)
        return await scripted_handler(context)

    async def release(self, job_id: str) -> None:
        """Let ``job_id`` finish, then wait until the slot it frees is taken by the next waiting job."""
        before = len(self.started)
        self.gates[job_id].set()

        async def next_started() -> bool:
            return len(self.started) > before

        await _until(next_started, "a waiting job started")


async def _outbox_empty(queue: Harness) -> bool:
    rows = await queue.sql("SELECT count(*) AS n FROM outbox")
    return bool(rows[0]["n"] == 0)


# --- in the worker, without a broker ---------------------------------------------------------------------


def test_waiting_deliveries_come_out_by_priority_then_arrival() -> None:
    """Highest priority first; equal priorities in arrival order; ``take_all`` keeps that order and empties."""
    waiting: WaitingDeliveries[str] = WaitingDeliveries()
    for name, priority in [("a0", 0), ("b7", 7), ("c4", 4), ("d7", 7), ("e0", 0), ("f9", 9)]:
        waiting.push(name, priority)
    assert len(waiting) == 6
    assert [waiting.pop(), waiting.pop()] == ["f9", "b7"]
    waiting.push("g7", 7)
    assert waiting.take_all() == ["d7", "g7", "c4", "a0", "e0"]
    assert len(waiting) == 0


async def _settle() -> None:
    """Let every task that can run, run (a job's end, its done callback, the next job's start)."""
    for _ in range(20):
        await asyncio.sleep(0)


def _message(priority: int | None, name: str = "", *, closed: bool = False) -> AbstractIncomingMessage:
    fake = SimpleNamespace(priority=priority, message_id=name, channel=SimpleNamespace(is_closed=closed))
    return cast(AbstractIncomingMessage, fake)


def test_delivery_priority_is_the_amqp_property_or_zero() -> None:
    """A dispatch's priority is its AMQP ``priority`` property; one published without it counts as 0, and
    values outside 0-9 are clamped."""
    assert delivery_priority(_message(None)) == 0
    assert delivery_priority(_message(6)) == 6
    assert delivery_priority(_message(200)) == 9


def test_lanes_split_priorities_like_rabbitmq_4() -> None:
    """Priorities 5-9 go to ``<queue>.high``, 0-4 to ``<queue>``, as RabbitMQ 4's quorum queues split them."""
    assert HIGH_PRIORITY == 5
    assert lanes("q") == ("q", "q.high")
    assert [lane_for("q", p) for p in range(10)] == ["q"] * 5 + ["q.high"] * 5


async def test_worker_runs_concurrency_jobs_and_gives_free_slots_to_the_highest_priority() -> None:
    """At most ``concurrency`` deliveries run; the rest wait, and each freed slot goes to the waiting one of
    highest priority (arrival order among equals); one whose channel closed is skipped, not run."""
    worker = JobWorker(BrokerSettings(), queue="q", handler=scripted_handler, concurrency=2)
    started: list[str] = []
    gates: defaultdict[str, asyncio.Event] = defaultdict(asyncio.Event)

    async def process(message: AbstractIncomingMessage) -> None:
        started.append(str(message.message_id))
        await gates[str(message.message_id)].wait()

    worker._process = process  # type: ignore[method-assign]
    worker._accepting = True
    arrivals = [("r1", 0), ("r2", 0), ("n1", 1), ("h6", 6), ("n4", 4), ("gone9", 9), ("h6b", 6), ("n0", 0)]
    for name, priority in arrivals:
        await worker._on_message(_message(priority, name, closed=name == "gone9"))
    await _settle()
    assert started == ["r1", "r2"]
    assert (worker.running, worker.waiting) == (2, 6)
    for name in ["r1", "r2", "h6", "h6b", "n4", "n1", "n0"]:
        gates[name].set()
        await _settle()
    assert started == ["r1", "r2", "h6", "h6b", "n4", "n1", "n0"]
    assert (worker.running, worker.waiting) == (0, 0)
    await worker.pool.close()


# --- on the real RabbitMQ and PostgreSQL --------------------------------------------------------------


@pytest.mark.integration
async def test_high_priority_job_overtakes_the_backlog_in_the_broker(queue: Harness) -> None:
    """One worker of concurrency 1, busy, with 20 normal jobs waiting in RabbitMQ: a job submitted after them
    with priority 9 is delivered on the high lane at once and starts as soon as the slot frees, before every
    one of the 20 (compared by start time)."""
    handler = Gated()
    running = await queue.start_worker(handler, concurrency=1)
    blocker = await queue.submit(HOLD)
    await queue.wait_for(blocker.id, {job_pb2.JOB_STATE_RUNNING})
    backlog = [await queue.submit("script:sleep=0.05") for _ in range(20)]

    async def backlog_in_broker() -> bool:
        ready = await queue.app.broker.lane_ready_count(queue.inference_queue)
        return ready == len(backlog) and await _outbox_empty(queue)

    await _until(backlog_in_broker, "20 dispatches ready in the normal lane")
    urgent = await queue.submit("script:noop", priority=9)

    async def urgent_held() -> bool:
        return running.worker.waiting == 1

    await _until(urgent_held, "the urgent dispatch held by the worker")
    await handler.release(blocker.id)
    done = await queue.wait_all([urgent.id, *(j.id for j in backlog)], timeout=60)
    assert {j.state for j in done.values()} == {job_pb2.JOB_STATE_SUCCEEDED}
    urgent_start = done[urgent.id].start_time.ToDatetime()
    assert all(urgent_start < done[j.id].start_time.ToDatetime() for j in backlog)
    assert handler.started[:2] == [blocker.id, urgent.id]


@pytest.mark.integration
async def test_waiting_deliveries_start_in_priority_order_across_lanes(queue: Harness) -> None:
    """A worker of concurrency 4 runs 4 jobs (2 from each lane) and holds 4 more: normal 1, high 6, normal 4,
    high 6, arriving in that order. Freed one slot at a time, they start high 6, high 6 (arrival order),
    normal 4, normal 1."""
    handler = Gated()
    running = await queue.start_worker(handler, concurrency=4)
    blockers = [await queue.submit(HOLD, priority=p) for p in (0, 0, 9, 9)]
    for blocker in blockers:
        await queue.wait_for(blocker.id, {job_pb2.JOB_STATE_RUNNING})
    waiting: list[str] = []
    for priority in (1, 6, 4, 6):
        waiting.append((await queue.submit(HOLD, priority=priority)).id)
        count = len(waiting)

        async def held(count: int = count) -> bool:
            return running.worker.waiting == count

        await _until(held, f"{count} dispatches held by the worker")
    assert running.worker.running == 4
    for blocker in blockers:
        await handler.release(blocker.id)
    low, high, mid, high_later = waiting
    assert handler.started[4:] == [high, high_later, mid, low]
    for job_id in waiting:
        handler.gates[job_id].set()
    done = await queue.wait_all([*(b.id for b in blockers), *waiting])
    assert {j.state for j in done.values()} == {job_pb2.JOB_STATE_SUCCEEDED}


@pytest.mark.integration
async def test_priority_selects_the_lane_and_travels_in_the_message(queue: Harness) -> None:
    """Priority 5 is published to ``<queue>.high``, priority 4 to ``<queue>``, each with its priority in the
    message's AMQP ``priority`` property; the relay counts both under the job queue, never the lane."""
    published = {"queue": queue.inference_queue}
    before = REGISTRY.get_sample_value("mesh_queue_dispatches_published_total", published) or 0
    high = await queue.submit(priority=5)
    normal = await queue.submit(priority=4)

    async def both_published() -> bool:
        counts = [await queue.app.broker.lane_ready_count(lane) for lane in lanes(queue.inference_queue)]
        return counts == [1, 1] and await _outbox_empty(queue)

    await _until(both_published, "one dispatch ready in each lane")
    connection = await aio_pika.connect(queue.settings.amqp_url)
    async with connection:
        channel = await connection.channel()
        found: dict[str, tuple[str, int | None]] = {}
        for lane in lanes(queue.inference_queue):
            declared = await channel.declare_queue(lane, passive=True)
            message = await declared.get(no_ack=True, fail=True)
            assert message is not None
            found[lane] = (job_pb2.JobDispatch.FromString(message.body).job_id, message.priority)
    assert found == {queue.inference_queue: (normal.id, 4), high_lane(queue.inference_queue): (high.id, 5)}

    async def counted() -> bool:  # the relay's child process reports its counts every 0.25 s
        return REGISTRY.get_sample_value("mesh_queue_dispatches_published_total", published) == before + 2

    await _until(counted, "both dispatches counted under the job queue", timeout=10)
    lane_labels = [
        (metric.name, sample.labels["queue"])
        for metric in REGISTRY.collect()
        if metric.name.startswith("mesh_queue")
        for sample in metric.samples
        if sample.labels.get("queue", "").endswith(".high")
    ]
    assert lane_labels == []


@pytest.mark.integration
async def test_broker_ready_counts_both_lanes(queue: Harness) -> None:
    """GetQueueStats' ``broker_ready`` of a job queue is the sum of its two lanes; lanes are not listed as
    queues of their own."""
    for priority in (0, 3, 5, 7, 9):
        await queue.submit(priority=priority)

    async def published() -> bool:
        return await queue.app.broker.lane_ready_count(
            high_lane(queue.inference_queue)
        ) == 3 and await _outbox_empty(queue)

    await _until(published, "the five dispatches published")
    stats = await queue.stub.GetQueueStats(queue_service_pb2.GetQueueStatsRequest())
    depth = next(q for q in stats.queues if q.queue == queue.inference_queue)
    assert depth.broker_ready == 5
    assert depth.jobs_by_state["QUEUED"] == 5
    assert not [q.queue for q in stats.queues if q.queue.endswith(".high")]


@pytest.mark.integration
async def test_stopping_worker_hands_back_waiting_deliveries(queue: Harness) -> None:
    """A worker asked to stop lets its running job finish but does not run the delivery waiting for a slot:
    it goes back to its lane at once, and another worker runs it."""
    handler = Gated()
    # Drain time to spare: the running job is released only once the hand-back was seen.
    options = replace(FAST_OPTIONS, drain_seconds=10.0)
    running = await queue.start_worker(handler, concurrency=1, options=options)
    blocker = await queue.submit(HOLD)
    await queue.wait_for(blocker.id, {job_pb2.JOB_STATE_RUNNING})
    urgent = await queue.submit("script:noop", priority=8)

    async def urgent_held() -> bool:
        return running.worker.waiting == 1

    await _until(urgent_held, "the urgent dispatch held by the worker")
    stopping = asyncio.create_task(running.stop())

    async def handed_back() -> bool:
        return await queue.app.broker.lane_ready_count(high_lane(queue.inference_queue)) == 1

    await _until(handed_back, "the waiting dispatch back in the high lane")
    handler.gates[blocker.id].set()
    await stopping
    assert (await queue.get(blocker.id)).state == job_pb2.JOB_STATE_SUCCEEDED
    rows = await queue.sql("SELECT state, executions FROM jobs WHERE id = %s", urgent.id)
    assert rows[0] == {"state": "QUEUED", "executions": 0}
    await queue.start_worker(scripted_handler, concurrency=1)
    assert (await queue.wait_for(urgent.id)).state == job_pb2.JOB_STATE_SUCCEEDED


@pytest.mark.integration
async def test_dead_lettered_high_lane_dispatch_ends_dead(queue: Harness) -> None:
    """A priority-9 job that kills every worker ends DEAD through the high lane's delivery limit and the job
    queue's dead-letter queue; the dead-letter counter is labelled with the job queue."""
    labels: dict[str, Any] = {"queue": queue.inference_queue, "effect": "marked_dead"}
    before = REGISTRY.get_sample_value("mesh_queue_dead_letters_total", labels) or 0
    stop = asyncio.Event()
    # A lease longer than a worker's restart: the crash loop runs on redeliveries of one attempt.
    keeper = asyncio.create_task(queue.keep_workers(1, stop, concurrency=2, lease_seconds=15.0))
    try:
        await asyncio.sleep(0.5)
        crasher = await queue.submit("script:crash", priority=9)
        dead = await queue.wait_for(crasher.id, timeout=40)
    finally:
        stop.set()
        await keeper
    assert dead.state == job_pb2.JOB_STATE_DEAD
    assert "delivered too often" in dead.error.message

    async def counted() -> bool:  # the consumer counts once its write returned
        return REGISTRY.get_sample_value("mesh_queue_dead_letters_total", labels) == before + 1

    await _until(counted, "the dead letter counted under the job queue", timeout=5)


def test_a_workers_and_the_dead_letter_consumers_counters_start_at_zero() -> None:
    """Before any job, a queue's outcome, retry, drop and dead-letter counters are exported at 0, so that
    ``increase()`` counts the first failure or dead letter after a restart (alerts depend on it)."""
    from prometheus_client import REGISTRY

    from mesh.services.queue.dead_letters import DeadLetterConsumer

    JobWorker(BrokerSettings(), queue="zero.q", handler=scripted_handler)
    DeadLetterConsumer(cast(Any, None), cast(Any, None), ["zero.q"], delivery_limit=3)

    def value(name: str, **labels: str) -> float | None:
        return REGISTRY.get_sample_value(name, {"queue": "zero.q", **labels})

    assert value("mesh_queue_job_outcomes_total", outcome="SUCCEEDED", category="") == 0
    assert value("mesh_queue_job_outcomes_total", outcome="FAILED", category="DATA") == 0
    assert value("mesh_queue_job_outcomes_total", outcome="DEAD", category="SYSTEM") == 0
    assert value("mesh_queue_job_retries_total") == 0
    assert value("mesh_queue_dispatches_dropped_total", reason="fenced_out") == 0
    for effect in ("marked_dead", "dispatched_again", "cancelled", "stale", "undecodable"):
        assert value("mesh_queue_dead_letters_total", effect=effect) == 0, effect
