"""A typed client of the inference service for other services: the queue service checks a submitted job's
model with it (``queue.references``).

Errors come back as :class:`~mesh.kit.errors.MeshError` subclasses, never as raw ``AioRpcError``.
"""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator

import grpc

from mesh.common.v1 import image_pb2
from mesh.inference.v1 import inference_service_pb2 as pb
from mesh.inference.v1 import inference_service_pb2_grpc as pb_grpc
from mesh.kit import errors
from mesh.kit.channels import open_channel
from mesh.kit.settings import InferenceServiceAddress
from mesh.services.inference.settings import SERVICE_NAME


class InferenceClient:
    """Predictions and model metadata from the inference service."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        self._channel = channel
        self._stub: pb_grpc.InferenceServiceAsyncStub = pb_grpc.InferenceServiceStub(channel)

    @classmethod
    def connect(cls, settings: InferenceServiceAddress) -> InferenceClient:
        """A client on a new channel to ``settings.inference_service_address``."""
        channel = open_channel(
            settings.inference_service_address,
            settings,
            service=SERVICE_NAME,
            streaming_methods=("StreamInference",),
        )
        return cls(channel)

    async def close(self) -> None:
        """Close the channel."""
        await self._channel.close(None)

    async def predict(
        self, request: pb.PredictRequest, *, timeout: float | None = None
    ) -> pb.PredictResponse:
        """One prediction."""
        with errors.rpc_errors():
            response: pb.PredictResponse = await self._stub.Predict(request, timeout=timeout)
        return response

    async def predict_image(
        self,
        model: str,
        image_id: str,
        *,
        version: str = "",
        precheck_only: bool = False,
        request_id: str = "",
        timeout: float | None = None,
    ) -> pb.PredictResponse:
        """A prediction on an image stored in the file service."""
        request = pb.PredictRequest(
            model_name=model,
            model_version=version,
            input=image_pb2.ImageInput(image_id=image_id),
            request_id=request_id,
            precheck_only=precheck_only,
        )
        return await self.predict(request, timeout=timeout)

    async def list_models(self, *, timeout: float | None = None) -> list[pb.ModelSummary]:
        """Every model with its versions and readiness."""
        with errors.rpc_errors():
            response: pb.ListModelsResponse = await self._stub.ListModels(
                pb.ListModelsRequest(), timeout=timeout
            )
        return list(response.models)

    async def metadata(
        self, name: str, version: str = "", *, timeout: float | None = None
    ) -> pb.GetModelMetadataResponse:
        """A model version's metadata."""
        with errors.rpc_errors():
            response: pb.GetModelMetadataResponse = await self._stub.GetModelMetadata(
                pb.GetModelMetadataRequest(name=name, version=version), timeout=timeout
            )
        return response

    async def ready(
        self, name: str, version: str = "", *, timeout: float | None = None
    ) -> pb.ModelReadyResponse:
        """Whether a model version is ready, and why not."""
        with errors.rpc_errors():
            response: pb.ModelReadyResponse = await self._stub.ModelReady(
                pb.ModelReadyRequest(name=name, version=version), timeout=timeout
            )
        return response

    async def statistics(self, name: str = "", *, timeout: float | None = None) -> list[pb.ModelStatistics]:
        """Serving statistics of one model's versions (all models when ``name`` is empty)."""
        with errors.rpc_errors():
            response: pb.GetModelStatisticsResponse = await self._stub.GetModelStatistics(
                pb.GetModelStatisticsRequest(name=name), timeout=timeout
            )
        return list(response.statistics)

    async def stream(
        self, requests: AsyncIterable[pb.PredictRequest]
    ) -> AsyncIterator[pb.StreamInferenceResponse]:
        """Predictions over one bidirectional stream; a failed request's error is in its response."""

        async def wrapped() -> AsyncIterator[pb.StreamInferenceRequest]:
            async for request in requests:
                yield pb.StreamInferenceRequest(request=request)

        with errors.rpc_errors():
            async for response in self._stub.StreamInference(wrapped()):
                yield response
