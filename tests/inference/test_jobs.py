"""The inference job handler: fetch by image id, progress beats, predict, result; errors keep their category."""

from __future__ import annotations

import io
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode
from PIL import Image

from mesh.common.v1 import errors_pb2
from mesh.inference.v1 import inference_service_pb2 as pb
from mesh.kit.errors import InvalidArgument, NotFound
from mesh.kit.jobs import JobCancelled, JobHandler
from mesh.queue.v1 import job_pb2
from mesh.services.inference.images import ImageDecoder
from mesh.services.inference.jobs import InferenceJobHandler
from mesh.services.inference.predictor import Predictor
from mesh.services.inference.repository import ModelRepository
from tests.inference.fakes import FakeFactory, MemoryFetcher, write_model
from tests.inference.test_servicer import png

# Image ids are UUIDs: the predictor refuses any other before it asks the file service.
IMAGE = "6f0c3a52-2d7e-4a8e-9f43-0b1d5e7c9a01"
TINY = "6f0c3a52-2d7e-4a8e-9f43-0b1d5e7c9a02"
GONE = "6f0c3a52-2d7e-4a8e-9f43-0b1d5e7c9a03"


class Context:
    """A JobContext that records progress and can cancel at a chosen stage."""

    def __init__(self, job: job_pb2.Job, cancel_at: str = "") -> None:
        self._job = job
        self.beats: list[tuple[float, str]] = []
        self.cancel_at = cancel_at

    @property
    def job(self) -> job_pb2.Job:
        return self._job

    @property
    def result_key(self) -> str:
        return f"{self._job.id}/{self._job.attempt}"

    async def progress(self, fraction: float, stage: str) -> None:
        self.beats.append((fraction, stage))
        if stage == self.cancel_at:
            raise JobCancelled(self._job.id)


@pytest.fixture(scope="module")
async def handler(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[InferenceJobHandler]:
    root: Path = tmp_path_factory.mktemp("models")
    write_model(root, version=1)
    write_model(root, version=2)
    repository = ModelRepository(root, factories={"fake": FakeFactory()})
    await repository.load()
    tiny = io.BytesIO()
    Image.fromarray(np.full((3, 3), 220, np.uint8)).save(tiny, format="PNG")
    images = {IMAGE: png(220), TINY: tiny.getvalue()}
    predictor = Predictor(repository, ImageDecoder(max_pixels=1_000_000), MemoryFetcher(images))
    yield InferenceJobHandler(predictor)
    await repository.close()


def _job(model: str = "fake", image_id: str = IMAGE) -> job_pb2.Job:
    return job_pb2.Job(id="job-1", attempt=2, image_id=image_id, model=model)


async def test_job_returns_the_prediction_with_progress(handler: InferenceJobHandler) -> None:
    """The job's image is read by id and predicted; progress goes fetch -> model -> done."""
    typed: JobHandler = handler
    context = Context(_job())
    result = await typed(context)
    assert result.prediction.strip_reading.verdict == pb.VERDICT_POSITIVE
    assert result.prediction.model_version == "2"
    assert result.prediction.request_id == "job-1/2"
    assert context.beats == [(0.0, "fetch"), (0.5, "model"), (1.0, "model")]


async def test_job_can_name_a_version(handler: InferenceJobHandler) -> None:
    """``name/version`` picks that version."""
    result = await handler(Context(_job(model="fake/1")))
    assert result.prediction.model_version == "1"


async def test_cancel_is_seen_before_the_model_runs(handler: InferenceJobHandler) -> None:
    """A cancel seen at the model stage's beat stops the job with JobCancelled."""
    with pytest.raises(JobCancelled):
        await handler(Context(_job(), cancel_at="model"))


async def test_errors_carry_their_category(handler: InferenceJobHandler) -> None:
    """A missing image or model fails PERMANENT, an image smaller than the model reads DATA (neither is
    retried); a job without a model or image is refused."""
    with pytest.raises(NotFound) as info:
        await handler(Context(_job(image_id=GONE)))
    assert info.value.category == errors_pb2.ERROR_CATEGORY_PERMANENT
    with pytest.raises(NotFound):
        await handler(Context(_job(model="unknown")))
    with pytest.raises(InvalidArgument) as too_small:
        await handler(Context(_job(image_id=TINY)))
    assert too_small.value.category == errors_pb2.ERROR_CATEGORY_DATA
    with pytest.raises(InvalidArgument):
        await handler(Context(_job(model="")))
    with pytest.raises(InvalidArgument):
        await handler(Context(_job(image_id="")))


async def test_a_prediction_on_a_missing_image_is_not_a_span_error(
    handler: InferenceJobHandler, spans: InMemorySpanExporter
) -> None:
    """A predict on an image that does not exist is its caller's error: the inference.predict span names
    NOT_FOUND and its message, stays UNSET and records no exception (it was ERROR, with the NotFound and its
    stack trace as an event, and read as a crash)."""
    spans.clear()
    with pytest.raises(NotFound):
        await handler(Context(_job(image_id=GONE)))
    [span] = [s for s in spans.get_finished_spans() if s.name == "inference.predict"]
    assert span.status.status_code is StatusCode.UNSET
    assert span.events == ()
    assert span.attributes is not None
    assert span.attributes["mesh.error.code"] == "NOT_FOUND"
    assert GONE in str(span.attributes["mesh.error.message"])
