"""One prediction, from request to response: shared by the gRPC servicer and the queue's job handler.

It resolves the model version, validates parameters, fetches and decodes the input (decoding runs in a
thread), hands the pixels to the version's batcher and writes the model's output into the response. It
records each request's outcome in the version's statistics. It knows protobuf messages but not gRPC.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable

from opentelemetry import trace

from mesh.common.v1 import image_pb2
from mesh.inference.v1 import inference_service_pb2 as pb
from mesh.kit.errors import FieldViolation, Internal, InvalidArgument, InvalidData, MeshError, Unavailable
from mesh.kit.jobs import JobInterrupted
from mesh.kit.logging import get_logger
from mesh.kit.tracing import tracer
from mesh.services.inference.images import ImageDecoder, ImageFetcher, Pixels
from mesh.services.inference.models import Operation
from mesh.services.inference.parameters import resolve_parameters
from mesh.services.inference.repository import ModelRepository, ModelVersion

log = get_logger(__name__)
_tracer = tracer(__name__)

# Called with the fraction done as each stage ("fetch", "model") starts: the job handler's progress beat
# (the signature of JobContext.progress).
StageHook = Callable[[float, str], Awaitable[None]]

DEVICES = {"cpu": image_pb2.DEVICE_CPU, "gpu": image_pb2.DEVICE_GPU}


def assign_request_id(request: pb.PredictRequest) -> str:
    """The request's id, generated (and set on the request) when the client sent none."""
    if not request.request_id:
        request.request_id = uuid.uuid4().hex
    return request.request_id


# A raw frame is copied (8-bit) or narrowed (16-bit) before a model sees it. Narrowing an 80 MB 16-bit frame on
# the event loop held every other call of the service for half a second; but the hop to a thread costs about
# 5 ms here (the GIL's switch interval, with gRPC's threads busy), more than copying a 1080p 8-bit frame (6 MB,
# ~1 ms). So small 8-bit frames are copied on the loop, the rest in a thread.
RAW_ON_LOOP_BYTES = 16 * 1024 * 1024


def _raw_bytes(raw: image_pb2.RawImage) -> int:
    """The frame's size by its header (reading ``raw.pixels`` itself would copy them)."""
    return int(raw.width) * int(raw.height) * max(1, int(raw.channels))


class Predictor:
    """Runs predictions against a model repository."""

    def __init__(
        self, repository: ModelRepository, decoder: ImageDecoder, fetcher: ImageFetcher | None = None
    ) -> None:
        self.repository = repository
        self._decoder = decoder
        self._fetcher = fetcher

    async def predict(
        self,
        request: pb.PredictRequest,
        *,
        deadline: float | None = None,
        on_stage: StageHook | None = None,
    ) -> pb.PredictResponse:
        """Answer ``request``; ``deadline`` is a ``time.monotonic()`` instant. Raises MeshError."""
        started = time.perf_counter()
        assign_request_id(request)
        if not request.model_name:
            raise InvalidArgument(
                "model_name is required", field_violations=[FieldViolation("model_name", "must not be empty")]
            )
        version = self.repository.get(request.model_name, request.model_version)
        version.stats.request_received()
        operation: Operation = "precheck" if request.precheck_only else "predict"
        attributes = {
            "mesh.model": version.name,
            "mesh.model_version": version.version,
            "mesh.operation": operation,
        }
        with _tracer.start_as_current_span("inference.predict", attributes=attributes) as span:
            try:
                response = await self._run(version, operation, request, deadline, on_stage)
            except MeshError as error:
                version.stats.request_failed(error.code.name)
                raise
            except (asyncio.CancelledError, JobInterrupted):
                # gRPC cancels the handler when the client's deadline passes, racing our own deadline check:
                # a cancellation at or after the deadline is counted as the deadline it is.
                expired = deadline is not None and time.monotonic() >= deadline
                version.stats.request_failed("DEADLINE_EXCEEDED" if expired else "CANCELLED")
                raise
            except Exception as exc:
                version.stats.request_failed("INTERNAL")
                log.exception("prediction crashed", model=version.name, version=version.version)
                raise Internal(f"model {version.name} failed; the server logged the cause") from exc
            span.set_attribute("mesh.queue_seconds", response.queue_seconds)
            span.set_attribute("mesh.compute_seconds", response.compute_seconds)
        version.stats.request_succeeded(operation, response.queue_seconds, time.perf_counter() - started)
        return response

    async def _run(
        self,
        version: ModelVersion,
        operation: Operation,
        request: pb.PredictRequest,
        deadline: float | None,
        on_stage: StageHook | None,
    ) -> pb.PredictResponse:
        model, scheduler = version.require_ready()
        if operation not in model.operations:
            raise InvalidArgument(
                f"model {version.name} has no fast pre-check",
                field_violations=[FieldViolation("precheck_only", "not supported by this model")],
            )
        parameters = resolve_parameters(version.config.parameters, request.parameters)
        if on_stage is not None:
            await on_stage(0.0, "fetch")
        image = await self._load(request.input)
        _check_size(image, model.min_image_size, version.name)
        if on_stage is not None:
            await on_stage(0.5, "model")
        result = await scheduler.submit((operation, parameters), image, deadline=deadline)
        trace.get_current_span().set_attribute("mesh.batch_size", result.batch_size)
        response = pb.PredictResponse(
            model_name=version.name,
            model_version=version.version,
            request_id=request.request_id,
            device=DEVICES[model.device],
            queue_seconds=result.queue_seconds,
            compute_seconds=result.compute_seconds,
        )
        model.fill_response(result.output, response)
        return response

    async def _load(self, source: image_pb2.ImageInput) -> Pixels:
        kind = source.WhichOneof("source")
        if kind == "raw":
            raw = source.raw
            if raw.pixel_type == image_pb2.PIXEL_TYPE_UINT16 or _raw_bytes(raw) > RAW_ON_LOOP_BYTES:
                return await asyncio.to_thread(self._decoder.decode_raw, raw)
            return self._decoder.decode_raw(raw)
        if kind == "encoded":
            return await asyncio.to_thread(
                self._decoder.decode_encoded, source.encoded.data, source.encoded.format
            )
        if kind == "image_id":
            if self._fetcher is None:
                raise Unavailable("this server cannot fetch images by id (no file service configured)")
            data = await self._fetcher.fetch(source.image_id)
            return await asyncio.to_thread(self._decoder.decode_encoded, data, field="input.image_id")
        raise InvalidArgument(
            "an input image is required: set one of input.image_id, input.encoded or input.raw",
            field_violations=[FieldViolation("input", "set image_id, encoded or raw")],
        )


def _check_size(image: Pixels, least: tuple[int, int], model: str) -> None:
    """Refuses an image smaller than ``model`` reads before it is queued: in a batch, its failure would fail
    the batch, whose other images would then be computed again one by one."""
    height, width = image.shape[:2]
    if width < least[0] or height < least[1]:
        raise InvalidData(
            f"the image is {width}x{height} pixels; model {model} reads images of at least "
            f"{least[0]}x{least[1]} pixels",
            field_violations=[FieldViolation("input", f"at least {least[0]}x{least[1]} pixels")],
        )
