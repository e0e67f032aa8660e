"""``/v1/jobs``: submit, list, get, cancel, retry, and a job's events as Server-Sent Events."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Annotated

import grpc
from fastapi import APIRouter, Header, Query, Request, Response
from starlette.responses import StreamingResponse

from mesh.kit import errors
from mesh.kit.pagination import DEFAULT_PAGE_SIZE
from mesh.kit.text_fields import ascii_digits
from mesh.queue.v1 import job_pb2, queue_service_pb2_grpc
from mesh.queue.v1 import queue_service_pb2 as queue_pb
from mesh.services.gateway import convert, idempotency, metrics, schemas
from mesh.services.gateway.backends import rpc
from mesh.services.gateway.context import Caller, Context
from mesh.services.gateway.routes.images import ERRORS
from mesh.services.gateway.spans import annotate

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])

SSE_RETRY_MS = 2000
WATCH_RESUME_SECONDS = 30.0
"""How long a WatchJob stream that ended UNAVAILABLE (the queue service restarted, or closed an aged
connection) is opened again, while no new stream brings a change not had before, until the client is sent
the error."""
WATCH_RESUME_DELAY = 0.5
_END = object()
_DRAINING = object()


MAX_PENDING_CHANGES = 8
"""Job changes an event stream keeps for a reader that has not taken them yet. A burst (a WatchJob stream that
replays a job's history) reaches a reader that keeps up whole; a reader that stalls finds the newest ones."""


class _Inbox:
    """What a job's event stream has still to send: the newest changes not sent yet, then how the stream ends
    (``_END``, ``_DRAINING`` or an error), which is never dropped.

    Every change is a whole snapshot of the job, so a reader that does not keep up needs only the newest: past
    ``MAX_PENDING_CHANGES`` the oldest is dropped (a stalled reader's queue grew with every change)."""

    def __init__(self) -> None:
        self._changes: deque[queue_pb.WatchJobResponse] = deque(maxlen=MAX_PENDING_CHANGES)
        self._end: object | None = None
        self._ready = asyncio.Event()

    def put_change(self, change: queue_pb.WatchJobResponse) -> None:
        """Add ``change``, dropping the oldest one not sent yet when there are too many."""
        self._changes.append(change)
        self._ready.set()

    def put_end(self, end: object) -> None:
        """End the stream after the changes not sent yet (the first end counts)."""
        if self._end is None:
            self._end = end
        self._ready.set()

    async def get(self) -> object:
        """The oldest change not sent yet, else the end; waits while there is neither."""
        await self._ready.wait()
        if not self._changes:
            return self._end
        change = self._changes.popleft()
        if not self._changes and self._end is None:
            self._ready.clear()
        return change


@router.post(
    "",
    status_code=202,
    response_model=schemas.JobOut,
    responses=ERRORS,
    summary="Submit a job",
    openapi_extra={
        "parameters": [
            {
                **idempotency.OPENAPI_PARAMETER,
                "description": "The job's idempotency key, as an alternative to the body's idempotency_key "
                "(both may be given only if they agree).",
            }
        ]
    },
)
async def submit_job(
    body: schemas.JobIn, request: Request, response: Response, ctx: Context, _: Caller
) -> schemas.JobOut:
    """Queue a job (pipeline and/or model on a stored image); the same idempotency key (in the body or the
    ``Idempotency-Key`` header) returns the same job (409 when the body asks for another job). A submit without
    a key gets one (``gateway-<uuid>``, in the job's ``idempotency_key``), so that retries of a call whose answer
    was lost queue it once, and a 503 or 504 names it for the client's own retry. A pipeline
    the image service would refuse is 400, an image or model that does not exist 404, before anything is
    queued."""
    key = idempotency.job_key(request, body.idempotency_key) or idempotency.generated_key()
    try:
        result = await rpc(
            ctx.backends.queue_stub.SubmitJob(
                queue_pb.SubmitJobRequest(
                    image_id=body.image_id,
                    pipeline=convert.to_pipeline(body.pipeline),
                    model=body.model,
                    priority=body.priority,
                    idempotency_key=key,
                    max_attempts=body.max_attempts or 0,
                )
            )
        )
    except errors.MeshError as error:
        raise idempotency.say_how_to_retry(error, key) from None
    response.headers["Location"] = f"/v1/jobs/{result.job.id}"
    _annotate_job(result.job)
    annotate({"mesh.filters": [step.filter for step in body.pipeline], "mesh.model": body.model})
    return convert.job(result.job)


def _annotate_job(job: job_pb2.Job) -> None:
    annotate(
        {
            "mesh.job.id": job.id,
            "mesh.job.attempt": job.attempt,
            "mesh.job.state": convert.job_state(job.state),
            "mesh.image.id": job.image_id,
        }
    )


@router.get("", response_model=schemas.JobList, responses=ERRORS, summary="List jobs")
async def list_jobs(
    ctx: Context,
    _: Caller,
    state: schemas.JobStateName | None = None,
    page_size: schemas.PageSizeQuery = DEFAULT_PAGE_SIZE,
    page_token: schemas.PageTokenQuery = "",
) -> schemas.JobList:
    """Jobs, newest first, optionally only those in ``state``; paginated like images (a ``page_token``
    continues only a listing of the same ``state``: 400 otherwise)."""
    page = await rpc(
        ctx.backends.queue_stub.ListJobs(
            queue_pb.ListJobsRequest(
                state=convert.to_job_state(state) if state else job_pb2.JOB_STATE_UNSPECIFIED,
                page_size=page_size,
                page_token=page_token,
            )
        )
    )
    return schemas.JobList(jobs=[convert.job(j) for j in page.jobs], next_page_token=page.next_page_token)


@router.post("/{job_id}:cancel", response_model=schemas.JobOut, responses=ERRORS, summary="Cancel a job")
async def cancel_job(job_id: schemas.JobIdPath, ctx: Context, _: Caller) -> schemas.JobOut:
    """Cancel a queued job at once, or a running one at its next progress beat."""
    result = await rpc(ctx.backends.queue_stub.CancelJob(queue_pb.CancelJobRequest(job_id=job_id)))
    _annotate_job(result.job)
    return convert.job(result.job)


@router.post("/{job_id}:retry", response_model=schemas.JobOut, responses=ERRORS, summary="Retry a job")
async def retry_job(job_id: schemas.JobIdPath, ctx: Context, _: Caller) -> schemas.JobOut:
    """Start a new attempt of a failed, dead or cancelled job (404 when its image or model has gone since)."""
    result = await rpc(ctx.backends.queue_stub.RetryJob(queue_pb.RetryJobRequest(job_id=job_id)))
    _annotate_job(result.job)
    return convert.job(result.job)


@router.get("/{job_id:name}", response_model=schemas.JobOut, responses=ERRORS, summary="A job")
async def get_job(job_id: schemas.JobIdPath, ctx: Context, _: Caller) -> schemas.JobOut:
    """State, progress, queue position, attempts, error category and result of one job."""
    result = await rpc(ctx.backends.queue_stub.GetJob(queue_pb.GetJobRequest(job_id=job_id)))
    return convert.job(result.job)


def sse_event(event: str, data: object, event_id: str | None = None) -> bytes:
    """One Server-Sent Event (data is one JSON line)."""
    lines = [f"event: {event}"]
    if event_id is not None:
        lines.append(f"id: {event_id}")
    lines.append(f"data: {json.dumps(data, separators=(',', ':'))}")
    return ("\n".join(lines) + "\n\n").encode()


@dataclass(frozen=True)
class EventId:
    """The SSE id of one job snapshot: its update time (µs) and what a client sees change.

    WatchJob's ``sequence`` cannot be the id: a reconnect opens a new WatchJob stream, and the queue service
    numbers each stream from 1 (or replays history), so sequences of two streams do not compare. Snapshots
    do: a reconnecting client is sent only those newer than its Last-Event-ID, or different at the same time.
    """

    time_us: int
    fingerprint: str

    def __str__(self) -> str:
        return f"{self.time_us}-{self.fingerprint}"

    @classmethod
    def of(cls, job: job_pb2.Job) -> EventId:
        """The id of ``job``'s current snapshot."""
        time_us = job.update_time.seconds * 1_000_000 + job.update_time.nanos // 1000
        fingerprint = (
            f"{convert.job_state(job.state)}.{job.queue_position}.{round(job.progress * 1000)}.{job.attempt}"
        )
        return cls(time_us, fingerprint)

    @classmethod
    def parse(cls, text: str | None) -> EventId | None:
        """An id sent back by a client, or None when absent or not one of ours."""
        if not text:
            return None
        time_part, _, fingerprint = text.strip().partition("-")
        if not ascii_digits(time_part) or not fingerprint:
            return None
        return cls(int(time_part), fingerprint)

    def is_after(self, last: EventId | None) -> bool:
        """Whether a client that last saw ``last`` still needs this snapshot."""
        if last is None:
            return True
        return self.time_us > last.time_us or (
            self.time_us == last.time_us and self.fingerprint != last.fingerprint
        )


WatchCall = grpc.aio.UnaryStreamCall[queue_pb.WatchJobRequest, queue_pb.WatchJobResponse]


class _Resumption:
    """Whether a WatchJob stream that failed is opened again: only when it ended UNAVAILABLE and, since the
    first of its losses, less than WATCH_RESUME_SECONDS passed without a new stream bringing a change not had
    before."""

    def __init__(self, newest: EventId | None) -> None:
        self._newest = newest
        self._lost_since: float | None = None

    def note(self, job: job_pb2.Job) -> None:
        """Take in a change a stream brought."""
        # Only a change not had before shows the queue is back: a replica that replays the job and fails
        # again each time would otherwise be retried for ever.
        if (event_id := EventId.of(job)).is_after(self._newest):
            self._newest, self._lost_since = event_id, None

    def allows(self, error: grpc.aio.AioRpcError, opened: float) -> bool:
        """Whether the stream opened at ``opened`` that failed with ``error`` is opened again."""
        now = time.monotonic()
        # A stream that stayed open longer than the limit worked (a connection closed for its age, a restart
        # hours later): its loss starts the count again.
        if self._lost_since is None or now - opened > WATCH_RESUME_SECONDS:
            self._lost_since = now
        return error.code() == grpc.StatusCode.UNAVAILABLE and now - self._lost_since <= WATCH_RESUME_SECONDS


class _JobEventStream:
    """One client's events of a job: a WatchJob stream (opened again when it drops) fills an inbox, which the
    response body turns into Server-Sent Events, keepalives and the stream's last event."""

    def __init__(
        self,
        stub: queue_service_pb2_grpc.QueueServiceAsyncStub,
        job_id: str,
        *,
        seen: EventId | None,
        keepalive: float,
        draining: asyncio.Event,
        request: Request,
    ) -> None:
        self._stub = stub
        self._job_id = job_id
        self._seen = seen
        self._keepalive = keepalive
        self._draining = draining
        self._request = request
        self._inbox = _Inbox()
        self._call: WatchCall
        """The WatchJob call now open; the body opens the first (a response never sent opens none)."""

    async def body(self) -> AsyncIterator[bytes]:
        """The response body: the reconnect delay, then the job's events until its end; the WatchJob call
        and the tasks that fill the inbox stop with it."""
        metrics.SSE_STREAMS.inc()
        self._call = self._open_watch()
        reader = asyncio.create_task(self._watch())
        drainer = asyncio.create_task(self._end_on_drain())
        try:
            yield f"retry: {SSE_RETRY_MS}\n\n".encode()
            # From the last byte written, not the last item taken: replays skipped below write nothing, and a
            # proxy cuts a stream that stays silent.
            written = time.monotonic()
            while True:
                try:
                    item = await asyncio.wait_for(
                        self._inbox.get(), written + self._keepalive - time.monotonic()
                    )
                except TimeoutError:
                    yield b": keepalive\n\n"
                    written = time.monotonic()
                    continue
                if not isinstance(item, queue_pb.WatchJobResponse):
                    if (last := await self._last_event(item)) is not None:
                        yield last
                    return
                if (event := self._job_event(item.job)) is not None:
                    yield event
                    written = time.monotonic()
        finally:
            self._call.cancel()
            reader.cancel()
            drainer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader
            with contextlib.suppress(asyncio.CancelledError):
                await drainer
            metrics.SSE_STREAMS.dec()

    def _job_event(self, job: job_pb2.Job) -> bytes | None:
        """``event: job`` for a snapshot the client has not seen yet; None for one it has (a replay)."""
        event_id = EventId.of(job)
        if not event_id.is_after(self._seen):
            return None
        self._seen = event_id
        return sse_event("job", convert.job(job).model_dump(mode="json"), str(event_id))

    async def _last_event(self, end: object) -> bytes | None:
        """What the stream sends as it ends with ``end``: ``event: end`` for a job in a final state, ``event:
        error`` for a watch that failed; nothing on draining (the client reconnects, to another instance,
        with Last-Event-ID), nor to a client that has gone."""
        if end is _END:
            return sse_event("end", {"job_id": self._job_id})
        if end is _DRAINING:
            return None
        assert isinstance(end, errors.MeshError)
        if end.code == grpc.StatusCode.CANCELLED and await self._request.is_disconnected():
            return None
        return sse_event("error", errors.error_body(end))

    def _open_watch(self) -> WatchCall:
        """A new WatchJob call of the job."""
        return self._stub.WatchJob(queue_pb.WatchJobRequest(job_id=self._job_id))

    async def _watch(self) -> None:
        """Fill the inbox with the job's changes, opening the watch again while :class:`_Resumption` allows;
        end it with ``_END`` when the job is final, or with the error that ended the watch."""
        # A new stream replays the job as it is now; changes already sent are skipped by their id.
        resumption = _Resumption(self._seen)
        while True:
            opened = time.monotonic()
            try:
                async for change in self._call:
                    resumption.note(change.job)
                    self._inbox.put_change(change)
                self._inbox.put_end(_END)
                return
            except grpc.aio.AioRpcError as error:
                if not resumption.allows(error, opened):
                    self._inbox.put_end(errors.from_rpc_error(error))
                    return
            await asyncio.sleep(WATCH_RESUME_DELAY)
            self._call = self._open_watch()

    async def _end_on_drain(self) -> None:
        """End the stream once the gateway drains (SIGTERM)."""
        await self._draining.wait()
        self._inbox.put_end(_DRAINING)


@router.get(
    "/{job_id}/events",
    response_class=StreamingResponse,
    responses={
        200: {
            "description": "Events: `job` (data: the job), `end` (data: its id), `error` (data: an error body).",
            "content": {"text/event-stream": {"schema": {"type": "object"}}},
        },
        **ERRORS,
    },
    summary="A job's events (Server-Sent Events)",
)
async def job_events(
    job_id: schemas.JobIdPath,
    request: Request,
    ctx: Context,
    _: Caller,
    last_event_id: Annotated[str | None, Header()] = None,
    after: Annotated[
        str | None, Query(description="Like Last-Event-ID, for clients that cannot set it.")
    ] = None,
) -> StreamingResponse:
    """Every state, position and progress change as ``event: job`` (data: the job) with an opaque ``id:``;
    a state the job passed between two of the queue service's polls comes as the job was at that change
    (progress, result and error empty), and progress as its latest value at each poll.

    The stream ends with ``event: end`` when the job reaches a final state. A reconnecting client sends
    ``Last-Event-ID`` (browsers' EventSource does) and gets only newer changes. Idle streams get a comment
    line every 15 s.
    """
    stub = ctx.backends.queue_stub
    current = await rpc(stub.GetJob(queue_pb.GetJobRequest(job_id=job_id)))  # 404 before the stream starts
    _annotate_job(current.job)
    stream = _JobEventStream(
        stub,
        job_id,
        seen=EventId.parse(last_event_id) or EventId.parse(after),
        keepalive=ctx.settings.sse_keepalive_seconds,
        draining=ctx.draining,
        request=request,
    )
    return StreamingResponse(
        stream.body(),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )
