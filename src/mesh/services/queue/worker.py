"""The worker runtime: consumes a job queue and runs a :class:`~mesh.kit.jobs.JobHandler` per dispatch.

Embedding it in a service (the image processing and inference services do), with :func:`attach_worker`::

    runtime = ServiceRuntime(...)
    await attach_worker(runtime, settings, resources, queue=IMAGE_JOBS_QUEUE, handler=handler, name="image-processing")

which builds the :class:`JobWorker` from the service's :class:`~mesh.kit.settings.WorkerSettings`
(``database_url`` of the queue's database, ``amqp_url``, ``job_concurrency``, ...), adds its checks to the
service's health and runs it until the runtime stops (nothing when ``job_concurrency`` is 0).
``options`` (:class:`WorkerOptions`) tunes leases, beats and retries. ``run(stopping)`` connects (waiting
for PostgreSQL and RabbitMQ), consumes until ``stopping`` is set, then stops taking dispatches, hands back
those it holds but has not started, and gives running jobs ``options.drain_seconds`` to finish (in a
service, its grace less a margin for what follows: :func:`drain_seconds_within`). A job still running
then is abandoned and its claim handed back (QUEUED again at the same attempt, with a new
dispatch, and its message acked): a stop spends none of the job's attempts, where a lease left to expire
would count a SYSTEM error.

Priorities: the job queue is two RabbitMQ lanes (``topology``: ``<queue>`` for priority 0-4,
``<queue>.high`` for 5-9), and the worker consumes both, each on its own channel with a prefetch of
``concurrency``. It runs at most ``concurrency`` jobs at once; the deliveries it holds beyond that wait in
the worker (:class:`WaitingDeliveries`), and each slot that frees goes to the waiting delivery with the
highest priority (the AMQP ``priority`` property the relay sets; 0 when absent), then the earliest
arrived. A high-priority dispatch published behind a backlog of normal ones is therefore delivered at once
on its lane and starts as soon as a slot frees. Waiting happens outside the consumer callbacks (which
return at once), so nothing waits in a task that a closing channel cancels; a waiting delivery whose
channel closed (RabbitMQ requeued it) is dropped rather than run, and on stop the consumers are cancelled
first, then the waiting deliveries are rejected with requeue (each counts as a delivery towards the
delivery limit; the dead-letter consumer tells such bystanders from crashers).

For each dispatch (a ``JobDispatch``: job id and attempt, the fencing token):

1. an undecodable message is rejected without requeue, so it is dead-lettered;
2. the job is claimed with fencing: ``UPDATE ... WHERE id AND attempt AND state = 'QUEUED'`` under a fresh
   claim token (a redelivered dispatch may take over its RUNNING attempt: the earlier holder crashed or
   lost its connection, and is fenced out by the new token); no row -> duplicate, stale or cancelled ->
   ack and drop;
3. the handler runs as a task while a beat task extends the lease and reads ``cancel_requested``;
   ``JobContext.progress`` records progress (throttled) and raises ``JobCancelled`` once cancel was seen;
4. the outcome (SUCCEEDED with the result; RETRY_WAIT with ``next_run_at`` by backoff; FAILED; CANCELLED)
   is committed, fenced by the token, and only then is the message acked.

Claims and outcomes of jobs running at the same time share statements (``batching.GroupCommit``: one round
trip and one commit per batch, each row fenced on its own), and acks of consecutive deliveries share one
``basic.ack`` (``acks.Acks``), so a busy worker pays per batch what an idle one pays per job.

A worker that dies mid-job leaves its message unacked: RabbitMQ redelivers it (the quorum queue counts
deliveries) and the next worker takes over; a job that kills every worker ends in the dead-letter queue,
whose consumer marks it DEAD. The consumer span of each job is the child of the producer's context and
links to it.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import grpc
from aio_pika.abc import AbstractIncomingMessage
from google.protobuf.message import DecodeError
from opentelemetry import trace
from prometheus_client import Counter, Histogram

from mesh.common.v1 import errors_pb2
from mesh.kit import errors, tracing
from mesh.kit.db import RETRY_ON, PostgresCheck, prepare_database
from mesh.kit.health import Degrading, DependencyCheck, FunctionCheck
from mesh.kit.jobs import JobCancelled, JobHandler, LeaseLost
from mesh.kit.logging import describe, get_logger
from mesh.kit.runtime import ServiceRuntime
from mesh.kit.settings import DEFAULT_DELIVERY_LIMIT, BrokerSettings, WorkerSettings
from mesh.queue.v1 import job_pb2
from mesh.services.queue.acks import Acks
from mesh.services.queue.breaker import DependencyBreaker
from mesh.services.queue.broker import Broker
from mesh.services.queue.convert import category_from_proto, row_to_job
from mesh.services.queue.repository import (
    MIGRATIONS,
    ClaimStore,
    JobPool,
    Outcome,
    Row,
    open_pool,
)
from mesh.services.queue.states import Attempts, Backoff, ErrorCategory, JobState, decide_failure
from mesh.services.queue.topology import MAX_PRIORITY

log = get_logger(__name__)
tracer = tracing.tracer(__name__)

OUTCOMES = Counter(
    "mesh_queue_job_outcomes_total",
    "Job attempts by outcome (state written) and error category.",
    ["queue", "outcome", "category"],
)
RETRIES = Counter("mesh_queue_job_retries_total", "Attempts that failed and will be retried.", ["queue"])
DROPPED = Counter(
    "mesh_queue_dispatches_dropped_total",
    "Dispatches acked without running: duplicate, stale, cancelled, or fenced out.",
    ["queue", "reason"],
)
DROP_REASONS = ("not_claimable", "lease_lost", "fenced_out")
UNDECODABLE = Counter(
    "mesh_queue_undecodable_dispatches_total",
    "Messages that were not a JobDispatch (dead-lettered).",
    ["queue"],
)
HELD_BACK = Counter(
    "mesh_queue_worker_held_back_total",
    "Times a worker held new jobs back because a service its jobs call answered UNAVAILABLE.",
    ["queue"],
)
ATTEMPT_SECONDS = Histogram(
    "mesh_queue_job_attempt_seconds",
    "Duration of one job attempt, claim to committed outcome.",
    ["queue", "outcome"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
)


def _export_at_zero(queue: str) -> None:
    """Export the queue's counters at 0 for every outcome they can count: ``rate()`` and ``increase()`` miss
    the first increment of a series that appears at 1 (the first failure after a restart would not alert)."""
    OUTCOMES.labels(queue, JobState.SUCCEEDED, "")
    OUTCOMES.labels(queue, JobState.CANCELLED, "")
    for state in (JobState.RETRY_WAIT, JobState.FAILED, JobState.DEAD):
        for category in ErrorCategory:
            OUTCOMES.labels(queue, state, category)
    RETRIES.labels(queue)
    HELD_BACK.labels(queue)
    UNDECODABLE.labels(queue)
    for reason in DROP_REASONS:
        DROPPED.labels(queue, reason)


@dataclass(frozen=True)
class WorkerOptions:
    """How a worker holds and reports its jobs."""

    lease_seconds: float = 30.0
    """How long a claim holds without a beat; past it, the reconciler counts the attempt a SYSTEM failure
    (RETRY_WAIT with backoff, or FAILED once the attempts are spent)."""

    heartbeat_seconds: float = 5.0
    """How often the lease is extended and cancel requests are read (well under ``lease_seconds``)."""

    progress_interval_seconds: float = 0.5
    """Least time between two progress writes (a new stage is written at once)."""

    delivery_limit: int = DEFAULT_DELIVERY_LIMIT
    """The job queue's ``x-delivery-limit`` (must match the queue service's)."""

    commit_timeout_seconds: float = 60.0
    """How long a claim or an outcome is retried while PostgreSQL drops connections."""

    attempt_seconds: float | None = 600.0
    """Longest an attempt may run: past it the handler is cancelled and the attempt counts a SYSTEM error
    (``DEADLINE_EXCEEDED``), retried with backoff like any other until the attempts are spent. A handler that
    hangs (a lost GPU, a deadlock) would otherwise keep its job RUNNING for ever, its beat renewing the lease.
    Work the handler left in a thread runs on unseen. None: no limit."""

    drain_seconds: float = 10.0
    """On stop, how long running jobs may take to finish before they are abandoned and handed back (in a
    service, set from its ``grace_seconds`` by :func:`attach_worker`)."""

    reconnect_seconds: float = 1.0
    """Pause between reconnection attempts to RabbitMQ."""

    db_pool_max_size: int | None = None
    """PostgreSQL connections (default: concurrency + 2)."""

    dependency_pause_seconds: float = 1.0
    """After an attempt failed because a service its job calls was unavailable, how long the worker starts no
    new attempt; then one trial, whose failure doubles the pause (:class:`~.breaker.DependencyBreaker`)."""

    dependency_pause_max_seconds: float = 10.0
    """The longest pause between two trials while a service the jobs call stays unavailable: how long after it
    is back the jobs may still wait, against one attempt spent per trial (each a job of the backlog in turn)."""

    suspect_grace_seconds: float = 5.0
    """Redelivered dispatches (a worker holding them died, maybe killed by one of them) run one at a time:
    the next is claimed when the previous ended or after this long. Jobs claimed together in one batch
    would otherwise all count a claim when one of them crashes the worker, and the dead-letter consumer
    would take the bystanders for crashers too (see ``states.dead_letter_outcome``)."""


STOP_MARGIN_SECONDS = 2.0
"""Of a service's drain grace, what its worker keeps for after its jobs (handing back the claims of those it
abandons, acks, closing its broker connection and pool), so that the runtime, which cancels background tasks
at the end of the grace, does not cut them: a cut left the claims to expire as SYSTEM errors."""

RELEASE_SECONDS = 1.0
"""How long handing back an abandoned job's claim may take before its lease is left to expire instead."""


def drain_seconds_within(grace_seconds: float) -> float:
    """What a worker in a service draining for ``grace_seconds`` gives its running jobs: the grace less
    ``STOP_MARGIN_SECONDS``, or half a shorter grace."""
    return grace_seconds - min(STOP_MARGIN_SECONDS, grace_seconds / 2)


Held = TypeVar("Held")


class WaitingDeliveries(Generic[Held]):
    """Deliveries a worker holds but has not started: taken highest priority first, then in arrival order
    (across both lanes)."""

    def __init__(self) -> None:
        self._heap: list[tuple[int, int, Held]] = []
        self._arrivals = itertools.count()

    def __len__(self) -> int:
        return len(self._heap)

    def push(self, delivery: Held, priority: int) -> None:
        """Hold ``delivery`` until a slot frees."""
        heapq.heappush(self._heap, (-priority, next(self._arrivals), delivery))

    def pop(self) -> Held:
        """The delivery to start next (raises IndexError when none waits)."""
        return heapq.heappop(self._heap)[2]

    def take_all(self) -> list[Held]:
        """Every waiting delivery, in the order they would have started; none waits after."""
        taken = [entry[2] for entry in sorted(self._heap)]
        self._heap.clear()
        return taken


def delivery_priority(message: AbstractIncomingMessage) -> int:
    """A dispatch's priority: its AMQP ``priority`` property, 0 when absent (published before the relay set
    it), clamped to 0-9."""
    return min(max(int(message.priority or 0), 0), MAX_PRIORITY)


def _channel_closed(message: AbstractIncomingMessage) -> bool:
    """True when ``message`` can no longer be settled: its channel closed, and RabbitMQ requeued it."""
    try:
        return bool(message.channel.is_closed)
    except Exception:  # aio-pika raises once the channel is closed
        return True


class RunningJob:
    """The :class:`~mesh.kit.jobs.JobContext` of one attempt."""

    def __init__(self, store: ClaimStore, row: Row, token: uuid.UUID, options: WorkerOptions) -> None:
        self._store = store
        self._row = row
        self._job = row_to_job(row)
        self._token = token
        self._options = options
        self.cancel_seen = bool(row["cancel_requested"])
        self.lease_lost = False
        self._fraction = 0.0
        self._stage = ""
        self._written_at = 0.0
        self._dirty = False

    @property
    def job(self) -> job_pb2.Job:
        """The job as claimed."""
        return self._job

    @property
    def job_id(self) -> uuid.UUID:
        """The job's id."""
        return uuid.UUID(self._job.id)

    @property
    def result_key(self) -> str:
        """Unique to this job and attempt: results written under it are idempotent across redeliveries."""
        return f"job-{self._job.id}-attempt-{self._job.attempt}"

    async def progress(self, fraction: float, stage: str) -> None:
        """Record progress; raises JobCancelled once a cancel request was seen (here or by the beat)."""
        self._check()
        fraction = min(max(float(fraction), 0.0), 1.0)
        new_stage = stage != self._stage
        self._fraction, self._stage, self._dirty = fraction, stage, True
        now = time.monotonic()
        if new_stage or now - self._written_at >= self._options.progress_interval_seconds:
            await self.beat()
        self._check()

    def _check(self) -> None:
        if self.lease_lost:
            raise LeaseLost(f"job {self._job.id} was taken over")
        if self.cancel_seen:
            raise JobCancelled(f"job {self._job.id} was cancelled")

    async def beat(self) -> None:
        """Extend the lease, write pending progress, read the cancel flag."""
        dirty = self._dirty
        self._dirty = False
        self._written_at = time.monotonic()
        cancel = await self._store.beat(
            self.job_id,
            self._token,
            lease_seconds=self._options.lease_seconds,
            progress=self._fraction if dirty else None,
            stage=self._stage if dirty else None,
        )
        if cancel is None:
            self.lease_lost = True
        elif cancel:
            self.cancel_seen = True


class JobWorker:
    """Consumes one job queue and runs a handler for each dispatch (see the module docstring)."""

    def __init__(
        self,
        settings: BrokerSettings,
        *,
        queue: str,
        handler: JobHandler,
        concurrency: int = 4,
        options: WorkerOptions | None = None,
        name: str = "worker",
    ) -> None:
        if concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        self.queue = queue
        _export_at_zero(queue)
        self._database_url = settings.database_url
        self.handler = handler
        self.concurrency = concurrency
        self.options = options or WorkerOptions()
        self.name = name
        self.pool: JobPool = open_pool(
            settings.database_url,
            name=f"{name}-jobs",
            max_size=self.options.db_pool_max_size or concurrency + 2,
        )
        self.store = ClaimStore(self.pool, retry_timeout=self.options.commit_timeout_seconds)
        self.broker = Broker(
            settings.amqp_url,
            delivery_limit=self.options.delivery_limit,
            reconnect_seconds=self.options.reconnect_seconds,
            name=f"{name}:{queue}",
        )
        self._tasks: set[asyncio.Task[None]] = set()
        self._waiting: WaitingDeliveries[AbstractIncomingMessage] = WaitingDeliveries()
        self._acks = Acks()
        self._suspects = asyncio.Lock()
        self._accepting = False
        self._abandoning = False
        self._drain_deadline: float | None = None
        self.breaker = DependencyBreaker(
            first_pause=self.options.dependency_pause_seconds,
            max_pause=self.options.dependency_pause_max_seconds,
        )
        self._wake: asyncio.TimerHandle | None = None
        self._trial: asyncio.Task[None] | None = None
        """The attempt the breaker let through after a pause, while it runs."""
        self.ready = asyncio.Event()

    @property
    def running(self) -> int:
        """Dispatches being processed now (at most ``concurrency``)."""
        return len(self._tasks)

    @property
    def waiting(self) -> int:
        """Deliveries held but not started (waiting for a slot)."""
        return len(self._waiting)

    def checks(self) -> Sequence[DependencyCheck]:
        """Health checks of the worker's own PostgreSQL pool and RabbitMQ connection: reported, but they only
        degrade the process, whose own API (processing, predictions) needs neither."""
        return [
            Degrading(PostgresCheck(self.pool, name="postgresql-jobs")),
            Degrading(FunctionCheck("rabbitmq-jobs", self.broker.check)),
            Degrading(FunctionCheck("job-dependencies", self._dependencies_check)),
        ]

    async def _dependencies_check(self) -> str:
        """Failing while the breaker holds attempts back: what the jobs call is unavailable."""
        if self.breaker.closed:
            return "jobs start"
        raise RuntimeError(
            f"new jobs held back (next trial in {self.breaker.seconds_left():.1f}s): a service they call is "
            f"unavailable: {self.breaker.reason}"
        )

    async def run(self, stopping: asyncio.Event) -> None:
        """Consume until ``stopping`` is set, then drain. Connecting and setting up the consumers are retried
        through connection resets (``Broker.connect``, ``Broker.consume``): a broker blip while the worker
        starts does not end ``run``, which would stop the service it is attached to; a declaration the broker
        refuses (a queue declared with other arguments) does."""
        await self.pool.open(wait=False)
        try:
            # Workers may start before the queue service on a fresh database: the schema comes first
            # (idempotent, under the migration lock), so no dispatch meets a missing table.
            await prepare_database(self._database_url, "queue", MIGRATIONS, timeout=None)
            await self.broker.connect()
            self._accepting = True
            consumers = await self.broker.consume(self.queue, self._on_message, prefetch=self.concurrency)
            log.info("worker consuming", queue=self.queue, concurrency=self.concurrency)
            self.ready.set()
            await stopping.wait()
            # The jobs' time counts from the stop, not from when the consumers are cancelled.
            self._drain_deadline = asyncio.get_running_loop().time() + self.options.drain_seconds
            # Stop deliveries first, so that no new dispatch is handed back (each hand-back counts as a
            # delivery towards the dead-letter limit).
            for consumed, tag in consumers:
                with contextlib.suppress(Exception):
                    await consumed.cancel(tag)
        finally:
            self._accepting = False
            await self._hand_back()
            await self._drain()
            await self._acks.drain()
            await self.broker.close()
            await self.pool.close()
            log.info("worker stopped", queue=self.queue)

    async def _hand_back(self) -> None:
        """Stopping: give back what waits for a slot (at once, for other workers to run)."""
        waiting = self._waiting.take_all()
        if waiting:
            log.info("waiting dispatches handed back", queue=self.queue, count=len(waiting))
        for message in waiting:
            await self._acks.reject(message, requeue=True)

    async def _drain(self) -> None:
        if not self._tasks:
            return
        now = asyncio.get_running_loop().time()
        timeout = max((self._drain_deadline or now + self.options.drain_seconds) - now, 0.0)
        _, pending = await asyncio.wait(set(self._tasks), timeout=timeout)
        # Each abandoned attempt hands its claim back as it ends (_attempt).
        self._abandoning = True
        for task in pending:
            task.cancel()
        for task in pending:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        if not self._accepting:
            # Stopping: hand the dispatch back at once (RabbitMQ counts it as a delivery).
            await self._acks.reject(message, requeue=True)
            return
        self._waiting.push(message, delivery_priority(message))
        self._start_waiting()

    def _start_waiting(self) -> None:
        """Give each free slot to the waiting delivery with the highest priority (then the earliest), unless
        the breaker holds new attempts back (then try again when its pause ends)."""
        while self._accepting and len(self._tasks) < self.concurrency and self._waiting:
            if not self.breaker.ready():
                # A running trial wakes the worker as it ends (_finished); a pause, when it is over.
                if not self.breaker.trial_running:
                    self._wake_after(self.breaker.seconds_left())
                return
            message = self._waiting.pop()
            if _channel_closed(message):
                # RabbitMQ requeued it with its channel, and delivers it again (here, after a reconnect, or
                # to another worker): running it now could not even be acked.
                log.info("waiting dispatch dropped: its channel closed", message_id=message.message_id)
                continue
            trial = self.breaker.started()
            task = asyncio.create_task(self._process(message), name=f"job-{message.message_id}")
            if trial:
                self._trial = task
            self._tasks.add(task)
            task.add_done_callback(self._finished)

    def _wake_after(self, seconds: float) -> None:
        """Call :meth:`_start_waiting` again once the breaker's pause is over (one timer at a time)."""
        if self._wake is not None and not self._wake.cancelled():
            self._wake.cancel()
        self._wake = asyncio.get_running_loop().call_later(max(seconds, 0.0) + 0.001, self._start_waiting)

    def _finished(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if task is self._trial:
            # Whatever ended it (an outcome, a job not claimable, a crash, a lost lease), the next may start.
            self._trial = None
            self.breaker.trial_ended()
        self._start_waiting()

    async def _process(self, message: AbstractIncomingMessage) -> None:
        try:
            dispatch = job_pb2.JobDispatch.FromString(message.body)
            job_id = uuid.UUID(dispatch.job_id)
            if dispatch.attempt < 1:
                raise ValueError("attempt must be at least 1")
        except (DecodeError, ValueError) as exc:
            UNDECODABLE.labels(self.queue).inc()
            log.warning("undecodable dispatch dead-lettered", queue=self.queue, error=describe(exc))
            await self._acks.reject(message, requeue=False)
            return
        headers = {k: v for k, v in (message.headers or {}).items() if isinstance(v, str)}
        parent = tracing.extract(headers)
        producer = trace.get_current_span(parent).get_span_context()
        links = [trace.Link(producer)] if producer.is_valid else []
        with tracer.start_as_current_span(
            f"{self.queue} process",
            context=parent,
            kind=trace.SpanKind.CONSUMER,
            links=links,
            attributes={
                "messaging.system": "rabbitmq",
                "messaging.destination.name": message.routing_key or self.queue,
                "messaging.operation": "process",
                "mesh.job.id": str(job_id),
                "mesh.job.attempt": dispatch.attempt,
                "mesh.job.priority": delivery_priority(message),
                "messaging.rabbitmq.redelivered": bool(message.redelivered),
            },
        ):
            try:
                await self._run_attempt(message, job_id, dispatch.attempt)
            except Exception:
                # A bug of the runtime itself: hand the dispatch back rather than leave it unsettled.
                log.exception("dispatch not processed; requeued", job_id=str(job_id))
                await self._acks.reject(message, requeue=True)

    async def _run_attempt(self, message: AbstractIncomingMessage, job_id: uuid.UUID, attempt: int) -> None:
        if not message.redelivered:
            await self._attempt(message, job_id, attempt)
            return
        await self._suspects.acquire()
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                self._suspects.release()

        timer = asyncio.get_running_loop().call_later(self.options.suspect_grace_seconds, release)
        try:
            await self._attempt(message, job_id, attempt)
        finally:
            timer.cancel()
            release()

    async def _attempt(self, message: AbstractIncomingMessage, job_id: uuid.UUID, attempt: int) -> None:
        token = uuid.uuid4()
        try:
            row = await self.store.claim(
                job_id,
                attempt,
                token,
                redelivered=bool(message.redelivered),
                lease_seconds=self.options.lease_seconds,
            )
        except RETRY_ON as exc:
            # PostgreSQL stayed away: give the dispatch back; a redelivery takes the job over.
            log.warning("claim failed; dispatch requeued", job_id=str(job_id), error=describe(exc))
            await self._acks.reject(message, requeue=True)
            return
        if row is None:
            DROPPED.labels(self.queue, "not_claimable").inc()
            self._acks.ack(message)
            return
        started = time.perf_counter()
        running = RunningJob(self.store, row, token, self.options)
        try:
            outcome = await self._execute(running, row)
        except asyncio.CancelledError:
            if self._abandoning:
                await self._release(message, job_id, token)
            raise
        if outcome is None:  # lease lost: another worker owns the job now
            DROPPED.labels(self.queue, "lease_lost").inc()
            self._acks.ack(message)
            return
        try:
            written = await self.store.finish(job_id, token, outcome)
        except RETRY_ON as exc:
            log.warning("outcome not committed; dispatch requeued", job_id=str(job_id), error=describe(exc))
            await self._acks.reject(message, requeue=True)
            return
        if written is None:
            DROPPED.labels(self.queue, "fenced_out").inc()
        else:
            category = outcome.category.value if outcome.category else ""
            # One line per attempt, inside the job's span: the worker's hop in the job's trace.
            log.info(
                "job attempt finished",
                job_id=str(job_id),
                attempt=attempt,
                state=str(written),
                category=category,
            )
            OUTCOMES.labels(self.queue, written, category).inc()
            ATTEMPT_SECONDS.labels(self.queue, written).observe(time.perf_counter() - started)
            if written == JobState.RETRY_WAIT:
                RETRIES.labels(self.queue).inc()
        self._acks.ack(message)

    async def _release(self, message: AbstractIncomingMessage, job_id: uuid.UUID, token: uuid.UUID) -> None:
        """Stopping: hand an abandoned attempt's claim back, and ack its dispatch, which the release replaced
        with a new one (a requeue would leave two). When that fails, the dispatch is left to RabbitMQ
        (redelivered when the channel closes) and the lease to expire, as for a worker that died."""
        try:
            async with asyncio.timeout(RELEASE_SECONDS):
                released = await self.store.release(job_id, token)
        except (TimeoutError, *RETRY_ON) as exc:
            log.warning("abandoned job not handed back", job_id=str(job_id), error=describe(exc))
            return
        if released:
            log.info("abandoned job handed back", job_id=str(job_id))
            self._acks.ack(message)

    async def _execute(self, running: RunningJob, row: Row) -> Outcome | None:
        """Run the handler under a lease beat; the outcome to commit, or None when the lease was lost."""
        handler_task: asyncio.Task[job_pb2.JobResult] = asyncio.create_task(self._limited(running))
        # The beat starts with the first heartbeat: most jobs end before it, and need no task for it.
        beat_task: asyncio.Task[None] | None = None

        def start_beat() -> None:
            nonlocal beat_task
            if not handler_task.done():
                beat_task = asyncio.create_task(self._beat(running, handler_task))

        timer = asyncio.get_running_loop().call_later(self.options.heartbeat_seconds, start_beat)
        try:
            result = await handler_task
        except LeaseLost:
            return None
        except asyncio.CancelledError:
            if running.lease_lost:
                return None
            raise
        except JobCancelled:
            outcome = Outcome(JobState.CANCELLED, "cancelled by user (seen by the worker)")
        except errors.MeshError as exc:
            self._report_dependencies(exc)
            outcome = self._failure(row, category_from_proto(exc.category), exc.message, exc.code.name)
        except Exception as exc:
            log.exception("job handler crashed", job_id=str(row["id"]))
            outcome = self._failure(row, ErrorCategory.SYSTEM, f"{type(exc).__name__}: {exc}", "INTERNAL")
        else:
            self.breaker.succeeded()
            outcome = Outcome(JobState.SUCCEEDED, "succeeded", result=result.SerializeToString())
        finally:
            timer.cancel()
            if beat_task is not None:
                beat_task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await beat_task
        # Whatever the handler made of it, an attempt that lost its lease has nothing to commit.
        return None if running.lease_lost else outcome

    def _report_dependencies(self, error: errors.MeshError) -> None:
        """Tell the breaker how the services the job called answered: an UNAVAILABLE from one of them (the
        handler raises what its calls answered) holds new attempts back; any other error of the job's own
        means they answered."""
        if error.code is not grpc.StatusCode.UNAVAILABLE:
            self.breaker.succeeded()
            return
        was_closed = self.breaker.closed
        trial = self._trial is not None and asyncio.current_task() is self._trial
        self.breaker.failed(error.message, trial=trial)
        if was_closed:
            log.warning(
                "a service the jobs call is unavailable; new jobs held back",
                queue=self.queue,
                pause_seconds=self.breaker.seconds_left(),
                error=error.message,
            )
            HELD_BACK.labels(self.queue).inc()

    async def _limited(self, running: RunningJob) -> job_pb2.JobResult:
        """The handler under ``options.attempt_seconds``: past it, DeadlineExceeded (category SYSTEM)."""
        limit = self.options.attempt_seconds
        if limit is None:
            return await self.handler(running)
        scope = asyncio.timeout(limit)
        try:
            async with scope:
                return await self.handler(running)
        except TimeoutError:
            if not scope.expired():  # the handler's own, which it did not turn into an error of its kind
                raise
            log.warning(
                "job attempt ran over its time limit; stopped", job_id=str(running.job_id), seconds=limit
            )
            raise errors.DeadlineExceeded(
                f"the attempt ran over the worker's time limit of {limit:g}s (MESH_JOB_ATTEMPT_SECONDS) and was "
                "stopped",
                category=errors_pb2.ERROR_CATEGORY_SYSTEM,
            ) from None

    def _failure(self, row: Row, category: ErrorCategory, message: str, code: str) -> Outcome:
        decision = decide_failure(
            category,
            message,
            Attempts(row["attempt"], row["run_first_attempt"], row["max_attempts"]),
            Backoff(row["backoff_base_s"], row["backoff_cap_s"]),
        )
        return Outcome(
            decision.state,
            decision.reason,
            category=category,
            message=message,
            code=code,
            delay_seconds=decision.delay_seconds,
        )

    async def _beat(self, running: RunningJob, handler_task: asyncio.Task[Any]) -> None:
        """Extend the lease now and every beat after; cancel the handler when the lease is lost."""
        while not handler_task.done():
            try:
                await running.beat()
            except Exception as exc:
                # The lease may run out while PostgreSQL is away; the reconciler then records the attempt as a
                # SYSTEM failure (retried with backoff, or FAILED) and our outcome is fenced out.
                log.warning("lease beat failed", job_id=running.job.id, error=describe(exc))
            else:
                if running.lease_lost:
                    log.warning("lease lost; abandoning the job", job_id=running.job.id)
                    handler_task.cancel()
                    return
            await asyncio.sleep(self.options.heartbeat_seconds)


async def attach_worker(
    runtime: ServiceRuntime,
    settings: WorkerSettings,
    resources: contextlib.AsyncExitStack,
    *,
    queue: str,
    handler: JobHandler,
    name: str,
) -> JobWorker | None:
    """Run a worker for ``queue`` (prefixed with ``settings.queue_prefix`` and declared with
    ``settings.delivery_limit``, as the queue service does) inside a service process: its checks join the
    service's health and it stops with the runtime, giving its running jobs the service's
    ``grace_seconds`` less a margin (:func:`drain_seconds_within`). None when ``settings.job_concurrency``
    is 0 (the service only serves).

    Its pool, opened now, closes with the wiring's ``resources`` too: a runtime that fails to start (a port
    in use) never runs the worker, whose run would close it, and a pool left open kept the process from
    exiting, silently."""
    if not settings.job_concurrency:
        return None
    options = WorkerOptions(
        delivery_limit=settings.delivery_limit,
        drain_seconds=drain_seconds_within(settings.grace_seconds),
        attempt_seconds=settings.job_attempt_seconds,
    )
    worker = JobWorker(
        settings,
        queue=settings.queue_prefix + queue,
        handler=handler,
        concurrency=settings.job_concurrency,
        options=options,
        name=name,
    )
    # Open the pool now (without waiting for PostgreSQL): the health checks run before the worker does.
    await worker.pool.open(wait=False)
    resources.push_async_callback(worker.pool.close)
    for check in worker.checks():
        runtime.monitor.add_check(check)
    runtime.add_background(lambda: worker.run(runtime.stopping))
    return worker
