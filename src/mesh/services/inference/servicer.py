"""``mesh.inference.v1.InferenceService`` over the model repository and the predictor."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterable, AsyncIterator
from typing import Any

import grpc
from typing_extensions import override

from mesh.common.v1 import image_pb2
from mesh.inference.v1 import inference_service_pb2 as pb
from mesh.inference.v1 import inference_service_pb2_grpc as pb_grpc
from mesh.kit.deadlines import deadline_in
from mesh.kit.logging import get_logger
from mesh.kit.runtime import until_stopping
from mesh.kit.stream_items import item_error
from mesh.services.inference.predictor import DEVICES, Predictor, assign_request_id
from mesh.services.inference.repository import LOOKUP_FIELDS, ModelEntry, ModelRepository, ModelVersion

log = get_logger(__name__)

Context = grpc.aio.ServicerContext[Any, Any]


def version_status(version: ModelVersion) -> pb.ModelVersionStatus:
    """A version's load state."""
    state, reason = version.status()
    return pb.ModelVersionStatus(version=version.version, ready=state == "READY", state=state, reason=reason)


def model_summary(entry: ModelEntry) -> pb.ModelSummary:
    """A model's versions and readiness."""
    default = entry.default()
    return pb.ModelSummary(
        name=entry.name,
        versions=list(entry.versions),
        default_version=default.version,
        ready=default.ready,
        description=entry.description,
        version_status=[version_status(v) for v in entry.versions.values()],
    )


class InferenceServicer(pb_grpc.InferenceServiceServicer):
    """The gRPC face of the predictor."""

    def __init__(
        self, predictor: Predictor, *, stream_max_in_flight: int = 32, stopping: asyncio.Event | None = None
    ) -> None:
        self._predictor = predictor
        self._repository: ModelRepository = predictor.repository
        self._stream_max_in_flight = stream_max_in_flight
        self._stopping = asyncio.Event() if stopping is None else stopping
        """Set when the service stops (``ServiceRuntime.stopping``): a stream then reads no more requests,
        answers the ones it has, and ends UNAVAILABLE."""

    @override
    async def ListModels(self, request: pb.ListModelsRequest, context: Context) -> pb.ListModelsResponse:
        return pb.ListModelsResponse(models=[model_summary(entry) for entry in self._repository])

    @override
    async def GetModelMetadata(
        self, request: pb.GetModelMetadataRequest, context: Context
    ) -> pb.GetModelMetadataResponse:
        entry = self._repository.entry(request.name, fields=LOOKUP_FIELDS)
        version = self._repository.get(request.name, request.version, fields=LOOKUP_FIELDS)
        config = version.config
        model = version.model
        return pb.GetModelMetadataResponse(
            name=entry.name,
            versions=list(entry.versions),
            version=version.version,
            platform=model.platform if model is not None else "",
            inputs=[
                pb.TensorSpec(name=t.name, datatype=t.datatype, shape=t.shape, description=t.description)
                for t in config.inputs
            ],
            outputs=[
                pb.TensorSpec(name=t.name, datatype=t.datatype, shape=t.shape, description=t.description)
                for t in config.outputs
            ],
            parameters={name: spec.to_proto() for name, spec in config.parameters.items()},
            max_batch_size=config.max_batch_size,
            device=DEVICES[model.device] if model is not None else image_pb2.DEVICE_UNSPECIFIED,
            description=config.description,
            status=version_status(version),
            max_queue_delay_seconds=config.max_queue_delay_ms / 1000.0,
            instance_count=version.instances,
            instance_kind=config.instance_kind,
            default_version=entry.default().version,
            version_status=[version_status(v) for v in entry.versions.values()],
        )

    @override
    async def ModelReady(self, request: pb.ModelReadyRequest, context: Context) -> pb.ModelReadyResponse:
        version = self._repository.get(request.name, request.version, fields=LOOKUP_FIELDS)
        state, reason = version.status()
        return pb.ModelReadyResponse(ready=state == "READY", version=version.version, reason=reason)

    @override
    async def Predict(self, request: pb.PredictRequest, context: Context) -> pb.PredictResponse:
        return await self._predictor.predict(request, deadline=deadline_in(context.time_remaining()))

    @override
    async def StreamInference(
        self, request_iterator: AsyncIterable[pb.StreamInferenceRequest], context: Context
    ) -> AsyncIterator[pb.StreamInferenceResponse]:
        """Requests run concurrently (so they can share batches); responses keep the requests' order. When the
        service stops, the requests read so far are answered and the stream ends UNAVAILABLE (``RESTARTING``)."""
        deadline = deadline_in(context.time_remaining())
        window = asyncio.Semaphore(self._stream_max_in_flight)
        answers: asyncio.Queue[asyncio.Task[pb.StreamInferenceResponse] | None] = asyncio.Queue()

        async def read() -> None:
            try:
                async for item in until_stopping(request_iterator, self._stopping):
                    # The slot is taken before the task exists: a task created and then left waiting for room
                    # would be in neither ``answers`` nor ``started`` when the stream ends, and nothing would
                    # cancel it.
                    await window.acquire()
                    answers.put_nowait(asyncio.create_task(self._answer(item.request, deadline)))
            finally:
                answers.put_nowait(None)

        reader = asyncio.create_task(read(), name="stream-reader")
        started: list[asyncio.Task[pb.StreamInferenceResponse]] = []
        try:
            while (task := await answers.get()) is not None:
                started.append(task)
                answer = await task
                started.remove(task)
                window.release()
                yield answer
            await reader  # surfaces a broken request stream
        finally:
            reader.cancel()
            while not answers.empty():
                leftover = answers.get_nowait()
                if leftover is not None:
                    started.append(leftover)
            for task in started:
                task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader

    async def _answer(self, request: pb.PredictRequest, deadline: float | None) -> pb.StreamInferenceResponse:
        request_id = assign_request_id(request)
        try:
            response = await self._predictor.predict(request, deadline=deadline)
        except Exception as error:
            status = item_error(error, log, "stream prediction crashed", request_id=request_id)
            return pb.StreamInferenceResponse(error=status, request_id=request_id)
        return pb.StreamInferenceResponse(response=response, request_id=request_id)

    @override
    async def GetModelStatistics(
        self, request: pb.GetModelStatisticsRequest, context: Context
    ) -> pb.GetModelStatisticsResponse:
        # An empty name asks for every model's statistics.
        entries = (
            [self._repository.entry(request.name, fields=LOOKUP_FIELDS)]
            if request.name
            else list(self._repository)
        )
        return pb.GetModelStatisticsResponse(
            statistics=[v.stats.to_proto() for entry in entries for v in entry.versions.values()]
        )
