"""``mesh.queue.v1.QueueService`` over the repository (the gRPC adapter)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from typing import Any

import grpc
from prometheus_client import Counter

from mesh.kit import errors, pagination, tracing
from mesh.kit.jobs import IMAGE_JOBS_QUEUE, INFERENCE_JOBS_QUEUE
from mesh.kit.logging import get_logger
from mesh.kit.runtime import pause_unless_stopping
from mesh.queue.v1 import job_pb2, queue_service_pb2, queue_service_pb2_grpc
from mesh.services.queue import validation
from mesh.services.queue.broker import Broker
from mesh.services.queue.convert import (
    encode_pipeline,
    passed_states,
    row_to_job,
    state_from_proto,
    timestamp,
)
from mesh.services.queue.references import NoReferences, References
from mesh.services.queue.repository import JobRepository, NewJob, Row
from mesh.services.queue.states import RETRYABLE_BY_USER, JobState

log = get_logger(__name__)

Context = grpc.aio.ServicerContext[Any, Any]

SUBMITTED = Counter("mesh_queue_jobs_submitted_total", "Accepted submits.", ["queue", "existing"])


class QueueServicer(queue_service_pb2_grpc.QueueServiceServicer):
    """The queue's API."""

    def __init__(
        self,
        repository: JobRepository,
        *,
        queue_prefix: str = "",
        default_max_attempts: int = 5,
        backoff_base_seconds: float = 1.0,
        backoff_cap_seconds: float = 300.0,
        watch_poll_seconds: float = 0.2,
        on_dispatch: Callable[[], None] = lambda: None,
        broker: Broker | None = None,
        references: References | None = None,
    ) -> None:
        self.repository = repository
        self.queue_prefix = queue_prefix
        self.default_max_attempts = default_max_attempts
        self.backoff_base_seconds = backoff_base_seconds
        self.backoff_cap_seconds = backoff_cap_seconds
        self.watch_poll_seconds = watch_poll_seconds
        self.on_dispatch = on_dispatch
        self.broker = broker
        self.references: References = references or NoReferences()
        self.stopping = asyncio.Event()
        """Set when the service starts stopping (the runtime's event, given by ``QueueApp.install``): open
        watches then end UNAVAILABLE."""

    @property
    def queues(self) -> list[str]:
        """The RabbitMQ queues jobs go to."""
        return [self.queue_for(True), self.queue_for(False)]

    def queue_for(self, has_pipeline: bool) -> str:
        """Jobs with a pipeline go to the image workers (which then run the model); the rest to inference."""
        return self.queue_prefix + (IMAGE_JOBS_QUEUE if has_pipeline else INFERENCE_JOBS_QUEUE)

    async def _job(self, row: Row, deadline: float) -> job_pb2.Job:
        """The job of ``row`` with its position and history, read by the call's ``deadline``."""
        position = await self.repository.position(row, deadline=deadline)
        history = await self.repository.history(row["id"], deadline=deadline)
        return row_to_job(row, position=position, history=history)

    async def SubmitJob(  # noqa: N802
        self, request: queue_service_pb2.SubmitJobRequest, context: Context
    ) -> queue_service_pb2.SubmitJobResponse:
        validation.check_submit(request)
        deadline = self.repository.call_deadline()
        # Stored as the file service spells it: the job's image_id is the image's id, and a keyed retry that
        # spells it otherwise is the same job.
        image_id = validation.canonical_uuid(request.image_id)
        try:
            await self.references.check(image_id, request.model)
        except errors.NotFound:
            # A retry after a lost answer gets its job back, even when what the job names has gone since.
            if (
                not request.idempotency_key
                or await self.repository.by_key(request.idempotency_key, deadline=deadline) is None
            ):
                raise
        carrier: dict[str, str] = {}
        tracing.inject(carrier)
        new = NewJob(
            queue=self.queue_for(bool(request.pipeline)),
            image_id=image_id,
            pipeline=encode_pipeline(request.pipeline) if request.pipeline else b"",
            model=request.model,
            priority=request.priority,
            idempotency_key=request.idempotency_key or None,
            max_attempts=request.max_attempts or self.default_max_attempts,
            backoff_base_seconds=self.backoff_base_seconds,
            backoff_cap_seconds=self.backoff_cap_seconds,
            traceparent=carrier.get("traceparent", ""),
            tracestate=carrier.get("tracestate", ""),
        )
        submitted = await self.repository.submit(new, deadline=deadline)
        if submitted.existing:
            validation.check_same_job(submitted.row, new, asked_max_attempts=request.max_attempts)
        else:
            self.on_dispatch()
        SUBMITTED.labels(new.queue, str(submitted.existing).lower()).inc()
        job = row_to_job(submitted.row, position=submitted.position)
        if log.isEnabledFor(logging.DEBUG):  # per job: the RPC's access line already says it at INFO
            log.debug("job submitted", job_id=job.id, queue=new.queue, existing=submitted.existing)
        return queue_service_pb2.SubmitJobResponse(job=job, existing=submitted.existing)

    async def GetJob(  # noqa: N802
        self, request: queue_service_pb2.GetJobRequest, context: Context
    ) -> queue_service_pb2.GetJobResponse:
        job_id = validation.parse_uuid(request.job_id, "job_id")
        deadline = self.repository.call_deadline()
        row = await self.repository.require(job_id, deadline=deadline)
        return queue_service_pb2.GetJobResponse(job=await self._job(row, deadline))

    async def ListJobs(  # noqa: N802
        self, request: queue_service_pb2.ListJobsRequest, context: Context
    ) -> queue_service_pb2.ListJobsResponse:
        size = pagination.page_size(request.page_size)
        state = state_from_proto(request.state)
        scope = f"jobs:{state.value}" if state is not None else "jobs"
        after = pagination.decode_page_token(request.page_token, scope)
        deadline = self.repository.call_deadline()
        rows = await self.repository.page(state, size, after, deadline=deadline)
        page, more = rows[:size], len(rows) > size
        positions = await self.repository.positions(page, deadline=deadline)
        jobs = [row_to_job(r, position=positions.get(r["id"], 0)) for r in page]
        token = ""
        if more:
            last = page[-1]
            token = pagination.encode_page_token(pagination.Cursor(last["created_at"], last["id"], scope))
        return queue_service_pb2.ListJobsResponse(jobs=jobs, next_page_token=token)

    async def CancelJob(  # noqa: N802
        self, request: queue_service_pb2.CancelJobRequest, context: Context
    ) -> queue_service_pb2.CancelJobResponse:
        job_id = validation.parse_uuid(request.job_id, "job_id")
        deadline = self.repository.call_deadline()
        row = await self.repository.cancel(job_id, deadline=deadline)
        return queue_service_pb2.CancelJobResponse(job=await self._job(row, deadline))

    async def RetryJob(  # noqa: N802
        self, request: queue_service_pb2.RetryJobRequest, context: Context
    ) -> queue_service_pb2.RetryJobResponse:
        job_id = validation.parse_uuid(request.job_id, "job_id")
        deadline = self.repository.call_deadline()
        current = await self.repository.require(job_id, deadline=deadline)
        if JobState(current["state"]) in RETRYABLE_BY_USER:
            # As at submit: an attempt that could never run (its image or model is gone, or refused by its
            # service) is refused, not queued to fail at once. A job that cannot be retried at all says that first
            # (FAILED_PRECONDITION). Asked afresh: the image of a job retried after it was deleted was found at
            # submit, moments before.
            try:
                await self.references.check(current["image_id"], current["model"], fresh=True)
            except (errors.NotFound, errors.InvalidArgument) as problem:
                raise type(problem)(
                    f"job {job_id} cannot run again: {problem.message}",
                    field_violations=problem.field_violations,
                    metadata=problem.metadata,
                ) from None
        row = await self.repository.retry(job_id, deadline=deadline)
        self.on_dispatch()
        return queue_service_pb2.RetryJobResponse(job=await self._job(row, deadline))

    async def WatchJob(  # noqa: N802
        self, request: queue_service_pb2.WatchJobRequest, context: Context
    ) -> AsyncIterator[queue_service_pb2.WatchJobResponse]:
        """Every change of state, position or progress, by polling the job's row (one primary-key read
        and, while queued, one indexed count per poll; on a change, the row and its history in one snapshot),
        until the job is terminal, or until the service
        starts stopping (UNAVAILABLE: the caller reopens the watch). A state the job passed through between
        two polls is sent too, as the job was at that change (:func:`convert.passed_states`). The reads of one
        poll share one window (:meth:`JobRepository.call_deadline`); the answers it sends are not in it, since
        they wait on the caller."""
        job_id = validation.parse_uuid(request.job_id, "job_id")
        sequence = 0
        last: tuple[int, int] | None = None
        shown: int | None = None  # history entries already sent as a state; the first answer replays none
        while True:
            deadline = self.repository.call_deadline()
            row = await self.repository.require(job_id, deadline=deadline)
            position = await self.repository.position(row, deadline=deadline)
            seen = (int(row["version"]), position)
            if seen != last:
                # The row again, with its history as of the same instant (passed_states matches the two).
                row, history = await self.repository.with_history(job_id, deadline=deadline)
                position = await self.repository.position(row, deadline=deadline)
                last = (int(row["version"]), position)
                passed, accounted = passed_states(row, history, len(history) if shown is None else shown)
                shown = accounted
                for job in passed:
                    sequence += 1
                    yield queue_service_pb2.WatchJobResponse(job=job, sequence=sequence)
                sequence += 1
                job = row_to_job(row, position=position, history=history[:accounted])
                yield queue_service_pb2.WatchJobResponse(job=job, sequence=sequence)
            if JobState(row["state"]).terminal:
                return
            await pause_unless_stopping(self.stopping, self.watch_poll_seconds)

    async def _broker_ready(self, queue: str) -> int:
        """Messages ready in RabbitMQ for ``queue`` (both lanes); -1, unknown, without a broker. The broker
        bounds its own questions (``Broker.answer_seconds``): one away or not answering says -1 too."""
        return -1 if self.broker is None else await self.broker.ready_count(queue)

    async def GetQueueStats(  # noqa: N802
        self, request: queue_service_pb2.GetQueueStatsRequest, context: Context
    ) -> queue_service_pb2.GetQueueStatsResponse:
        counts = await self.repository.counts()
        response = queue_service_pb2.GetQueueStatsResponse()
        queues = sorted({q for q, _ in counts.by_queue_state} | set(self.queues))
        ready = await asyncio.gather(*(self._broker_ready(queue) for queue in queues))
        per_queue = {
            queue: queue_service_pb2.QueueDepth(queue=queue, broker_ready=count)
            for queue, count in zip(queues, ready, strict=True)
        }
        for (queue, state), n in counts.by_queue_state.items():
            per_queue[queue].jobs_by_state[state] = n
            response.jobs_by_state[state] = response.jobs_by_state[state] + n
        response.queues.extend(per_queue.values())
        if counts.oldest_queued_at:
            oldest = min(counts.oldest_queued_at.values())
            response.oldest_queued_age_seconds = max(0.0, (counts.now - oldest).total_seconds())
        response.recent_throughput_per_second = counts.finished_last_minute / 60.0
        response.dead_letters = response.jobs_by_state.get(JobState.DEAD.value, 0)
        stamp = timestamp(datetime.now(UTC))
        assert stamp is not None
        response.time.CopyFrom(stamp)
        return response
