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
from dataclasses import dataclass

from opentelemetry import trace

from mesh.common.v1 import image_pb2
from mesh.inference.v1 import inference_service_pb2 as pb
from mesh.kit.errors import (
    FieldViolation,
    Internal,
    InvalidArgument,
    InvalidData,
    MeshError,
    Unavailable,
)
from mesh.kit.image_bytes import check_declared_format
from mesh.kit.image_header import read_header
from mesh.kit.interceptors import cancelled_code
from mesh.kit.jobs import JobInterrupted
from mesh.kit.logging import get_logger
from mesh.kit.raw_pixels import CHANNELS
from mesh.kit.tracing import internal_span, tracer
from mesh.services.file.ids import parse_image_id
from mesh.services.inference.batching import BatchResult, NotQueued
from mesh.services.inference.images import ImageDecoder, ImageFetcher, Pixels
from mesh.services.inference.models import Operation
from mesh.services.inference.parameters import resolve_parameters
from mesh.services.inference.repository import PREDICT_FIELDS, ModelRepository, ModelVersion

log = get_logger(__name__)
_tracer = tracer(__name__)

# An image's size is read from this much of its start on the event loop: headers are a few kilobytes. Only one
# that is longer (or unreadable) is read whole, in a thread (a crafted 60 MB PNG header took 50 ms to parse).
HEADER_PREFIX_BYTES = 64 * 1024

# Called with the fraction done as each stage ("fetch", "model") starts: the job handler's progress beat
# (the signature of JobContext.progress).
StageHook = Callable[[float, str], Awaitable[None]]

DEVICES = {"cpu": image_pb2.DEVICE_CPU, "gpu": image_pb2.DEVICE_GPU}


REQUEST_ID_KEY = "request_id"
"""The ErrorInfo metadata key under which a failed prediction names its request, in a unary Predict's status and
in a stream item's alike (the stream's response also has it in ``request_id``)."""


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
        """Answer ``request``; ``deadline`` is a ``time.monotonic()`` instant. Raises MeshError, whose ErrorInfo
        metadata names the request (``REQUEST_ID_KEY``: its id, or the one given to it here)."""
        request_id = assign_request_id(request)
        try:
            return await self._predict(request, deadline, on_stage)
        except MeshError as error:
            error.metadata[REQUEST_ID_KEY] = request_id
            raise

    async def _predict(
        self, request: pb.PredictRequest, deadline: float | None, on_stage: StageHook | None
    ) -> pb.PredictResponse:
        started = time.perf_counter()
        arrived = time.monotonic()
        version = self.repository.get(request.model_name, request.model_version, fields=PREDICT_FIELDS)
        version.stats.request_received()
        operation: Operation = "precheck" if request.precheck_only else "predict"
        attributes = {
            "mesh.model": version.name,
            "mesh.model_version": version.version,
            "mesh.operation": operation,
        }
        with internal_span(_tracer, "inference.predict", attributes) as span:
            try:
                response = await self._run(version, operation, request, deadline, on_stage)
            except MeshError as error:
                version.stats.request_failed(error.code.name)
                raise
            except (asyncio.CancelledError, JobInterrupted):
                # gRPC cancels the handler when the client's deadline passes, racing our own deadline check:
                # a cancellation at (or just before) the deadline is counted as the deadline it is, by the rule
                # the call's own status follows (grpc_server_handled_total, the access log).
                version.stats.request_failed(cancelled_code(deadline, arrived, time.monotonic()).name)
                raise
            except Exception as exc:
                version.stats.request_failed("INTERNAL")
                log.exception("prediction crashed", model=version.name, version=version.version)
                raise Internal(f"model {version.name} failed; the server logged the cause") from exc
            span.set_attribute("mesh.queue_seconds", response.queue_seconds)
            span.set_attribute("mesh.compute_seconds", response.compute_seconds)
        version.stats.request_succeeded(operation, time.perf_counter() - started)
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
        source = await self._fetch(request.input, deadline)
        # Memory for the pixels is taken before decoding, from the header's size, and given back when the batch
        # that computed them is done.
        size = await self._decoded_size(source)
        hold = (
            None
            if size is None
            else await scheduler.memory.acquire(
                size[0], what=size[1], deadline=deadline, carried=source.carried
            )
        )
        try:
            image = await self._decode(source)
            if hold is None:  # not sized beforehand, yet decoded after all
                hold = await scheduler.memory.acquire(
                    image.nbytes,
                    what=f"{source.field} ({_shape(image)})",
                    deadline=deadline,
                    carried=image.nbytes,
                )
            _check_size(image, model.min_image_size, version.name)
            if on_stage is not None:
                await on_stage(0.5, "model")
            result = await _queued(
                version, scheduler.submit((operation, parameters), image, deadline=deadline, hold=hold)
            )
        finally:
            if hold is not None:
                hold.release()
        trace.get_current_span().set_attribute("mesh.batch_size", result.batch_size)
        response = pb.PredictResponse(
            model_name=version.name,
            model_version=version.version,
            request_id=request.request_id,
            device=DEVICES[model.device],
            queue_seconds=result.queue_seconds,
            compute_seconds=result.compute_seconds,
            batch_size=result.batch_size,
        )
        model.fill_response(result.output, response)
        return response

    async def _fetch(self, source: image_pb2.ImageInput, deadline: float | None) -> _Source:
        """The input's raw message or encoded bytes (fetched from the file service for an image id)."""
        kind = source.WhichOneof("source")
        if kind == "raw":
            return _Source("input.raw", raw=source.raw)
        if kind == "encoded":
            check_declared_format(source.encoded.format, source.encoded.data, "input.encoded")
            return _Source("input.encoded.data", data=source.encoded.data)
        if kind == "image_id":
            # Checked here, so that a malformed id is named as this request's field and never sent on.
            parse_image_id(source.image_id, "input.image_id")
            if self._fetcher is None:
                raise Unavailable("this server cannot fetch images by id (no file service configured)")
            return _Source("input.image_id", data=await self._fetcher.fetch(source.image_id, deadline))
        raise InvalidArgument(
            "an input image is required: set one of input.image_id, input.encoded or input.raw",
            field_violations=[FieldViolation("input", "set image_id, encoded or raw")],
        )

    async def _decoded_size(self, source: _Source) -> tuple[int, str] | None:
        """The bytes its pixels will take, and a description naming its size, from the raw message or the
        encoded header; None when the decoder will refuse it anyway (a header it cannot read, a shape that is
        not one, more pixels than its limit), so that it says why in its own words without waiting for memory."""
        if source.raw is not None:
            raw = source.raw
            if raw.channels not in CHANNELS:
                return None
            width, height, channels = int(raw.width), int(raw.height), int(raw.channels)
        else:
            header = _header(source.data[:HEADER_PREFIX_BYTES])
            if header is None and len(source.data) > HEADER_PREFIX_BYTES:
                header = await asyncio.to_thread(_header, source.data)
            if header is None:
                return None
            width, height, channels = header
        if width * height > self._decoder.max_pixels:
            return None
        return width * height * channels, f"{source.field} ({width}x{height}, {channels} channels)"

    async def _decode(self, source: _Source) -> Pixels:
        raw = source.raw
        if raw is not None:
            if raw.pixel_type == image_pb2.PIXEL_TYPE_UINT16 or _raw_bytes(raw) > RAW_ON_LOOP_BYTES:
                return await asyncio.to_thread(self._decoder.decode_raw, raw)
            return self._decoder.decode_raw(raw)
        return await asyncio.to_thread(self._decoder.decode_encoded, source.data, field=source.field)


async def _queued(version: ModelVersion, submitted: Awaitable[BatchResult[object]]) -> BatchResult[object]:
    """``submitted``'s result, its wait counted in ``version``'s queue time: until its batch started, or, where
    it got no output (expired, cancelled, failed), until then; a request the scheduler refused before queueing
    it (a full queue, a deadline already past, a scheduler shutting down) never waited there and is left out."""
    entered = time.monotonic()
    try:
        result = await submitted
    except NotQueued:
        raise
    except BaseException:
        version.stats.request_dequeued(time.monotonic() - entered)
        raise
    version.stats.request_dequeued(result.queue_seconds)
    return result


@dataclass(frozen=True)
class _Source:
    """An input before decoding: a raw message, or encoded bytes."""

    field: str
    """The request field it came from (for errors)."""

    raw: image_pb2.RawImage | None = None
    data: bytes = b""

    @property
    def carried(self) -> int:
        """Bytes it holds as received, while it waits for memory: the encoded file or the raw samples."""
        return len(self.data) if self.raw is None else len(self.raw.pixels)


# The decoder's pixels from Pillow's modes (see images._to_pixels): grey ones give one channel, RGB three; the rest
# (with alpha, or a palette that may have it) are counted as four, which is at most a third too many.
_GREY_MODES = frozenset({"1", "L", "I", "I;16", "I;16L", "I;16B"})


def _header(data: bytes) -> tuple[int, int, int] | None:
    """Width and height as the decoder turns the image (by its EXIF orientation), and the channels it will make,
    read from the header without decoding the pixels; None when it cannot be read."""
    header = read_header(data)
    if header is None:
        return None
    mode = header.mode
    return *header.shown_size, 1 if mode in _GREY_MODES else 3 if mode == "RGB" else 4


def _shape(image: Pixels) -> str:
    height, width = image.shape[:2]
    return f"{width}x{height}, {image.shape[2] if image.ndim == 3 else 1} channels"


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
