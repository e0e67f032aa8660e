"""The queue job handler: fetch, pipeline with progress beats, idempotent store, predict by reference."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode

from mesh.common.v1 import errors_pb2, image_pb2, params_pb2
from mesh.image.v1 import image_processing_service_pb2 as pb
from mesh.kit import errors
from mesh.kit.jobs import JobCancelled, JobHandler, JobInterrupted, LeaseLost
from mesh.queue.v1 import job_pb2
from mesh.services.image_processing import codec
from mesh.services.image_processing.cpu_backend import CpuBackend
from mesh.services.image_processing.jobs import ImageJobHandler
from mesh.services.image_processing.processor import Processor
from tests.image_processing.fakes import MemoryStore, RecordingPredictor
from tests.image_processing.images import smooth

LIMITS = codec.Limits()


@dataclass
class FakeContext:
    """A JobContext that records progress beats and can interrupt the job (cancel it) at a given beat."""

    job: job_pb2.Job
    cancel_at: int | None = None
    interruption: type[JobInterrupted] = JobCancelled
    beats: list[tuple[float, str]] = field(default_factory=list)

    @property
    def result_key(self) -> str:
        return f"{self.job.id}:{self.job.attempt}"

    async def progress(self, fraction: float, stage: str) -> None:
        self.beats.append((fraction, stage))
        if self.cancel_at is not None and len(self.beats) >= self.cancel_at:
            raise self.interruption()


@pytest.fixture
async def processor() -> AsyncIterator[Processor]:
    runner = Processor(CpuBackend(), store=None, limits=LIMITS)
    yield runner
    runner.close()


def _job(image_id: str, model: str = "", steps: int = 2) -> job_pb2.Job:
    pipeline = [
        params_pb2.PipelineStep(filter="grayscale"),
        params_pb2.PipelineStep(
            filter="gaussian_blur", params={"sigma": params_pb2.ParamValue(number_value=2.0)}
        ),
    ][:steps]
    return job_pb2.Job(id="job-1", attempt=2, image_id=image_id, pipeline=pipeline, model=model)


async def test_job_runs_pipeline_stores_and_predicts(processor: Processor) -> None:
    """Progress beats per step, output stored with job labels, prediction by reference to the output."""
    store = MemoryStore()
    predictor = RecordingPredictor()
    handler: JobHandler = ImageJobHandler(store, processor, predictor)
    image_id = store.put(codec.encode(smooth(30, 40, 3), codec.Format.PNG))
    context = FakeContext(_job(image_id, model="strip-reader"))
    result = await handler(context)
    data, labels = store.images[result.output_image_id]
    assert labels == {"job_id": "job-1", "attempt": "2"}
    assert codec.decode(data, LIMITS).shape == (30, 40, 1)
    assert predictor.requests[0].input.image_id == result.output_image_id
    assert predictor.requests[0].model_name == "strip-reader"
    assert result.prediction.model_name == "strip-reader"
    stages = [stage for _, stage in context.beats]
    assert stages.count("pipeline") == 3
    assert stages[0] == "fetch"
    assert "store" in stages
    assert "model" in stages
    fractions = [f for f, _ in context.beats]
    assert fractions == sorted(fractions)
    assert fractions[-1] == 1.0


async def test_a_jobs_file_service_calls_have_the_rpc_timeout() -> None:
    """A job has no caller's deadline: its download and its upload each get rpc_timeout_seconds (they had
    none, so a file service that never answered held the job RUNNING, its lease beaten, for ever)."""
    store = MemoryStore()
    runner = Processor(CpuBackend(), store=None, limits=LIMITS, rpc_timeout_seconds=7.5)
    try:
        image_id = store.put(codec.encode(smooth(10, 10, 3), codec.Format.PNG))
        await ImageJobHandler(store, runner, None)(FakeContext(_job(image_id)))
    finally:
        runner.close()
    assert store.timeouts == [7.5, 7.5]
    assert runner.admission.pending == 0


async def test_every_attempt_of_a_job_finds_the_output_an_earlier_one_stored(processor: Processor) -> None:
    """Attempts 1, 2 and 3 of a job (retried after its model step failed, say) store its output once: a key per
    attempt stored a copy each time. An attempt whose output bytes differ keeps its own, under its attempt."""
    store = MemoryStore()
    handler = ImageJobHandler(store, processor, None)
    image_id = store.put(codec.encode(smooth(10, 10, 3), codec.Format.PNG))
    outputs = set()
    for attempt in (1, 2, 3):
        job = _job(image_id)
        job.attempt = attempt
        outputs.add((await handler(FakeContext(job))).output_image_id)
    assert (len(outputs), store.uploads) == (1, 1)
    other = _job(image_id, steps=1)  # the same job id whose output differs
    other.attempt = 4
    differing = await handler(FakeContext(other))
    assert differing.output_image_id not in outputs
    assert store.by_key["job-1:4"] == differing.output_image_id


async def test_repeated_attempt_does_not_store_twice(processor: Processor) -> None:
    """The same attempt run twice stores one output (idempotency key = result_key)."""
    store = MemoryStore()
    handler = ImageJobHandler(store, processor, None)
    image_id = store.put(codec.encode(smooth(10, 10, 3), codec.Format.PNG))
    first = await handler(FakeContext(_job(image_id)))
    second = await handler(FakeContext(_job(image_id)))
    assert first.output_image_id == second.output_image_id
    assert store.uploads == 1


async def test_error_categories(processor: Processor) -> None:
    """Undecodable -> DATA, bad pipeline -> PERMANENT, inference UNAVAILABLE -> TRANSIENT."""
    store = MemoryStore()
    broken = store.put(b"\x89PNG\r\n\x1a\ngarbage")
    handler = ImageJobHandler(store, processor, RecordingPredictor(errors.Unavailable("inference is down")))
    with pytest.raises(errors.InvalidData) as data_error:
        await handler(FakeContext(_job(broken)))
    assert data_error.value.category == errors_pb2.ERROR_CATEGORY_DATA
    bad = _job(broken)
    bad.pipeline[1].params["sigma"].number_value = 500.0
    with pytest.raises(errors.InvalidArgument) as param_error:
        await handler(FakeContext(bad))
    assert param_error.value.category == errors_pb2.ERROR_CATEGORY_PERMANENT
    good = store.put(codec.encode(smooth(10, 10, 3), codec.Format.PNG))
    with pytest.raises(errors.Unavailable) as down:
        await handler(FakeContext(_job(good, model="strip-reader")))
    assert down.value.category == errors_pb2.ERROR_CATEGORY_TRANSIENT


@pytest.mark.parametrize("interruption", [JobCancelled, LeaseLost])
async def test_cancel_or_a_lost_lease_at_a_beat_stops_the_job(
    processor: Processor, interruption: type[JobInterrupted]
) -> None:
    """JobCancelled or LeaseLost from a progress beat propagates as itself (not as an INTERNAL failure, which
    the worker would try to commit) and nothing is stored."""
    store = MemoryStore()
    handler = ImageJobHandler(store, processor, None)
    image_id = store.put(codec.encode(smooth(10, 10, 3), codec.Format.PNG))
    with pytest.raises(interruption):
        await handler(FakeContext(_job(image_id), cancel_at=3, interruption=interruption))
    assert store.uploads == 0


async def test_a_job_can_pin_the_model_version(processor: Processor) -> None:
    """``name/version`` reaches the model as its name and version, not as a name with a slash."""
    store = MemoryStore()
    predictor = RecordingPredictor()
    handler: JobHandler = ImageJobHandler(store, processor, predictor)
    image_id = store.put(codec.encode(smooth(30, 40, 3), codec.Format.PNG))
    await handler(FakeContext(_job(image_id, model="strip-reader/1")))
    assert (predictor.requests[0].model_name, predictor.requests[0].model_version) == ("strip-reader", "1")


async def test_model_only_job_predicts_on_the_input(processor: Processor) -> None:
    """Without a pipeline the input image itself goes to the model and nothing is stored."""
    store = MemoryStore()
    predictor = RecordingPredictor()
    handler = ImageJobHandler(store, processor, predictor)
    result = await handler(FakeContext(_job("img-9", model="strip-reader", steps=0)))
    assert result.output_image_id == "img-9"
    assert predictor.requests[0].input.image_id == "img-9"
    assert store.uploads == 0


async def test_connect_job_handler_builds_and_closes(processor: Processor) -> None:
    """The wiring helper yields a handler on real channels and closes them on exit."""
    from mesh.services.image_processing.jobs import connect_job_handler
    from mesh.services.image_processing.settings import ImageSettings

    settings = ImageSettings(file_service_address="127.0.0.1:1", inference_service_address="127.0.0.1:1")
    async with connect_job_handler(settings, processor) as handler:
        assert isinstance(handler, ImageJobHandler)


def test_the_shedding_counter_is_exported_at_zero_before_any_refusal(processor: Processor) -> None:
    """``mesh_image_pipelines_rejected_total`` exists at 0 from the start, so the first refusal shows in rate()."""
    from prometheus_client import REGISTRY

    assert REGISTRY.get_sample_value("mesh_image_pipelines_rejected_total", {"device": "cpu"}) is not None


async def test_the_job_span_is_an_error_only_when_the_mesh_failed(
    processor: Processor, spans: InMemorySpanExporter
) -> None:
    """A job on an image that is gone (the submitter's error) leaves its image.job span UNSET, naming
    NOT_FOUND, with no exception event; the inference service being down is an ERROR. Both were ERROR, each
    with the exception and its stack trace recorded."""
    store = MemoryStore()
    good = store.put(codec.encode(smooth(10, 10, 3), codec.Format.PNG))
    handler = ImageJobHandler(store, processor, RecordingPredictor(errors.Unavailable("inference is down")))
    spans.clear()
    with pytest.raises(errors.NotFound):
        await handler(FakeContext(_job("no-such-image")))
    with pytest.raises(errors.Unavailable):
        await handler(FakeContext(_job(good, model="strip-reader")))
    jobs = [s for s in spans.get_finished_spans() if s.name == "image.job"]
    assert [(s.status.status_code, (s.attributes or {}).get("mesh.error.code")) for s in jobs] == [
        (StatusCode.UNSET, "NOT_FOUND"),
        (StatusCode.ERROR, "UNAVAILABLE"),
    ]
    assert [s.events for s in jobs] == [(), ()]


async def test_a_stage_span_that_meets_the_callers_error_is_not_an_error(spans: InMemorySpanExporter) -> None:
    """ProcessImage on an image that does not exist: its image.load span names NOT_FOUND and stays UNSET with
    no exception event (it was ERROR, with the NotFound's stack trace, as for a crash)."""
    processor = Processor(CpuBackend(), store=MemoryStore(), limits=codec.Limits())
    missing = image_pb2.ImageInput(image_id=str(uuid.uuid4()))
    spans.clear()
    try:
        with pytest.raises(errors.NotFound):
            await processor.process(missing, [], pb.OutputSpec(format=image_pb2.IMAGE_FORMAT_PNG))
    finally:
        processor.close()
    [load] = [s for s in spans.get_finished_spans() if s.name == "image.load"]
    assert (load.status.status_code, load.events) == (StatusCode.UNSET, ())
    assert (load.attributes or {}).get("mesh.error.code") == "NOT_FOUND"
