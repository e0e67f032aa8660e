"""QueueService's API on the real PostgreSQL and RabbitMQ, without workers (jobs stay queued)."""

from __future__ import annotations

import asyncio
import signal
import time
import uuid

import grpc
import httpx
import pytest
from prometheus_client import REGISTRY

from mesh.common.v1 import params_pb2
from mesh.kit import errors
from mesh.kit.runtime import RESTARTING
from mesh.queue.v1 import job_pb2, queue_service_pb2
from mesh.services.queue.broker import Broker
from mesh.services.queue.references import ServiceReferences
from mesh.services.queue.relay_process import RelayProcess
from mesh.services.queue.repository import JobRepository, open_pool
from mesh.services.queue.scripted import scripted_handler
from mesh.services.queue.states import JobState
from tests.queue.harness import IMAGE_ID, Harness

pytestmark = pytest.mark.integration


async def _error(call: object) -> errors.MeshError:
    try:
        await call  # type: ignore[misc]
    except grpc.aio.AioRpcError as exc:
        return errors.from_rpc_error(exc)
    raise AssertionError("the call succeeded")


async def test_submit_returns_a_queued_job_with_its_position(queue: Harness) -> None:
    """A submit answers with the QUEUED job, attempt 1, its 1-based position, and a dispatch in the history."""
    first = await queue.submit()
    second = await queue.submit()
    assert first.state == job_pb2.JOB_STATE_QUEUED
    assert first.attempt == 1
    assert first.max_attempts == 5
    assert (first.queue_position, second.queue_position) == (1, 2)
    fetched = await queue.get(second.id)
    assert fetched.queue_position == 2
    assert [t.to_state for t in fetched.history] == [job_pb2.JOB_STATE_QUEUED]


async def test_priority_orders_the_queue(queue: Harness) -> None:
    """A higher priority job stands before lower ones submitted earlier; equal priorities keep submit order."""
    low = [await queue.submit(priority=1) for _ in range(3)]
    high = await queue.submit(priority=7)
    assert high.queue_position == 1
    positions = [(await queue.get(j.id)).queue_position for j in low]
    assert positions == [2, 3, 4]


async def test_pipeline_jobs_go_to_the_image_queue(queue: Harness) -> None:
    """A job with a pipeline is dispatched to the image queue and keeps its steps and parameters."""
    step = params_pb2.PipelineStep(
        filter="gaussian_blur", params={"sigma": params_pb2.ParamValue(number_value=1.5)}
    )
    response = await queue.stub.SubmitJob(
        queue_service_pb2.SubmitJobRequest(image_id=IMAGE_ID, pipeline=[step], model="strip-reader")
    )
    rows = await queue.sql("SELECT queue FROM jobs WHERE id = %s", response.job.id)
    assert rows[0]["queue"] == queue.image_queue
    job = await queue.get(response.job.id)
    assert job.pipeline[0].filter == "gaussian_blur"
    assert job.pipeline[0].params["sigma"].number_value == 1.5


async def test_idempotency_key_returns_the_same_job(queue: Harness) -> None:
    """Submitting twice with one key returns the first job, flagged existing, and creates nothing."""
    key = f"key-{queue.settings.queue_prefix}"
    request = queue_service_pb2.SubmitJobRequest(image_id=IMAGE_ID, model="script:noop", idempotency_key=key)
    first, again = await asyncio.gather(queue.stub.SubmitJob(request), queue.stub.SubmitJob(request))
    assert first.job.id == again.job.id
    assert sorted([first.existing, again.existing]) == [False, True]
    rows = await queue.sql("SELECT count(*) AS n FROM jobs WHERE idempotency_key = %s", key)
    assert rows[0]["n"] == 1
    outbox = await queue.sql(
        "SELECT count(*) AS n FROM job_history WHERE job_id = %s AND to_state = 'QUEUED'", first.job.id
    )
    assert outbox[0]["n"] == 1


async def test_a_reused_idempotency_key_for_another_job_is_already_exists(queue: Harness) -> None:
    """A resubmit under a key whose job has another model, priority, pipeline or max_attempts is ALREADY_EXISTS
    (409) naming the fields that differ and the key's job, and creates nothing; the same request again still
    returns it, and so does one that leaves max_attempts to the default (0) whatever the job has."""
    key = f"reused-{queue.settings.queue_prefix}"
    blur = params_pb2.PipelineStep(
        filter="gaussian_blur", params={"sigma": params_pb2.ParamValue(number_value=1.5)}
    )
    first = await queue.stub.SubmitJob(
        queue_service_pb2.SubmitJobRequest(image_id=IMAGE_ID, pipeline=[blur], idempotency_key=key)
    )
    sharper = params_pb2.PipelineStep(
        filter="gaussian_blur", params={"sigma": params_pb2.ParamValue(number_value=3.0)}
    )
    others = [
        queue_service_pb2.SubmitJobRequest(
            image_id=IMAGE_ID, pipeline=[blur], model="script:noop", idempotency_key=key
        ),
        queue_service_pb2.SubmitJobRequest(image_id=IMAGE_ID, pipeline=[sharper], idempotency_key=key),
        queue_service_pb2.SubmitJobRequest(
            image_id=IMAGE_ID, pipeline=[blur], priority=5, idempotency_key=key
        ),
        queue_service_pb2.SubmitJobRequest(
            image_id=IMAGE_ID, pipeline=[blur], max_attempts=9, idempotency_key=key
        ),
    ]
    fields = ["model", "pipeline", "priority", "max_attempts"]
    for request, field in zip(others, fields, strict=True):
        error = await _error(queue.stub.SubmitJob(request))
        assert isinstance(error, errors.AlreadyExists), field
        assert errors.http_status(error) == 409
        assert [v.field for v in error.field_violations] == ["idempotency_key", field]
        assert first.job.id in error.message
    again = await queue.stub.SubmitJob(
        queue_service_pb2.SubmitJobRequest(image_id=IMAGE_ID, pipeline=[blur], idempotency_key=key)
    )
    assert again.existing
    assert again.job.id == first.job.id
    same = queue_service_pb2.SubmitJobRequest(
        image_id=IMAGE_ID, pipeline=[blur], max_attempts=first.job.max_attempts, idempotency_key=key
    )
    assert (await queue.stub.SubmitJob(same)).job.id == first.job.id
    rows = await queue.sql("SELECT count(*) AS n FROM jobs WHERE idempotency_key = %s", key)
    assert rows[0]["n"] == 1


async def test_invalid_submit_names_every_bad_field(queue: Harness) -> None:
    """A bad submit is INVALID_ARGUMENT with a violation for the image id, the missing work and the priority."""
    error = await _error(
        queue.stub.SubmitJob(queue_service_pb2.SubmitJobRequest(image_id="nope", priority=12))
    )
    assert isinstance(error, errors.InvalidArgument)
    assert {v.field for v in error.field_violations} == {"image_id", "pipeline", "priority"}


async def test_a_control_character_in_a_model_or_key_is_refused_and_fails_no_other_submit(
    queue: Harness,
) -> None:
    """NUL in the model or the idempotency key is INVALID_ARGUMENT naming both; PostgreSQL's text refuses NUL,
    and it was a 500 for that submit and for every submit that shared its group commit."""
    bad = queue_service_pb2.SubmitJobRequest(image_id=IMAGE_ID, model="a\0b", idempotency_key="k\x01")
    error, jobs = await asyncio.gather(
        _error(queue.stub.SubmitJob(bad)), asyncio.gather(*(queue.submit() for _ in range(8)))
    )
    assert isinstance(error, errors.InvalidArgument)
    assert [v.field for v in error.field_violations] == ["model", "idempotency_key"]
    assert "control character" in error.message
    assert all(job.state == job_pb2.JOB_STATE_QUEUED for job in jobs)


async def test_a_model_that_is_not_a_name_or_name_and_version_is_refused(queue: Harness) -> None:
    """``model`` is a name or ``name/version``: an empty version or a second slash is INVALID_ARGUMENT on
    ``model``, and ``name/version`` is accepted."""
    for model in ("strip-reader/", "strip-reader/1/2"):
        error = await _error(
            queue.stub.SubmitJob(queue_service_pb2.SubmitJobRequest(image_id=IMAGE_ID, model=model))
        )
        assert isinstance(error, errors.InvalidArgument)
        assert [v.field for v in error.field_violations] == ["model"]
    pinned = await queue.stub.SubmitJob(
        queue_service_pb2.SubmitJobRequest(image_id=IMAGE_ID, model="strip-reader/1")
    )
    assert pinned.job.model == "strip-reader/1"


async def test_a_pipeline_the_image_service_would_refuse_is_refused_at_submit(queue: Harness) -> None:
    """Unknown filters and bad parameters are INVALID_ARGUMENT at submit (the image service's own catalogue),
    every problem named in the message and as a violation, and no job is created."""
    steps = [
        params_pb2.PipelineStep(filter="nope"),
        params_pb2.PipelineStep(
            filter="gaussian_blur", params={"sigma": params_pb2.ParamValue(string_value="abc")}
        ),
        params_pb2.PipelineStep(filter="resize", params={"colour": params_pb2.ParamValue(int_value=1)}),
    ]
    key = f"bad-pipeline-{queue.settings.queue_prefix}"
    error = await _error(
        queue.stub.SubmitJob(
            queue_service_pb2.SubmitJobRequest(
                image_id=IMAGE_ID, pipeline=steps, priority=12, idempotency_key=key
            )
        )
    )
    assert isinstance(error, errors.InvalidArgument)
    assert [v.field for v in error.field_violations] == [
        "pipeline[0].filter",
        "pipeline[1].params.sigma",
        "pipeline[2].params.colour",
        "priority",
    ]
    assert "unknown filter 'nope'" in error.message
    assert "pipeline[1].params.sigma: must be a number between" in error.message
    rows = await queue.sql("SELECT count(*) AS n FROM jobs WHERE idempotency_key = %s", key)
    assert rows[0]["n"] == 0


class _Missing:
    """Lookups that find nothing."""

    def __init__(self) -> None:
        self.asked: list[tuple[str, str]] = []

    async def check(self, image_id: str, model: str, *, fresh: bool = False) -> None:
        self.asked.append((image_id, model))
        raise errors.NotFound(
            f"image {image_id} does not exist",
            field_violations=[errors.FieldViolation("image_id", "does not exist")],
        )

    async def close(self) -> None:
        return None


async def test_a_job_naming_what_does_not_exist_is_not_found_but_a_keyed_retry_gets_its_job(
    queue: Harness,
) -> None:
    """When the lookups say the image is missing, the submit is NOT_FOUND (404) and creates nothing; a retry
    under the key of a job already accepted gets that job back, though its image has gone since."""
    key = f"gone-{queue.settings.queue_prefix}"
    first = await queue.submit(idempotency_key=key)
    missing = _Missing()
    queue.app.servicer.references = missing
    error = await _error(
        queue.stub.SubmitJob(queue_service_pb2.SubmitJobRequest(image_id=IMAGE_ID, model="m"))
    )
    assert isinstance(error, errors.NotFound)
    assert errors.http_status(error) == 404
    assert [v.field for v in error.field_violations] == ["image_id"]
    again = await queue.submit(idempotency_key=key)
    assert again.id == first.id
    other_key = await _error(
        queue.stub.SubmitJob(
            queue_service_pb2.SubmitJobRequest(image_id=IMAGE_ID, model="m", idempotency_key=key + "-new")
        )
    )
    assert isinstance(other_key, errors.NotFound)
    assert missing.asked == [(IMAGE_ID, "m"), (IMAGE_ID, "script:noop"), (IMAGE_ID, "m")]
    rows = await queue.sql("SELECT count(*) AS n FROM jobs WHERE idempotency_key LIKE %s", key + "%")
    assert rows[0]["n"] == 1


async def test_a_retry_whose_image_has_gone_is_not_found_and_leaves_the_job_as_it_was(queue: Harness) -> None:
    """Retrying a cancelled job whose image has been deleted since is NOT_FOUND naming the image, as a submit
    would be, and the job stays CANCELLED: it was queued again only to fail at once. A job that cannot be
    retried at all (here still QUEUED) says so first (FAILED_PRECONDITION), without a lookup."""
    job = await queue.submit()
    await queue.stub.CancelJob(queue_service_pb2.CancelJobRequest(job_id=job.id))
    queued = await queue.submit()
    missing = _Missing()
    queue.app.servicer.references = missing
    error = await _error(queue.stub.RetryJob(queue_service_pb2.RetryJobRequest(job_id=job.id)))
    assert isinstance(error, errors.NotFound)
    assert error.message == f"job {job.id} cannot run again: image {job.image_id} does not exist"
    assert [v.field for v in error.field_violations] == ["image_id"]
    assert (await queue.get(job.id)).state == job_pb2.JOB_STATE_CANCELLED
    not_retryable = await _error(queue.stub.RetryJob(queue_service_pb2.RetryJobRequest(job_id=queued.id)))
    assert isinstance(not_retryable, errors.FailedPrecondition)
    assert missing.asked == [(job.image_id, job.model)]


async def test_a_retry_looks_the_image_up_again_though_it_was_found_a_moment_ago(queue: Harness) -> None:
    """RetryJob of a job whose image was deleted after its submit is NOT_FOUND naming the image, though the
    submit found it under ``remember_seconds`` before: a retry asks the file service afresh (it was queued
    again, to fail at once)."""
    images = {IMAGE_ID}

    async def find_image(image_id: str) -> object:
        if image_id not in images:
            raise errors.NotFound(f"image {image_id} does not exist")
        return image_id

    async def find_model(model: str) -> object:
        return model

    queue.app.servicer.references = ServiceReferences(find_image, find_model, timeout_seconds=1.0)
    job = await queue.submit()
    await queue.stub.CancelJob(queue_service_pb2.CancelJobRequest(job_id=job.id))
    images.clear()
    error = await _error(queue.stub.RetryJob(queue_service_pb2.RetryJobRequest(job_id=job.id)))
    assert isinstance(error, errors.NotFound)
    assert error.message == f"job {job.id} cannot run again: image {IMAGE_ID} does not exist"
    assert [v.field for v in error.field_violations] == ["image_id"]
    assert (await queue.get(job.id)).state == job_pb2.JOB_STATE_CANCELLED


async def test_a_retry_of_a_job_whose_model_the_inference_service_refuses_is_invalid(queue: Harness) -> None:
    """RetryJob of a job whose model the inference service refuses (a version over its limit, accepted before
    the queue checked it) is INVALID_ARGUMENT naming the model, and the job stays as it was: the refusal was
    taken for no answer, and the job queued again to fail at once."""
    job = await queue.submit(model="m/1")
    await queue.stub.CancelJob(queue_service_pb2.CancelJobRequest(job_id=job.id))

    async def found(name: str) -> object:
        return name

    async def refuse(model: str) -> object:
        raise errors.InvalidArgument("model 'm': a version has at most 64 characters; versions: 1")

    queue.app.servicer.references = ServiceReferences(found, refuse, timeout_seconds=1.0)
    error = await _error(queue.stub.RetryJob(queue_service_pb2.RetryJobRequest(job_id=job.id)))
    assert isinstance(error, errors.InvalidArgument)
    assert error.message.startswith(f"job {job.id} cannot run again: model 'm': a version has at most 64")
    assert [v.field for v in error.field_violations] == ["model"]
    assert (await queue.get(job.id)).state == job_pb2.JOB_STATE_CANCELLED


async def test_a_submit_stores_the_image_id_as_the_file_service_spells_it(queue: Harness) -> None:
    """Every spelling of the image's UUID (upper case, braces, ``urn:uuid:``, no dashes) is stored as the image's
    id, and a keyed retry spelling it another way is the same job, not ALREADY_EXISTS."""
    key = f"spelled-{queue.settings.queue_prefix}"
    spellings = [IMAGE_ID.upper(), "{" + IMAGE_ID + "}", "urn:uuid:" + IMAGE_ID, IMAGE_ID.replace("-", "")]
    for spelling in spellings:
        request = queue_service_pb2.SubmitJobRequest(image_id=spelling, model="script:noop")
        assert (await queue.stub.SubmitJob(request)).job.image_id == IMAGE_ID
    first = await queue.submit(idempotency_key=key)
    again = await queue.stub.SubmitJob(
        queue_service_pb2.SubmitJobRequest(
            image_id=IMAGE_ID.upper(), model="script:noop", idempotency_key=key
        )
    )
    assert (again.existing, again.job.id) == (True, first.id)
    rows = await queue.sql("SELECT DISTINCT image_id FROM jobs WHERE image_id ILIKE %s", "%" + IMAGE_ID[-12:])
    assert [r["image_id"] for r in rows] == [IMAGE_ID]


async def test_a_model_version_over_the_inference_services_limit_is_refused_at_submit(queue: Harness) -> None:
    """A version over 64 characters is INVALID_ARGUMENT on ``model`` before any lookup, and creates nothing (it
    was accepted, to fail at its first attempt)."""
    too_long = "strip-reader/" + "1" * 65
    error = await _error(
        queue.stub.SubmitJob(queue_service_pb2.SubmitJobRequest(image_id=IMAGE_ID, model=too_long))
    )
    assert isinstance(error, errors.InvalidArgument)
    assert [(v.field, v.description) for v in error.field_violations] == [
        ("model", "a version has at most 64 characters")
    ]
    rows = await queue.sql("SELECT count(*) AS n FROM jobs WHERE model = %s", too_long)
    assert rows[0]["n"] == 0


async def test_unknown_job_is_not_found(queue: Harness) -> None:
    """GetJob of an unknown id is NOT_FOUND; a malformed id is INVALID_ARGUMENT."""
    missing = await _error(queue.stub.GetJob(queue_service_pb2.GetJobRequest(job_id=IMAGE_ID)))
    assert isinstance(missing, errors.NotFound)
    bad = await _error(queue.stub.GetJob(queue_service_pb2.GetJobRequest(job_id="x")))
    assert isinstance(bad, errors.InvalidArgument)


async def test_list_is_newest_first_stable_and_filtered(queue: Harness) -> None:
    """Pages walk every job once, newest first; a state filter returns only that state; an unknown state or a
    token this service did not issue is refused, and a page size above 500 gives pages of 500."""
    ids = [(await queue.submit()).id for _ in range(7)]
    await queue.stub.CancelJob(queue_service_pb2.CancelJobRequest(job_id=ids[0]))
    seen: list[str] = []
    token = ""
    while True:
        page = await queue.stub.ListJobs(queue_service_pb2.ListJobsRequest(page_size=3, page_token=token))
        seen.extend(j.id for j in page.jobs)
        token = page.next_page_token
        if not token:
            break
    mine = [i for i in seen if i in set(ids)]
    assert mine == list(reversed(ids))
    assert len(seen) == len(set(seen))
    cancelled = await queue.stub.ListJobs(
        queue_service_pb2.ListJobsRequest(state=job_pb2.JOB_STATE_CANCELLED, page_size=500)
    )
    assert ids[0] in {j.id for j in cancelled.jobs}
    assert all(j.state == job_pb2.JOB_STATE_CANCELLED for j in cancelled.jobs)
    unknown = job_pb2.JobState.ValueType(99)  # proto3 keeps a number no state has; it was a 500
    no_state = await _error(queue.stub.ListJobs(queue_service_pb2.ListJobsRequest(state=unknown)))
    assert isinstance(no_state, errors.InvalidArgument)
    assert "state 99 is not a job state; send one of JOB_STATE_QUEUED" in no_state.message
    bad = await _error(queue.stub.ListJobs(queue_service_pb2.ListJobsRequest(page_token="!!")))
    assert isinstance(bad, errors.InvalidArgument)
    # Above the largest page, a page of the largest size (AIP-158), as ListImages does; it was refused.
    for _ in range(3):
        await queue.submit()
    huge = await queue.stub.ListJobs(queue_service_pb2.ListJobsRequest(page_size=100_000))
    assert 3 <= len(huge.jobs) <= 500


async def test_a_page_token_continues_only_the_listing_it_came_from(queue: Harness) -> None:
    """A token from a listing of all jobs, sent with a state filter (or the other way round), is
    INVALID_ARGUMENT naming both listings (AIP-158); it quietly listed that state from the token's place on.
    The same filter with its own token pages on."""
    for _ in range(3):
        await queue.submit()
    every = await queue.stub.ListJobs(queue_service_pb2.ListJobsRequest(page_size=1))
    queued = job_pb2.JOB_STATE_QUEUED
    switched = await _error(
        queue.stub.ListJobs(
            queue_service_pb2.ListJobsRequest(state=queued, page_size=1, page_token=every.next_page_token)
        )
    )
    assert isinstance(switched, errors.InvalidArgument)
    assert "page_token continues the listing of all jobs, not of QUEUED jobs" in switched.message
    filtered = await queue.stub.ListJobs(queue_service_pb2.ListJobsRequest(state=queued, page_size=1))
    dropped = await _error(
        queue.stub.ListJobs(
            queue_service_pb2.ListJobsRequest(page_size=1, page_token=filtered.next_page_token)
        )
    )
    assert "not of all jobs" in dropped.message
    following = await queue.stub.ListJobs(
        queue_service_pb2.ListJobsRequest(state=queued, page_size=1, page_token=filtered.next_page_token)
    )
    assert following.jobs
    assert following.jobs[0].id != filtered.jobs[0].id


async def test_cancel_queued_then_retry(queue: Harness) -> None:
    """A queued job cancels at once; cancel again is FAILED_PRECONDITION; retry queues attempt 2."""
    job = await queue.submit()
    cancelled = (await queue.stub.CancelJob(queue_service_pb2.CancelJobRequest(job_id=job.id))).job
    assert cancelled.state == job_pb2.JOB_STATE_CANCELLED
    assert cancelled.HasField("finish_time")
    again = await _error(queue.stub.CancelJob(queue_service_pb2.CancelJobRequest(job_id=job.id)))
    assert isinstance(again, errors.FailedPrecondition)
    retried = (await queue.stub.RetryJob(queue_service_pb2.RetryJobRequest(job_id=job.id))).job
    assert retried.state == job_pb2.JOB_STATE_QUEUED
    assert retried.attempt == 2
    assert (job.run_attempt, retried.run_attempt) == (1, 1), "a retry's run starts at its first attempt"
    assert [t.to_state for t in retried.history] == [
        job_pb2.JOB_STATE_QUEUED,
        job_pb2.JOB_STATE_CANCELLED,
        job_pb2.JOB_STATE_QUEUED,
    ]
    not_retryable = await _error(queue.stub.RetryJob(queue_service_pb2.RetryJobRequest(job_id=job.id)))
    assert isinstance(not_retryable, errors.FailedPrecondition)


async def test_dispatches_are_confirmed_and_reach_rabbitmq(queue: Harness) -> None:
    """The relay empties the outbox, and each queued job's dispatch waits in its RabbitMQ queue."""
    for _ in range(5):
        await queue.submit()
    # Patient: the relay runs in a child process, which a loaded machine may take seconds to start, and
    # it deletes outbox rows only after the broker's confirms, so a message can be in the queue before
    # its row is gone.
    for _ in range(600):
        stats = await queue.stub.GetQueueStats(queue_service_pb2.GetQueueStatsRequest())
        depth = next(q for q in stats.queues if q.queue == queue.inference_queue)
        pending = await queue.sql("SELECT count(*) AS n FROM outbox WHERE queue = %s", queue.inference_queue)
        if depth.broker_ready == 5 and pending[0]["n"] == 0:
            break
        await asyncio.sleep(0.05)
    assert depth.broker_ready == 5
    assert pending[0]["n"] == 0
    assert depth.jobs_by_state["QUEUED"] == 5
    assert stats.oldest_queued_age_seconds > 0


async def test_watch_streams_changes_until_the_end(queue: Harness) -> None:
    """WatchJob sends the current job, then each change with rising sequence numbers, and ends when terminal."""
    job = await queue.submit()
    stream = queue.stub.WatchJob(queue_service_pb2.WatchJobRequest(job_id=job.id))
    first = await stream.read()
    assert isinstance(first, queue_service_pb2.WatchJobResponse)
    assert first.sequence == 1
    assert first.job.state == job_pb2.JOB_STATE_QUEUED
    await queue.stub.CancelJob(queue_service_pb2.CancelJobRequest(job_id=job.id))
    rest: list[queue_service_pb2.WatchJobResponse] = []
    while (item := await stream.read()) is not grpc.aio.EOF:  # type: ignore[attr-defined]
        assert isinstance(item, queue_service_pb2.WatchJobResponse)
        rest.append(item)
    assert rest[-1].job.state == job_pb2.JOB_STATE_CANCELLED
    assert [r.sequence for r in rest] == list(range(2, 2 + len(rest)))


async def test_a_watch_sends_the_states_a_job_passed_between_two_polls(queue: Harness) -> None:
    """A job that goes RUNNING, fails once (RETRY_WAIT), is QUEUED again and SUCCEEDS within one poll of its
    watch is still seen in every state, in order, each as the job was at that change (its attempt, the time
    of the change, its history up to it), the last one whole. The watch sent QUEUED, then SUCCEEDED."""
    queue.app.servicer.watch_poll_seconds = 1.5
    job = await queue.submit("script:fail=TRANSIENT:1")
    stream = queue.stub.WatchJob(queue_service_pb2.WatchJobRequest(job_id=job.id))
    first = await stream.read()
    assert isinstance(first, queue_service_pb2.WatchJobResponse)
    await queue.start_worker(scripted_handler)
    rest: list[queue_service_pb2.WatchJobResponse] = []
    while (item := await stream.read()) is not grpc.aio.EOF:  # type: ignore[attr-defined]
        assert isinstance(item, queue_service_pb2.WatchJobResponse)
        rest.append(item)
    states = [(job_pb2.JobState.Name(r.job.state), r.job.attempt) for r in [first, *rest]]
    assert states == [
        ("JOB_STATE_QUEUED", 1),
        ("JOB_STATE_RUNNING", 1),
        ("JOB_STATE_RETRY_WAIT", 1),
        ("JOB_STATE_QUEUED", 2),
        ("JOB_STATE_RUNNING", 2),
        ("JOB_STATE_SUCCEEDED", 2),
    ]
    assert [r.sequence for r in [first, *rest]] == list(range(1, 7))
    assert [len(r.job.history) for r in rest] == [2, 3, 4, 5, 6]
    times = [r.job.update_time.ToDatetime() for r in rest]
    assert times == sorted(times)
    assert rest[1].job.next_run_time.ToDatetime() == rest[1].job.history[-1].next_run_time.ToDatetime()
    assert rest[-1].job.result.output_image_id == f"job-{job.id}-attempt-2"
    assert not rest[0].job.HasField("result")


async def test_a_jobs_row_and_history_are_read_in_one_snapshot(queue: Harness) -> None:
    """with_history answers the row and its transitions as of one instant (the watch matches the two), and a
    job that does not exist is NotFound."""
    job = await queue.submit()
    await queue.stub.CancelJob(queue_service_pb2.CancelJobRequest(job_id=job.id))
    row, history = await queue.app.servicer.repository.with_history(uuid.UUID(job.id))
    assert row["state"] == JobState.CANCELLED
    assert [h["to_state"] for h in history] == ["QUEUED", "CANCELLED"]
    with pytest.raises(errors.NotFound):
        await queue.app.servicer.repository.with_history(uuid.uuid4())


async def test_an_open_watch_ends_unavailable_as_soon_as_the_service_stops(queue: Harness) -> None:
    """SIGTERM ends the watch of an unfinished job at once with UNAVAILABLE ("restarting; retry"), which the
    gateway reopens: the watch went on until the drain's grace ran out (2 s here, 10 s by default), and
    the server refused every new call meanwhile."""
    job = await queue.submit()
    stream = queue.stub.WatchJob(queue_service_pb2.WatchJobRequest(job_id=job.id))
    first = await stream.read()
    assert isinstance(first, queue_service_pb2.WatchJobResponse)
    started = time.monotonic()
    queue.runtime.stopping.set()
    with pytest.raises(grpc.aio.AioRpcError) as info:
        while (await stream.read()) is not grpc.aio.EOF:  # type: ignore[attr-defined]
            pass
    assert (info.value.code(), info.value.details()) == (grpc.StatusCode.UNAVAILABLE, RESTARTING)
    assert time.monotonic() - started < 1.0


async def test_metrics_expose_depth_and_oldest_age(queue: Harness) -> None:
    """/metrics carries the queue's depth per state and the oldest queued job's age, refreshed by itself."""
    await queue.submit()
    url = f"http://127.0.0.1:{queue.runtime.http_port}/metrics/"
    depth = f'mesh_queue_jobs{{queue="{queue.inference_queue}",state="QUEUED"}} 1.0'
    age = f'mesh_queue_oldest_queued_age_seconds{{queue="{queue.inference_queue}"}}'
    async with httpx.AsyncClient() as client:
        for _ in range(100):
            text = (await client.get(url)).text
            if depth in text and age in text:
                break
            await asyncio.sleep(0.1)
    assert depth in text
    assert age in text
    assert "mesh_queue_dispatches_published_total" in text


async def test_a_queues_depth_falls_to_zero_when_its_last_job_leaves_a_state(queue: Harness) -> None:
    """The depth gauge follows a state that empties (QUEUED 1 -> 0 when the job is cancelled), and every state
    of every queue the service knows is exported, at 0 where it holds no job."""
    job = await queue.submit()
    url = f"http://127.0.0.1:{queue.runtime.http_port}/metrics/"

    def depth(state: str, n: int) -> str:
        return f'mesh_queue_jobs{{queue="{queue.inference_queue}",state="{state}"}} {n}.0'

    async def scrape_until(*wanted: str) -> str:
        async with httpx.AsyncClient() as client:
            for _ in range(100):
                text = (await client.get(url)).text
                if all(w in text for w in wanted):
                    break
                await asyncio.sleep(0.1)
        return text

    text = await scrape_until(depth("QUEUED", 1), depth("RUNNING", 0), depth("DEAD", 0))
    assert depth("QUEUED", 1) in text
    assert depth("RETRY_WAIT", 0) in text
    await queue.stub.CancelJob(queue_service_pb2.CancelJobRequest(job_id=job.id))
    text = await scrape_until(depth("QUEUED", 0), depth("CANCELLED", 1))
    assert depth("QUEUED", 0) in text
    assert depth("CANCELLED", 1) in text


async def test_relay_process_reports_its_counts_and_is_restarted(queue: Harness) -> None:
    """The relay publishes from a child process: its confirmed dispatches are counted in the service's own
    metrics, and a child that is killed is started again and publishes what was written meanwhile."""
    labels = {"queue": queue.inference_queue}
    assert isinstance(queue.app.relay, RelayProcess)
    await queue.submit()
    for _ in range(100):
        if REGISTRY.get_sample_value("mesh_queue_dispatches_published_total", labels) == 1:
            break
        await asyncio.sleep(0.05)
    assert REGISTRY.get_sample_value("mesh_queue_dispatches_published_total", labels) == 1

    child = queue.app.relay.process
    assert child is not None
    child.send_signal(signal.SIGKILL)
    await child.wait()
    await queue.submit()
    for _ in range(200):
        if REGISTRY.get_sample_value("mesh_queue_dispatches_published_total", labels) == 2:
            break
        await asyncio.sleep(0.05)
    assert REGISTRY.get_sample_value("mesh_queue_dispatches_published_total", labels) == 2
    assert queue.app.relay.process is not None
    assert queue.app.relay.process.pid != child.pid


async def test_a_broker_not_yet_connected_says_so_in_its_check() -> None:
    """Before its first connection the broker's check says it is still connecting, not that a connection
    closed and is reconnecting (what a worker's check said at every start, during its migrations)."""
    broker = Broker("amqp://guest:guest@localhost:5672/%2F", delivery_limit=3)
    with pytest.raises(ConnectionError, match=r"^not connected to RabbitMQ yet \(connecting\)$"):
        await broker.check()


async def test_finished_jobs_past_their_retention_are_deleted_with_their_history(queue: Harness) -> None:
    """The reconciler's prune deletes jobs that finished longer ago than the retention (their history goes with
    them, GetJob says NOT_FOUND, and their idempotency key makes a new job), and leaves recent finished jobs and
    every unfinished job, however old."""
    key = f"retention-{uuid.uuid4()}"
    old, recent, waiting = await queue.submit(idempotency_key=key), await queue.submit(), await queue.submit()
    for job in (old, recent):
        await queue.stub.CancelJob(queue_service_pb2.CancelJobRequest(job_id=job.id))
    await queue.sql("UPDATE jobs SET finished_at = now() - interval '40 days' WHERE id = %s", old.id)
    await queue.sql("UPDATE jobs SET enqueued_at = now() - interval '90 days' WHERE id = %s", waiting.id)
    reconciler = queue.app.reconciler
    reconciler.retention_seconds = 30 * 86400

    assert await reconciler.prune() == 1
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await queue.stub.GetJob(queue_service_pb2.GetJobRequest(job_id=old.id))
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    assert await queue.sql("SELECT count(*) AS n FROM job_history WHERE job_id = %s", old.id) == [{"n": 0}]
    for kept in (recent, waiting):
        await queue.stub.GetJob(queue_service_pb2.GetJobRequest(job_id=kept.id))
    assert await reconciler.prune() == 0
    assert (await queue.submit(idempotency_key=key)).id != old.id


async def test_a_retry_gives_the_job_a_fresh_dead_letter_budget(queue: Harness) -> None:
    """A job that went DEAD after its third collateral dead letter and is retried by its user is dispatched
    again by the next collateral dead letter instead of going DEAD at once."""
    job = await queue.submit()
    await queue.sql(
        "UPDATE jobs SET state = 'DEAD', dead_letters = 3, finished_at = now() WHERE id = %s", job.id
    )
    retried = (await queue.stub.RetryJob(queue_service_pb2.RetryJobRequest(job_id=job.id))).job
    target = await queue.app.repository.dead_letter(
        uuid.UUID(job.id), retried.attempt, "collateral", delivery_limit=3
    )
    assert target is JobState.QUEUED
    assert (await queue.get(job.id)).state == job_pb2.JOB_STATE_QUEUED


async def test_the_job_database_away_is_unavailable_not_internal() -> None:
    """With PostgreSQL unreachable past the repository's retry window, a call fails as UNAVAILABLE (which
    clients retry, and the gateway answers 503), naming the job database."""
    pool = open_pool("postgresql://postgres@127.0.0.1:1/none", name="test-unreachable", max_size=1)
    pool.timeout = 0.2
    await pool.open(wait=False)
    try:
        repository = JobRepository(pool, retry_timeout=0.3)
        with pytest.raises(errors.Unavailable, match="the job database is unavailable"):
            await repository.get(uuid.uuid4())
    finally:
        await pool.close()
