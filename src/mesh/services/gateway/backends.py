"""The gRPC services behind the gateway: one instrumented channel per service, typed stubs on it.

Every outgoing call goes through :func:`mesh.kit.channels.open_channel` (deadlines, retries, trace context);
:func:`rpc` turns a failed call into the mesh's :class:`~mesh.kit.errors.MeshError`.
"""

from __future__ import annotations

from collections.abc import Awaitable
from dataclasses import dataclass
from typing import TypeVar

import grpc
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2_grpc

from mesh.image.v1 import image_processing_service_pb2, image_processing_service_pb2_grpc
from mesh.inference.v1 import inference_service_pb2, inference_service_pb2_grpc
from mesh.kit import errors
from mesh.kit.channels import open_channel
from mesh.queue.v1 import queue_service_pb2_grpc
from mesh.services.file import settings as file_settings
from mesh.services.file.client import FileClient
from mesh.services.gateway.settings import GatewaySettings
from mesh.services.image_processing import settings as image_settings
from mesh.services.inference import settings as inference_settings
from mesh.services.queue import settings as queue_settings

FILE_SERVICE = file_settings.SERVICE_NAME
IMAGE_SERVICE = image_settings.SERVICE_NAME
INFERENCE_SERVICE = inference_settings.SERVICE_NAME
QUEUE_SERVICE = queue_settings.SERVICE_NAME

T = TypeVar("T")
R = TypeVar("R", bound=Message)


@dataclass(frozen=True)
class ServiceEndpoint:
    """One backend service: its short name, gRPC service name, channel and HTTP health address."""

    key: str
    service: str
    channel: grpc.aio.Channel
    http_address: str

    @property
    def health(self) -> health_pb2_grpc.HealthStub:
        """A grpc.health.v1 stub on this service's channel."""
        return health_pb2_grpc.HealthStub(self.channel)


def serialized_unary(
    channel: grpc.aio.Channel, method: str, response_type: type[R]
) -> grpc.aio.UnaryUnaryMultiCallable[bytes, R]:
    """A unary method of ``channel`` whose requests are given already serialised."""
    call: grpc.aio.UnaryUnaryMultiCallable[bytes, R] = channel.unary_unary(
        method,
        request_serializer=None,  # the bytes go out as they are
        response_deserializer=response_type.FromString,
    )
    return call


class Backends:
    """The stubs of the four services the gateway fronts."""

    def __init__(self, settings: GatewaySettings) -> None:
        file_channel = open_channel(
            settings.file_service_address,
            settings,
            service=FILE_SERVICE,
            streaming_methods=("UploadImage", "DownloadImage"),
        )
        image_channel = open_channel(settings.image_service_address, settings, service=IMAGE_SERVICE)
        inference_channel = open_channel(
            settings.inference_service_address, settings, service=INFERENCE_SERVICE
        )
        queue_channel = open_channel(
            settings.queue_service_address, settings, service=QUEUE_SERVICE, streaming_methods=("WatchJob",)
        )
        self.endpoints = [
            ServiceEndpoint("file", FILE_SERVICE, file_channel, settings.file_service_http),
            ServiceEndpoint("image", IMAGE_SERVICE, image_channel, settings.image_service_http),
            ServiceEndpoint(
                "inference", INFERENCE_SERVICE, inference_channel, settings.inference_service_http
            ),
            ServiceEndpoint("queue", QUEUE_SERVICE, queue_channel, settings.queue_service_http),
        ]
        self.files = FileClient(file_channel)
        self.image_stub = image_processing_service_pb2_grpc.ImageProcessingServiceStub(image_channel)
        self.inference_stub = inference_service_pb2_grpc.InferenceServiceStub(inference_channel)
        # Predict and ProcessImage take requests the routes serialised themselves (image_input.py), so that
        # an inline image reaches the wire in one copy.
        self.predict = serialized_unary(
            inference_channel, f"/{INFERENCE_SERVICE}/Predict", inference_service_pb2.PredictResponse
        )
        self.process_image = serialized_unary(
            image_channel, f"/{IMAGE_SERVICE}/ProcessImage", image_processing_service_pb2.ProcessImageResponse
        )
        self.queue_stub = queue_service_pb2_grpc.QueueServiceStub(queue_channel)

    async def close(self) -> None:
        """Close every channel."""
        for endpoint in self.endpoints:
            await endpoint.channel.close(None)


async def rpc(call: Awaitable[T]) -> T:
    """Await a unary call, turning its failure into a :class:`~mesh.kit.errors.MeshError`."""
    with errors.rpc_errors():
        return await call
