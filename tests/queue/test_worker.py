"""The worker runtime end to end: claim, progress, outcome, retries with backoff, cancel, trace context."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import timedelta
from typing import Any

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from mesh.common.v1 import errors_pb2
from mesh.kit import errors, tracing
from mesh.kit.jobs import INFERENCE_JOBS_QUEUE, JobContext, JobHandler
from mesh.kit.runtime import HTTP_STOP_SECONDS, ServiceRuntime
from mesh.kit.settings import WorkerSettings
from mesh.queue.v1 import job_pb2, queue_service_pb2
from mesh.services.queue.scripted import scripted_handler
from mesh.services.queue.worker import JobWorker, attach_worker, drain_seconds_within
from tests.queue.harness import FAST_OPTIONS, Harness, fast_settings, running_queue

pytestmark = pytest.mark.integration


async def test_job_runs_once_and_keeps_its_result(queue: Harness) -> None:
    """A job is claimed, run once, SUCCEEDED with the attempt's result, progress 1, and the message acked."""
    await queue.start_worker(scripted_handler)
    job = await queue.submit("script:sleep=0.1")
    done = await queue.wait_for(job.id)
    assert done.state == job_pb2.JOB_STATE_SUCCEEDED
    assert done.result.output_image_id == f"job-{job.id}-attempt-1"
    assert done.progress == 1.0
    assert [t.to_state for t in done.history] == [
        job_pb2.JOB_STATE_QUEUED,
        job_pb2.JOB_STATE_RUNNING,
        job_pb2.JOB_STATE_SUCCEEDED,
    ]
    rows = await queue.sql("SELECT executions FROM jobs WHERE id = %s", job.id)
    assert rows[0]["executions"] == 1
    await asyncio.sleep(0.2)
    ready = await queue.app.broker.ready_count(queue.inference_queue)
    assert ready == 0


async def test_progress_is_visible_while_running(queue: Harness) -> None:
    """Progress and stage written by the handler show in GetJob while the job runs."""
    release = asyncio.Event()

    async def handler(context: JobContext) -> job_pb2.JobResult:
        await context.progress(0.4, "pipeline")
        await release.wait()
        return job_pb2.JobResult()

    await queue.start_worker(handler)
    job = await queue.submit()
    for _ in range(100):
        running = await queue.get(job.id)
        if running.stage == "pipeline":
            break
        await asyncio.sleep(0.05)
    assert running.state == job_pb2.JOB_STATE_RUNNING
    assert running.progress == pytest.approx(0.4)
    assert running.queue_position == 0
    release.set()
    assert (await queue.wait_for(job.id)).state == job_pb2.JOB_STATE_SUCCEEDED


async def test_transient_failures_retry_with_growing_backoff_then_succeed(queue: Harness) -> None:
    """Two TRANSIENT failures go through RETRY_WAIT with backoff ceilings 0.1 s and 0.2 s, then SUCCEEDED."""
    await queue.start_worker(scripted_handler)
    job = await queue.submit("script:fail=TRANSIENT:2")
    done = await queue.wait_for(job.id)
    assert done.state == job_pb2.JOB_STATE_SUCCEEDED
    assert done.attempt == 3
    waits = [t for t in done.history if t.to_state == job_pb2.JOB_STATE_RETRY_WAIT]
    assert len(waits) == 2
    delays = [(t.next_run_time.ToDatetime() - t.time.ToDatetime()) for t in waits]
    ceilings = [timedelta(seconds=0.1), timedelta(seconds=0.2)]
    for delay, ceiling in zip(delays, ceilings, strict=True):
        assert timedelta(0) <= delay <= ceiling + timedelta(milliseconds=5)
    assert "ceiling 0.1s" in waits[0].reason
    assert "ceiling 0.2s" in waits[1].reason
    requeues = [t for t in done.history if t.from_state == job_pb2.JOB_STATE_RETRY_WAIT]
    for wait, requeue in zip(waits, requeues, strict=True):
        assert requeue.time.ToDatetime() >= wait.next_run_time.ToDatetime()


async def test_transient_failures_end_failed_at_the_limit(queue: Harness) -> None:
    """A job that always fails transiently is FAILED after max_attempts, with the category kept."""
    await queue.start_worker(scripted_handler)
    job = await queue.submit("script:fail=TRANSIENT", max_attempts=3)
    done = await queue.wait_for(job.id)
    assert done.state == job_pb2.JOB_STATE_FAILED
    assert done.attempt == 3
    assert done.error.category == errors_pb2.ERROR_CATEGORY_TRANSIENT
    assert done.error.code == "UNAVAILABLE"
    states = Counter(t.to_state for t in done.history)
    assert states[job_pb2.JOB_STATE_RETRY_WAIT] == 2
    assert states[job_pb2.JOB_STATE_RUNNING] == 3


@pytest.mark.parametrize(("category", "expected"), [("PERMANENT", 3), ("DATA", 4)])
async def test_permanent_and_data_errors_fail_at_once(queue: Harness, category: str, expected: int) -> None:
    """PERMANENT and DATA errors fail on the first attempt, no retry."""
    await queue.start_worker(scripted_handler)
    job = await queue.submit(f"script:fail={category}")
    done = await queue.wait_for(job.id)
    assert done.state == job_pb2.JOB_STATE_FAILED
    assert done.attempt == 1
    assert int(done.error.category) == expected


async def test_unexpected_exception_is_a_system_error_and_retries(queue: Harness) -> None:
    """A handler bug (any exception) counts as SYSTEM: retried, then FAILED at the limit."""

    async def handler(context: JobContext) -> job_pb2.JobResult:
        raise KeyError("bug")

    await queue.start_worker(handler)
    job = await queue.submit(max_attempts=2)
    done = await queue.wait_for(job.id)
    assert done.state == job_pb2.JOB_STATE_FAILED
    assert done.attempt == 2
    assert done.error.category == errors_pb2.ERROR_CATEGORY_SYSTEM


async def test_cancel_of_a_running_job_is_seen_at_the_next_beat(queue: Harness) -> None:
    """Cancel of a running job sets cancel_requested; the handler's next progress raises and it ends CANCELLED."""
    await queue.start_worker(scripted_handler)
    job = await queue.submit("script:sleep=30")
    await queue.wait_for(job.id, {job_pb2.JOB_STATE_RUNNING})
    response = await queue.stub.CancelJob(queue_service_pb2.CancelJobRequest(job_id=job.id))
    assert response.job.state == job_pb2.JOB_STATE_RUNNING
    assert response.job.cancel_requested
    done = await queue.wait_for(job.id, timeout=5)
    assert done.state == job_pb2.JOB_STATE_CANCELLED
    assert done.history[-1].reason.startswith("cancelled by user")


async def test_cancelled_queued_job_is_never_run(queue: Harness) -> None:
    """A job cancelled while queued has its dispatch dropped by the worker's fenced claim."""
    job = await queue.submit("script:noop")
    await queue.stub.CancelJob(queue_service_pb2.CancelJobRequest(job_id=job.id))
    await queue.start_worker(scripted_handler)
    follower = await queue.submit("script:noop")
    await queue.wait_for(follower.id)
    rows = await queue.sql("SELECT executions, state FROM jobs WHERE id = %s", job.id)
    assert rows[0] == {"executions": 0, "state": "CANCELLED"}


async def test_retry_of_a_failed_job_runs_a_new_attempt(queue: Harness) -> None:
    """RetryJob of a FAILED job queues attempt n+1 with a fresh budget; its result is that attempt's."""
    await queue.start_worker(scripted_handler)
    job = await queue.submit("script:fail=PERMANENT:1")
    assert (await queue.wait_for(job.id)).state == job_pb2.JOB_STATE_FAILED
    await queue.stub.RetryJob(queue_service_pb2.RetryJobRequest(job_id=job.id))
    done = await queue.wait_for(job.id)
    assert done.state == job_pb2.JOB_STATE_SUCCEEDED
    assert done.result.output_image_id == f"job-{job.id}-attempt-2"
    assert not done.HasField("error")


async def test_consumer_span_is_child_of_and_linked_to_the_producer(
    database_url: str, amqp_url: str, unique_name: str
) -> None:
    """The worker's span continues the trace stored at submit: child of the relay's PRODUCER span (itself in
    the submitter's trace), and linked to it. (The relay runs in this process here, not in its child
    process, so that this process's exporter sees its span.)"""
    exporter = InMemorySpanExporter()
    provider = tracing.configure_tracing("tests")  # the process's provider (idempotent)
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    settings = fast_settings(database_url, amqp_url, unique_name, relay_process=False)
    async with running_queue(settings) as queue:
        await _consumer_span_is_child_of_the_producer(queue, exporter)


async def _consumer_span_is_child_of_the_producer(queue: Harness, exporter: InMemorySpanExporter) -> None:
    await queue.start_worker(scripted_handler)
    tracer = trace.get_tracer("test")
    with tracer.start_as_current_span("client") as client:
        job = await queue.submit()
    trace_id = client.get_span_context().trace_id
    await queue.wait_for(job.id)
    spans: list[ReadableSpan] = []
    for _ in range(50):
        spans = [s for s in exporter.get_finished_spans() if s.context and s.context.trace_id == trace_id]
        if any(s.name.endswith(" process") for s in spans):
            break
        await asyncio.sleep(0.05)
    publish = next(s for s in spans if s.name.endswith(" publish") and s.kind == trace.SpanKind.PRODUCER)
    process = next(s for s in spans if s.name.endswith(" process"))
    assert publish.context is not None
    assert process.parent is not None
    assert process.parent.span_id == publish.context.span_id
    assert [link.context.span_id for link in process.links] == [publish.context.span_id]


async def test_stopping_worker_finishes_its_running_job(queue: Harness) -> None:
    """A worker asked to stop takes no new dispatch but lets its running job finish and commit."""
    worker = await queue.start_worker(scripted_handler)
    job = await queue.submit("script:sleep=0.5")
    await queue.wait_for(job.id, {job_pb2.JOB_STATE_RUNNING})
    await worker.stop()
    done = await queue.get(job.id)
    assert done.state == job_pb2.JOB_STATE_SUCCEEDED
    later = await queue.submit("script:noop")
    await asyncio.sleep(0.5)
    assert (await queue.get(later.id)).state == job_pb2.JOB_STATE_QUEUED


def _service_settings(queue: Harness, **changes: Any) -> WorkerSettings:
    """The settings of a service hosting a worker for ``queue``'s jobs (its prefix and delivery limit)."""
    return WorkerSettings(
        database_url=queue.settings.database_url,
        amqp_url=queue.settings.amqp_url,
        queue_prefix=queue.settings.queue_prefix,
        delivery_limit=queue.settings.delivery_limit,
        grpc_port=0,
        http_port=0,
        **changes,
    )


async def _attached(
    queue: Harness,
    resources: contextlib.AsyncExitStack,
    handler: JobHandler = scripted_handler,
    **changes: Any,
) -> tuple[ServiceRuntime, JobWorker]:
    """A service runtime (not started) with a worker for ``queue``'s inference jobs attached, as a service's
    wiring does; ``changes`` are its settings."""
    settings = _service_settings(queue, **changes)
    runtime = ServiceRuntime("worker-service", settings, service_names=["test.Worker"])
    worker = await attach_worker(
        runtime, settings, resources, queue=INFERENCE_JOBS_QUEUE, handler=handler, name="worker-service"
    )
    assert worker is not None
    return runtime, worker


async def test_attached_worker_consumes_the_prefixed_queue_the_service_submits_to(
    queue: Harness, resources: contextlib.AsyncExitStack
) -> None:
    """A service's worker (``attach_worker``, as image processing and inference wire it) takes the queue's
    name with the deployment's ``MESH_QUEUE_PREFIX`` and declares it with its ``MESH_DELIVERY_LIMIT``, as
    the queue service does, so a prefixed queue service's jobs do run."""
    assert queue.settings.queue_prefix, "the harness isolates its queues with a prefix"
    runtime, worker = await _attached(queue, resources, job_concurrency=2)
    assert worker.queue == queue.inference_queue
    serving = asyncio.create_task(runtime.run())
    try:
        job = await queue.submit("script:noop")
        done = await queue.wait_for(job.id)
        assert done.state == job_pb2.JOB_STATE_SUCCEEDED
    finally:
        runtime.stopping.set()
        await asyncio.wait_for(serving, 20)


@pytest.fixture
async def resources() -> AsyncIterator[contextlib.AsyncExitStack]:
    """The wiring's exit stack, closed after the test (what a service's server.py holds)."""
    async with contextlib.AsyncExitStack() as stack:
        yield stack


async def _never_ends(context: JobContext) -> job_pb2.JobResult:
    await asyncio.Event().wait()
    raise AssertionError("unreachable")


async def _ready_settles(queue: Harness, expected: int) -> int:
    """The inference queue's ready messages once they reached ``expected`` (10 s at most), read again after
    the relay had time to publish anything more."""
    deadline = time.monotonic() + 10
    while (
        await queue.app.broker.ready_count(queue.inference_queue) != expected and time.monotonic() < deadline
    ):
        await asyncio.sleep(0.1)
    await asyncio.sleep(0.5)
    return await queue.app.broker.ready_count(queue.inference_queue)


async def test_a_job_that_outlasts_the_drain_is_handed_back_without_spending_an_attempt(
    queue: Harness,
) -> None:
    """A stopping worker abandons a job still running when its drain ends and hands the claim back: the job
    is QUEUED again at the same attempt with one dispatch (the old message acked, not requeued beside the new
    one), and the next worker runs it as attempt 1. Left to expire, the abandoned lease counted a SYSTEM
    error ("lease expired") and spent one of the job's attempts."""
    first = await queue.start_worker(_never_ends, options=replace(FAST_OPTIONS, drain_seconds=0.3))
    job = await queue.submit()
    await queue.wait_for(job.id, {job_pb2.JOB_STATE_RUNNING})
    await first.stop()
    handed = await queue.get(job.id)
    assert (handed.state, handed.attempt) == (job_pb2.JOB_STATE_QUEUED, 1)
    assert handed.history[-1].reason == "handed back: its worker stopped before the attempt ended"
    rows = await queue.sql("SELECT attempt_claims, lease_owner FROM jobs WHERE id = %s", job.id)
    assert rows == [{"attempt_claims": 0, "lease_owner": None}]
    assert await _ready_settles(queue, 1) == 1
    await queue.start_worker(scripted_handler)
    done = await queue.wait_for(job.id)
    assert (done.state, done.attempt) == (job_pb2.JOB_STATE_SUCCEEDED, 1)
    assert not [t.reason for t in done.history if t.reason.startswith("lease expired")]
    rows = await queue.sql("SELECT executions FROM jobs WHERE id = %s", job.id)
    assert rows[0]["executions"] == 2  # the abandoned run and the one that finished, no duplicate


async def test_a_service_s_worker_drains_within_the_service_s_grace(
    queue: Harness, resources: contextlib.AsyncExitStack
) -> None:
    """In a service (attach_worker), the worker gives running jobs the service's MESH_GRACE_SECONDS less a
    margin for its own cleanup, and the runtime lets that cleanup finish: the service stops within its grace,
    the job that outlasted the drain is handed back QUEUED at its attempt, and the worker closed its pool.
    The worker had a fixed 10 s whatever the grace, and the runtime cancelled it at the grace, in the middle
    of its drain, which left the job RUNNING for its lease to expire and skipped the cleanup."""
    grace = 2.0
    runtime, worker = await _attached(queue, resources, _never_ends, job_concurrency=1, grace_seconds=grace)
    assert worker.options.drain_seconds == drain_seconds_within(grace) < grace
    serving = asyncio.create_task(runtime.run())
    job = await queue.submit()
    try:
        await queue.wait_for(job.id, {job_pb2.JOB_STATE_RUNNING})
    finally:
        started = time.monotonic()
        runtime.stopping.set()
        await asyncio.wait_for(serving, 20)
    assert time.monotonic() - started < grace + HTTP_STOP_SECONDS
    handed = await queue.get(job.id)
    assert (handed.state, handed.attempt) == (job_pb2.JOB_STATE_QUEUED, 1)
    assert worker.pool.closed


async def test_an_attempt_over_its_time_limit_is_stopped_and_counts_a_system_error(queue: Harness) -> None:
    """A handler that never ends is cancelled at ``attempt_seconds``: the attempt is a SYSTEM error with code
    DEADLINE_EXCEEDED, retried, and the job FAILED once its attempts are spent. Its beat had kept renewing the
    lease, so the job stayed RUNNING for ever."""
    cancelled: list[int] = []

    async def hangs(context: JobContext) -> job_pb2.JobResult:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.append(context.job.attempt)
            raise
        raise AssertionError("unreachable")

    await queue.start_worker(hangs, options=replace(FAST_OPTIONS, attempt_seconds=0.5))
    job = await queue.submit(max_attempts=2)
    done = await queue.wait_for(job.id, timeout=20)
    assert (done.state, done.attempt) == (job_pb2.JOB_STATE_FAILED, 2)
    assert done.error.category == errors_pb2.ERROR_CATEGORY_SYSTEM
    assert done.error.code == "DEADLINE_EXCEEDED"
    assert "time limit of 0.5s (MESH_JOB_ATTEMPT_SECONDS)" in done.error.message
    assert cancelled == [1, 2]


async def test_a_handlers_own_timeout_is_not_taken_for_the_attempts_limit(queue: Harness) -> None:
    """A TimeoutError the handler raises itself, well within the limit, is the handler's failure (SYSTEM,
    INTERNAL, named), not the worker's time limit."""

    async def times_out(context: JobContext) -> job_pb2.JobResult:
        raise TimeoutError("the camera did not answer")

    await queue.start_worker(times_out, options=replace(FAST_OPTIONS, attempt_seconds=30.0))
    job = await queue.submit(max_attempts=1)
    done = await queue.wait_for(job.id)
    assert done.state == job_pb2.JOB_STATE_FAILED
    assert done.error.code == "INTERNAL"
    assert "TimeoutError: the camera did not answer" in done.error.message


async def test_a_services_worker_takes_its_attempt_limit_from_the_settings(
    queue: Harness, resources: contextlib.AsyncExitStack
) -> None:
    """MESH_JOB_ATTEMPT_SECONDS (600 s unless set, more than 0) is the limit of the worker a service attaches."""
    assert WorkerSettings().job_attempt_seconds == 600.0
    with pytest.raises(ValueError, match="job_attempt_seconds"):
        WorkerSettings(job_attempt_seconds=0)
    _, worker = await _attached(queue, resources, job_concurrency=1, job_attempt_seconds=42)
    assert worker.options.attempt_seconds == 42.0


def _calls_a_service_down_for(seconds: float) -> JobHandler:
    """A handler whose service answers UNAVAILABLE for ``seconds`` from now, then works."""
    back_at = time.monotonic() + seconds

    async def handler(context: JobContext) -> job_pb2.JobResult:
        if time.monotonic() < back_at:
            raise errors.Unavailable("the file service is unavailable; retry shortly")
        return job_pb2.JobResult()

    return handler


async def test_a_dependency_outage_holds_new_jobs_back_instead_of_spending_their_attempts(
    queue: Harness,
) -> None:
    """While a service the jobs call answers UNAVAILABLE (1.5 s here), the worker holds new attempts back and
    lets one trial through per pause: the attempts running when it began and the trials fail, the rest wait
    QUEUED, and every job SUCCEEDS once the service is back, though each may fail only once (max_attempts 2).
    A worker that kept claiming spent both attempts of most of its backlog within the outage: FAILED."""
    options = replace(FAST_OPTIONS, dependency_pause_seconds=0.2, dependency_pause_max_seconds=0.4)
    worker = await queue.start_worker(_calls_a_service_down_for(1.5), options=options)
    jobs = [await queue.submit(max_attempts=2) for _ in range(20)]
    done = await queue.wait_all([job.id for job in jobs], timeout=30)
    assert Counter(job_pb2.JobState.Name(job.state) for job in done.values()) == {"JOB_STATE_SUCCEEDED": 20}
    failed_attempts = sum(
        1 for job in done.values() for t in job.history if t.to_state == job_pb2.JOB_STATE_RETRY_WAIT
    )
    assert failed_attempts <= 4 + 8  # those running when it began, and one trial per pause at most
    assert worker.worker.breaker.closed


async def test_a_trial_whose_job_was_cancelled_does_not_stall_the_worker(queue: Harness) -> None:
    """The attempt let through after a pause may end without telling whether the service is back (its job was
    cancelled meanwhile, so it is not claimable): the next dispatch becomes the trial, and the jobs run once
    the service is back. The worker stopped taking jobs for good."""
    options = replace(FAST_OPTIONS, dependency_pause_seconds=0.3, dependency_pause_max_seconds=0.3)
    await queue.start_worker(_calls_a_service_down_for(1.2), concurrency=1, options=options)
    first = await queue.submit(max_attempts=5)
    await queue.wait_for(first.id, {job_pb2.JOB_STATE_RETRY_WAIT, job_pb2.JOB_STATE_QUEUED})
    cancelled = [await queue.submit() for _ in range(3)]
    for job in cancelled:
        await queue.stub.CancelJob(queue_service_pb2.CancelJobRequest(job_id=job.id))
    last = await queue.submit(max_attempts=5)
    done = await queue.wait_all([first.id, last.id], timeout=20)
    assert {job_pb2.JobState.Name(job.state) for job in done.values()} == {"JOB_STATE_SUCCEEDED"}
