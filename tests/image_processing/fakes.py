"""In-memory stand-ins for the file and inference services (ports, not mocks of PostgreSQL or RabbitMQ)."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from mesh.common.v1 import image_pb2
from mesh.file.v1 import file_service_pb2
from mesh.inference.v1 import inference_service_pb2
from mesh.kit import errors


@dataclass
class MemoryStore:
    """An ImageStore in a dict, honouring idempotency keys like the file service."""

    images: dict[str, tuple[bytes, dict[str, str]]] = field(default_factory=dict)
    by_key: dict[str, str] = field(default_factory=dict)
    uploads: int = 0
    timeouts: list[float | None] = field(default_factory=list)
    """The timeout of every call, in order."""

    def put(self, data: bytes) -> str:
        image_id = str(uuid.uuid4())
        self.images[image_id] = (data, {})
        return image_id

    async def download(
        self, image_id: str, *, timeout: float | None = None
    ) -> tuple[file_service_pb2.Image, str, bytes]:
        self.timeouts.append(timeout)
        if image_id not in self.images:
            raise errors.NotFound(f"image {image_id} not found")
        data, labels = self.images[image_id]
        return file_service_pb2.Image(id=image_id, labels=labels), "image/png", data

    async def upload(
        self,
        data: bytes,
        *,
        filename: str,
        content_type: str = "",
        labels: Mapping[str, str] | None = None,
        idempotency_key: str = "",
        timeout: float | None = None,
    ) -> file_service_pb2.UploadImageResponse:
        self.timeouts.append(timeout)
        if idempotency_key and idempotency_key in self.by_key:
            image_id = self.by_key[idempotency_key]
            if self.images[image_id][0] != data:
                raise errors.AlreadyExists(f"idempotency key {idempotency_key!r} names other bytes")
            return file_service_pb2.UploadImageResponse(
                image=file_service_pb2.Image(id=image_id), deduplicated=True
            )
        self.uploads += 1
        image_id = str(uuid.uuid4())
        self.images[image_id] = (data, dict(labels or {}))
        if idempotency_key:
            self.by_key[idempotency_key] = image_id
        return file_service_pb2.UploadImageResponse(
            image=file_service_pb2.Image(id=image_id, filename=filename)
        )


@dataclass
class RecordingPredictor:
    """A Predictor that records requests and answers or fails as told."""

    failure: errors.MeshError | None = None
    requests: list[inference_service_pb2.PredictRequest] = field(default_factory=list)

    async def predict(
        self, request: inference_service_pb2.PredictRequest
    ) -> inference_service_pb2.PredictResponse:
        self.requests.append(request)
        if self.failure is not None:
            raise self.failure
        return inference_service_pb2.PredictResponse(
            model_name=request.model_name, request_id=request.request_id, device=image_pb2.DEVICE_CPU
        )


@dataclass
class CallContext:
    """The part of a gRPC servicer context the image servicer uses, for calling its methods directly."""

    remaining: float | None = None
    callbacks: list[Callable[[Any], None]] = field(default_factory=list)

    def time_remaining(self) -> float | None:
        return self.remaining

    def add_done_callback(self, callback: Callable[[Any], None]) -> None:
        self.callbacks.append(callback)

    def finish(self) -> None:
        """The call is over: what gRPC does once the reply is sent."""
        for callback in self.callbacks:
            callback(self)
