"""The queue's job handler for image jobs: fetch, run the pipeline, store, then (optionally) predict.

Built by constructor injection: an :class:`~mesh.services.image_processing.processor.ImageStore` (the file
service client), a :class:`Predictor` (the inference service) and a
:class:`~mesh.services.image_processing.processor.Processor` (the pipeline runner). The queue's worker
runtime calls it with a :class:`~mesh.kit.jobs.JobContext` per attempt.

Error categories follow the kit: an undecodable image is DATA, a bad pipeline PERMANENT, an unreachable
service TRANSIENT (from the gRPC status), anything unexpected SYSTEM.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Protocol

import grpc

from mesh.common.v1 import image_pb2
from mesh.inference.v1 import inference_service_pb2, inference_service_pb2_grpc
from mesh.kit import errors, tracing
from mesh.kit.channels import open_channel
from mesh.kit.jobs import JobContext, ModelReference
from mesh.kit.settings import InferenceServiceAddress
from mesh.queue.v1 import job_pb2
from mesh.services.file.client import FileClient
from mesh.services.image_processing import codec
from mesh.services.image_processing.processor import ImageStore, Processor
from mesh.services.image_processing.registry import Step, steps_from_proto
from mesh.services.image_processing.settings import ImageSettings
from mesh.services.inference.settings import SERVICE_NAME as INFERENCE_SERVICE_NAME

_tracer = tracing.tracer(__name__)

OUTPUT_FORMAT = codec.Format.PNG


class Predictor(Protocol):
    """The part of the inference service a job uses."""

    async def predict(
        self, request: inference_service_pb2.PredictRequest
    ) -> inference_service_pb2.PredictResponse:
        """One prediction; raises MeshError on failure."""
        ...


class StubPredictor:
    """A :class:`Predictor` over the generated InferenceService stub."""

    def __init__(
        self, stub: inference_service_pb2_grpc.InferenceServiceAsyncStub, timeout: float | None = None
    ) -> None:
        self._stub = stub
        self._timeout = timeout

    @classmethod
    def connect(cls, settings: InferenceServiceAddress) -> tuple[StubPredictor, grpc.aio.Channel]:
        """A predictor on a new channel to ``settings.inference_service_address`` (close the channel)."""
        channel = open_channel(settings.inference_service_address, settings, service=INFERENCE_SERVICE_NAME)
        return cls(inference_service_pb2_grpc.InferenceServiceStub(channel)), channel

    async def predict(
        self, request: inference_service_pb2.PredictRequest
    ) -> inference_service_pb2.PredictResponse:
        with errors.rpc_errors():
            response: inference_service_pb2.PredictResponse = await self._stub.Predict(
                request, timeout=self._timeout
            )
        return response


# Progress: fetch 0..0.1, decode and pipeline 0.1..0.8, encode and store 0.8..0.9, model 0.9..1.
FETCHED, PIPELINE_END, STORED = 0.1, 0.8, 0.9


class ImageJobHandler:
    """Runs one attempt of an image job (a :class:`mesh.kit.jobs.JobHandler`)."""

    def __init__(self, files: ImageStore, processor: Processor, predictor: Predictor | None) -> None:
        self._files = files
        self._processor = processor
        self._predictor = predictor

    async def __call__(self, context: JobContext) -> job_pb2.JobResult:
        job = context.job
        attributes: dict[str, str | int] = {
            "job.id": job.id,
            "job.attempt": int(job.attempt),
            "job.model": job.model,
        }
        # An unexpected error is left to the worker runtime, which logs it and counts a SYSTEM failure.
        with tracing.internal_span(_tracer, "image.job", attributes):
            return await self._run(context)

    async def _run(self, context: JobContext) -> job_pb2.JobResult:
        job = context.job
        steps = steps_from_proto(job.pipeline)
        if job.model and self._predictor is None:
            raise errors.FailedPrecondition(
                f"job {job.id} names model {job.model!r} but no inference service is set"
            )
        output_id = job.image_id
        if steps:
            output_id = await self._process(context, steps)
        result = job_pb2.JobResult(output_image_id=output_id)
        if job.model:
            assert self._predictor is not None
            await context.progress(STORED, "model")
            model = ModelReference.parse(job.model)
            prediction = await self._predictor.predict(
                inference_service_pb2.PredictRequest(
                    model_name=model.name,
                    model_version=model.version,
                    input=image_pb2.ImageInput(image_id=output_id),
                    request_id=context.result_key,
                )
            )
            result.prediction.CopyFrom(prediction)
        await context.progress(1.0, "model" if job.model else "store")
        return result

    async def _process(self, context: JobContext, steps: list[Step]) -> str:
        job = context.job
        await context.progress(0.0, "fetch")
        # A job has no caller's deadline: each file service call gets the settings' rpc_timeout_seconds.
        timeout = self._processor.store_timeout()
        _, _, data = await self._files.download(job.image_id, timeout=timeout)
        await context.progress(FETCHED, "pipeline")

        async def beat(index: int, step: Step, seconds: float) -> None:
            fraction = FETCHED + (PIPELINE_END - FETCHED) * (index + 1) / len(steps)
            await context.progress(fraction, "pipeline")

        encoded = await self._processor.transform(data, steps, beat, where="job.image_id", fmt=OUTPUT_FORMAT)
        await context.progress(PIPELINE_END, "store")

        async def store(key: str) -> str:
            stored = await self._files.upload(
                encoded,
                filename=f"job-{job.id}.png",
                content_type=codec.CONTENT_TYPES[OUTPUT_FORMAT],
                labels={"job_id": job.id, "attempt": str(job.attempt)},
                idempotency_key=key,
                timeout=timeout,
            )
            return stored.image.id

        # One key per job: every attempt of it (a redelivery, a retry after the model step failed) finds the
        # output an earlier one stored, where a key per attempt stored a copy each time (4 of one job's in a
        # fault review). An attempt whose bytes differ (another backend's rounding) keeps its own under a key
        # of its attempt.
        try:
            return await store(f"job-{job.id}-output")
        except errors.AlreadyExists:
            return await store(context.result_key)


@asynccontextmanager
async def connect_job_handler(
    settings: ImageSettings, processor: Processor
) -> AsyncIterator[ImageJobHandler]:
    """A handler on real channels to the file and inference services (closed on exit), for worker wiring::

    async with connect_job_handler(settings, processor) as handler:
        ...  # hand ``handler`` to the queue's worker runtime
    """
    files = FileClient.connect(settings)
    predictor, channel = StubPredictor.connect(settings)
    try:
        yield ImageJobHandler(files, processor, predictor)
    finally:
        await channel.close(None)
        await files.close()
