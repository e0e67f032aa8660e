"""The gRPC adapter of ``mesh.image.v1.ImageProcessingService`` over the :class:`Processor`."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence
from typing import Any

import grpc

from mesh.image.v1 import image_processing_service_pb2 as pb
from mesh.image.v1 import image_processing_service_pb2_grpc as pb_grpc
from mesh.kit import errors
from mesh.kit.logging import get_logger
from mesh.services.image_processing.processor import Processor, filter_catalogue
from mesh.services.image_processing.registry import Step, steps_from_proto

log = get_logger(__name__)

SERVICE_NAME = "mesh.image.v1.ImageProcessingService"
_END = object()


class ImageProcessingServicer(pb_grpc.ImageProcessingServiceServicer):
    """ListFilters, ProcessImage and StreamProcess."""

    def __init__(self, processor: Processor, *, stream_queue_frames: int = 2) -> None:
        self._processor = processor
        self._queue_frames = stream_queue_frames

    async def ListFilters(  # noqa: N802 (gRPC method name)
        self, request: pb.ListFiltersRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.ListFiltersResponse:
        return filter_catalogue(self._processor.backend.device)

    async def ProcessImage(  # noqa: N802 (gRPC method name)
        self, request: pb.ProcessImageRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.ProcessImageResponse:
        steps = steps_from_proto(request.pipeline)
        return await self._processor.process(request.input, steps, request.output)

    async def StreamProcess(  # noqa: N802 (gRPC method name)
        self,
        request_iterator: AsyncIterator[pb.StreamProcessRequest],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> AsyncIterator[pb.StreamProcessResponse]:
        first = await anext(aiter(request_iterator), None)
        if first is None:
            return
        if first.WhichOneof("part") != "config":
            raise errors.InvalidArgument(
                "the first message of StreamProcess must be a config",
                field_violations=[errors.FieldViolation("config", "must come first")],
            )
        config = first.config
        steps = steps_from_proto(config.pipeline, "config.pipeline")
        self._processor.check_output(config.output, "config.output")
        # A small bounded read-ahead: the reader blocks when it is full, so gRPC flow control pushes back
        # on the client while frames are processed one at a time, in order.
        queue: asyncio.Queue[object] = asyncio.Queue(maxsize=self._queue_frames)

        failures: list[BaseException] = []

        async def read() -> None:
            try:
                async for message in request_iterator:
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
                assert isinstance(item, pb.StreamProcessRequest)
                yield await self._frame(item, steps, config.output)
        finally:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await reader
        if failures:
            log.warning("stream ended by a read failure", error=repr(failures[0]))

    async def _frame(
        self, message: pb.StreamProcessRequest, steps: Sequence[Step], output: pb.OutputSpec
    ) -> pb.StreamProcessResponse:
        if message.WhichOneof("part") != "frame":
            error = errors.InvalidArgument(
                "only the first message may be a config",
                field_violations=[errors.FieldViolation("config", "send frames after the first message")],
            )
            return pb.StreamProcessResponse(error=error.to_status())
        frame = message.frame
        response = pb.StreamProcessResponse(sequence=frame.sequence)
        try:
            # Filled in place: the frame's pixels are not copied into the response a second time.
            await self._processor.process(
                frame.image, steps, output, where="frame.image", into=response.result
            )
        except errors.MeshError as error:
            response.ClearField("result")
            response.error.CopyFrom(error.to_status())
        return response
