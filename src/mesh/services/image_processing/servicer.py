"""The gRPC adapter of ``mesh.image.v1.ImageProcessingService`` over the :class:`Processor`.

Raw pixels travel without copies (``mesh.kit.wire``): a request's raw input reaches the handler as a view
of the received bytes beside the parsed message (a :class:`~mesh.kit.wire.Parted` request), and a RAW reply's
pixels are appended to the serialised message (a :class:`~mesh.kit.wire.Spliced` reply). That is why
:func:`add_to_server` registers the methods with those (de)serializers, and why the servicer does not
subclass the generated base, whose method types promise plain messages.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any, TypeVar

import grpc

from mesh.image.v1 import image_processing_service_pb2 as pb
from mesh.kit import errors
from mesh.kit.deadlines import deadline_in
from mesh.kit.logging import get_logger
from mesh.kit.runtime import until_stopping
from mesh.kit.stream_items import item_error
from mesh.kit.wire import NestedBytesField, Parted, Spliced, serialize_reply
from mesh.services.image_processing.processor import (
    Delivered,
    Processor,
    filter_catalogue,
    nothing_to_release,
)
from mesh.services.image_processing.registry import Step, steps_from_proto
from mesh.services.image_processing.settings import SERVICE_NAME

log = get_logger(__name__)

_END = object()
M = TypeVar("M", pb.ProcessImageResponse, pb.StreamProcessResponse)
RAW_INPUT = NestedBytesField.of(pb.ProcessImageRequest, "input.raw.pixels")
FRAME_RAW_INPUT = NestedBytesField.of(pb.StreamProcessRequest, "frame.image.raw.pixels")
RAW_PIXELS = NestedBytesField.of(pb.ProcessImageResponse, "raw.pixels")
FRAME_RAW_PIXELS = NestedBytesField.of(pb.StreamProcessResponse, "result.raw.pixels")


def _reply(message: M, field: NestedBytesField[M], delivered: Delivered) -> M | Spliced[M]:
    return message if delivered.pixels is None else Spliced(message, field, delivered.pixels)


class ImageProcessingServicer:
    """ListFilters, ProcessImage and StreamProcess."""

    def __init__(
        self, processor: Processor, *, stream_queue_frames: int = 2, stopping: asyncio.Event | None = None
    ) -> None:
        self._processor = processor
        self._queue_frames = stream_queue_frames
        self._stopping = asyncio.Event() if stopping is None else stopping
        """Set when the service stops (``ServiceRuntime.stopping``): a stream then ends, UNAVAILABLE, once the
        frames it has read are answered."""

    async def ListFilters(  # noqa: N802 (gRPC method name)
        self, request: pb.ListFiltersRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.ListFiltersResponse:
        return filter_catalogue(self._processor.backend.device)

    async def ProcessImage(  # noqa: N802 (gRPC method name)
        self, request: Parted[pb.ProcessImageRequest], context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.ProcessImageResponse | Spliced[pb.ProcessImageResponse]:
        message = request.message
        steps = steps_from_proto(message.pipeline)
        delivered = await self._processor.process(
            message.input,
            steps,
            message.output,
            raw_pixels=request.data,
            deadline=deadline_in(context.time_remaining()),
        )
        if delivered.pixels is None:  # an encoded or stored reply holds a copy: the result can go
            delivered.release()
            return delivered.response
        # A RAW reply views the result's memory until gRPC serialises it, right after this returns: the
        # admission is given back then (a done callback of the call for it cost 0.5 ms a call).
        return Spliced(delivered.response, RAW_PIXELS, delivered.pixels, after=delivered.release)

    async def StreamProcess(  # noqa: N802 (gRPC method name)
        self,
        request_iterator: AsyncIterator[Parted[pb.StreamProcessRequest]],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> AsyncIterator[pb.StreamProcessResponse | Spliced[pb.StreamProcessResponse]]:
        requests = until_stopping(request_iterator, self._stopping)
        parted = await anext(requests, None)
        if parted is None:
            return
        first = parted.message
        if first.WhichOneof("part") != "config":
            raise errors.InvalidArgument(
                "the first message of StreamProcess must be a config",
                field_violations=[errors.FieldViolation("config", "must come first")],
            )
        config = first.config
        deadline = deadline_in(context.time_remaining())
        steps = steps_from_proto(config.pipeline, "config.pipeline")
        self._processor.check_output(config.output, "config.output")
        # A small bounded read-ahead: the reader blocks when it is full, so gRPC flow control pushes back
        # on the client while frames are processed one at a time, in order.
        queue: asyncio.Queue[object] = asyncio.Queue(maxsize=self._queue_frames)

        failures: list[BaseException] = []

        async def read() -> None:
            try:
                async for message in requests:
                    await queue.put(message)
            except asyncio.CancelledError:
                raise
            except Exception as error:
                failures.append(error)
            await queue.put(_END)

        reader = asyncio.create_task(read(), name="stream-reader")
        try:
            while True:
                item = await queue.get()
                if item is _END:
                    break
                assert isinstance(item, Parted)
                reply, release = await self._frame(item, steps, config.output, deadline)
                try:
                    yield reply
                finally:
                    # Resumed once gRPC has taken the reply: its admission can go to the next frame.
                    release()
        finally:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await reader
        if failures:
            failure = failures[0]
            # A MeshError is the service stopping (until_stopping's) or a frame that could not be parsed (the
            # interceptor's); anything else ends the call as the crash it is, unless the client went away.
            if isinstance(failure, errors.MeshError) or not context.cancelled():
                raise failure
            log.warning("stream ended by a read failure after the client went away", error=repr(failure))

    async def _frame(
        self,
        request: Parted[pb.StreamProcessRequest],
        steps: Sequence[Step],
        output: pb.OutputSpec,
        deadline: float | None,
    ) -> tuple[pb.StreamProcessResponse | Spliced[pb.StreamProcessResponse], Callable[[], None]]:
        """A frame's response, and what gives its admission back once the response is sent."""
        message = request.message
        part = message.WhichOneof("part")
        if part != "frame":
            said = "a second config" if part == "config" else "an empty message"
            error = errors.InvalidArgument(
                f"each message after the config must be a frame; this one is {said}",
                field_violations=[errors.FieldViolation(part or "frame", "send a frame")],
            )
            return pb.StreamProcessResponse(error=error.to_status()), nothing_to_release
        frame = message.frame
        response = pb.StreamProcessResponse(sequence=frame.sequence)
        try:
            # Filled in place: an encoded frame is not copied into the response a second time.
            delivered = await self._processor.process(
                frame.image,
                steps,
                output,
                where="frame.image",
                into=response.result,
                raw_pixels=request.data,
                output_where="config.output",
                deadline=deadline,
            )
        except Exception as error:
            response.ClearField("result")
            response.error.CopyFrom(item_error(error, log, "stream frame crashed", sequence=frame.sequence))
            return response, nothing_to_release
        return _reply(response, FRAME_RAW_PIXELS, delivered), delivered.release


def add_to_server(servicer: ImageProcessingServicer, server: grpc.aio.Server) -> None:
    """Register the service's methods as the generated ``add_..._to_server`` does, but with replies
    serialised by :func:`~mesh.kit.wire.serialize_reply`."""
    handlers = {
        "ListFilters": grpc.unary_unary_rpc_method_handler(
            servicer.ListFilters,
            request_deserializer=pb.ListFiltersRequest.FromString,
            response_serializer=pb.ListFiltersResponse.SerializeToString,
        ),
        "ProcessImage": grpc.unary_unary_rpc_method_handler(
            servicer.ProcessImage,
            request_deserializer=RAW_INPUT.parse,
            response_serializer=serialize_reply,
        ),
        "StreamProcess": grpc.stream_stream_rpc_method_handler(
            servicer.StreamProcess,
            request_deserializer=FRAME_RAW_INPUT.parse,
            response_serializer=serialize_reply,
        ),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    # As the generated code does: the registered-method fast path (grpc-stubs do not know it yet).
    server.add_registered_method_handlers(SERVICE_NAME, handlers)  # type: ignore[attr-defined]
