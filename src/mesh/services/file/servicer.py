"""The gRPC face of the file service: protobuf in and out, everything else in :mod:`store`."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any, Final

import grpc
from prometheus_client import Gauge
from typing_extensions import override

from mesh.common.v1 import image_pb2
from mesh.file.v1 import file_service_pb2 as pb
from mesh.file.v1 import file_service_pb2_grpc
from mesh.kit import errors
from mesh.kit.memory_budget import SHED_RETRY_SECONDS
from mesh.services.file.models import ImageRecord
from mesh.services.file.store import ImageStore, UploadRequest, Variant
from mesh.services.file.validation import UploadSizeGuard, too_large

# "At most 4 MiB" per message including its framing, so a client with gRPC's default 4 MiB receive limit
# can take the largest chunk.
MAX_CHUNK_BYTES: Final = 4 * 1024 * 1024 - 1024
MIN_CHUNK_BYTES: Final = 1024
# How much of a refused upload is still read (and dropped) so that the client hears why; see _drain.
DRAIN_BYTES: Final = 16 * 1024 * 1024

UPLOADS_RECEIVING = Gauge(
    "mesh_file_uploads_receiving", "Streamed uploads being received (at most MESH_MAX_CONCURRENT_UPLOADS)."
)
UPLOADS_WAITING = Gauge(
    "mesh_file_uploads_waiting",
    "Streamed uploads waiting, unread, for one of the slots of those received at once.",
)

_FORMATS: Final = {
    "PNG": image_pb2.IMAGE_FORMAT_PNG,
    "JPEG": image_pb2.IMAGE_FORMAT_JPEG,
    "WEBP": image_pb2.IMAGE_FORMAT_WEBP,
}

Context = grpc.aio.ServicerContext[Any, Any]


def image_to_proto(record: ImageRecord) -> pb.Image:
    """The protobuf view of a stored image."""
    image = pb.Image(
        id=str(record.id),
        filename=record.filename,
        content_type=record.content_type,
        format=_FORMATS.get(record.format, image_pb2.IMAGE_FORMAT_UNSPECIFIED),
        width=record.width,
        height=record.height,
        channels=record.channels,
        bit_depth=record.bit_depth,
        size_bytes=record.size_bytes,
        sha256=record.sha256,
        has_thumbnail=record.has_thumbnail,
        labels=record.labels,
    )
    image.create_time.FromDatetime(record.created_at)
    return image


def _upload_request(metadata: pb.UploadMetadata) -> UploadRequest:
    return UploadRequest(
        filename=metadata.filename,
        content_type=metadata.content_type,
        sha256=metadata.sha256,
        labels=dict(metadata.labels),
        idempotency_key=metadata.idempotency_key,
    )


async def _drain(request_iterator: AsyncIterator[pb.UploadImageRequest], limit: int) -> None:
    """Read and drop up to ``limit`` more bytes of a refused upload before answering.

    grpcio's asyncio client can report a server's early answer as ``INTERNAL: Internal error from Core``
    when the answer arrives while it is still writing (grpc/grpc#36066). Reading a moderately oversized
    upload to its end lets such a client see RESOURCE_EXHAUSTED; a much larger or endless one is still cut
    off after ``limit`` bytes.
    """
    drained = 0
    async for part in request_iterator:
        drained += len(part.chunk)
        if drained > limit:
            return


def chunk_size(requested: int, default: int) -> int:
    """The download chunk size: the default when unset, otherwise within 1 KiB and just under 4 MiB."""
    if requested == 0:
        return default
    return max(MIN_CHUNK_BYTES, min(requested, MAX_CHUNK_BYTES))


class FileServicer(file_service_pb2_grpc.FileServiceServicer):
    """Implements ``mesh.file.v1.FileService`` on an :class:`ImageStore`."""

    def __init__(
        self,
        store: ImageStore,
        *,
        default_chunk_bytes: int = 1024 * 1024,
        max_concurrent_uploads: int = 8,
        max_waiting_uploads: int = 256,
    ) -> None:
        self.store = store
        self.default_chunk_bytes = default_chunk_bytes
        self.max_concurrent_uploads = max_concurrent_uploads
        self.max_waiting_uploads = max_waiting_uploads
        self._receiving = asyncio.Semaphore(max_concurrent_uploads)
        self.receiving = 0
        """Uploads holding a slot of ``_receiving``."""
        self.waiting = 0
        """Uploads waiting, unread, for a slot of ``_receiving``."""
        UPLOADS_RECEIVING.set_function(lambda: self.receiving)
        UPLOADS_WAITING.set_function(lambda: self.waiting)

    @override
    async def UploadImage(
        self, request_iterator: AsyncIterator[pb.UploadImageRequest], context: Context
    ) -> pb.UploadImageResponse:
        # Taken before the first message is read: a waiting upload's bytes stay with its client. Each waiting
        # stream still costs the service memory (its call, and what flow control lets its client send ahead),
        # so past ``max_waiting_uploads`` one is turned away at once, unread, to be retried.
        if self._receiving.locked():
            if self.waiting >= self.max_waiting_uploads:
                raise self._busy()
            self.waiting += 1
            try:
                await self._receiving.acquire()
            finally:
                self.waiting -= 1
        else:
            await self._receiving.acquire()
        self.receiving += 1
        try:
            return await self._receive_upload(request_iterator)
        finally:
            self.receiving -= 1
            self._receiving.release()

    def _busy(self) -> errors.ResourceExhausted:
        return errors.ResourceExhausted(
            f"the file service is busy: {self.max_concurrent_uploads} uploads are being received and "
            f"{self.waiting} more are waiting (at most {self.max_waiting_uploads}); nothing of this upload was "
            "read or stored, retry it shortly",
            retry_after_seconds=SHED_RETRY_SECONDS,
        )

    async def _receive_upload(
        self, request_iterator: AsyncIterator[pb.UploadImageRequest]
    ) -> pb.UploadImageResponse:
        metadata: pb.UploadMetadata | None = None
        guard = UploadSizeGuard(self.store.limits.max_bytes, field="chunk")
        chunks: list[bytes] = []
        ended = False
        async for part in request_iterator:
            kind = part.WhichOneof("part")
            if ended:
                raise errors.InvalidArgument(
                    f"a message ({kind or 'empty'}) came after `end`; `end` must be the last message of an upload",
                    field_violations=[errors.FieldViolation("end", "must be the last message")],
                )
            if metadata is None:
                if kind != "metadata":
                    raise errors.InvalidArgument(
                        "the first message of an upload stream must carry metadata (filename, content type); "
                        "send metadata first, then the chunks",
                        field_violations=[
                            errors.FieldViolation("metadata", "missing from the first message")
                        ],
                    )
                metadata = part.metadata
            elif kind == "metadata":
                raise errors.InvalidArgument(
                    "metadata was sent twice; only the first message of an upload may carry it",
                    field_violations=[errors.FieldViolation("metadata", "only allowed in the first message")],
                )
            elif kind == "chunk":
                # Counted as it arrives, so an oversized upload is refused without buffering it all.
                try:
                    guard.add(len(part.chunk))
                except errors.PayloadTooLarge:
                    await _drain(request_iterator, DRAIN_BYTES)
                    raise
                chunks.append(part.chunk)
            elif kind == "end":
                ended = True
            else:
                raise errors.InvalidArgument(
                    "an upload message carried nothing; after the metadata, each message is a chunk or `end`",
                    field_violations=[errors.FieldViolation("part", "a chunk or end")],
                )
        if metadata is None:
            raise errors.InvalidArgument(
                "the upload stream was empty; send a metadata message, then the file's bytes, then `end`",
                field_violations=[errors.FieldViolation("metadata", "missing")],
            )
        if not ended:
            # gRPC can end the stream of a client that cancelled as if it were complete; without `end`,
            # the bytes here may be a file cut short.
            raise errors.InvalidArgument(
                f"the upload stream stopped after {guard.received} bytes without its `end` message, so the file"
                " may be incomplete; nothing was stored. Send `end` after the last chunk",
                field_violations=[errors.FieldViolation("end", "missing after the last chunk")],
            )
        data = b"".join(chunks)
        del chunks  # held through the upload, the parts doubled the memory each upload takes
        result = await self.store.upload(data, _upload_request(metadata), field="chunk")
        return pb.UploadImageResponse(image=image_to_proto(result.image), deduplicated=result.deduplicated)

    @override
    async def CreateImage(self, request: pb.CreateImageRequest, context: Context) -> pb.CreateImageResponse:
        if len(request.data) > self.store.limits.max_bytes:
            raise too_large(len(request.data), self.store.limits.max_bytes, field="data")
        result = await self.store.upload(request.data, _upload_request(request.metadata), field="data")
        return pb.CreateImageResponse(image=image_to_proto(result.image), deduplicated=result.deduplicated)

    @override
    async def DownloadImage(
        self, request: pb.DownloadImageRequest, context: Context
    ) -> AsyncIterator[pb.DownloadImageResponse]:
        if request.variant not in pb.ImageVariant.values():
            # proto3 keeps a number no variant has; sending the original instead would hide the client's bug.
            raise errors.InvalidArgument(
                f"variant {request.variant} is not an image variant; send IMAGE_VARIANT_ORIGINAL (or none) or "
                "IMAGE_VARIANT_THUMBNAIL",
                field_violations=[errors.FieldViolation("variant", "not an image variant")],
            )
        variant: Variant = "thumbnail" if request.variant == pb.IMAGE_VARIANT_THUMBNAIL else "original"
        size = chunk_size(request.chunk_size, self.default_chunk_bytes)
        opened = await self.store.open(request.image_id, variant)
        try:
            yield pb.DownloadImageResponse(
                image=image_to_proto(opened.image), content_type=opened.content_type
            )
            while data := await asyncio.to_thread(opened.file.read, size):
                yield pb.DownloadImageResponse(chunk=data)
        finally:
            opened.file.close()

    @override
    async def GetImage(self, request: pb.GetImageRequest, context: Context) -> pb.GetImageResponse:
        return pb.GetImageResponse(image=image_to_proto(await self.store.get(request.image_id)))

    @override
    async def ListImages(self, request: pb.ListImagesRequest, context: Context) -> pb.ListImagesResponse:
        page = await self.store.list(request.page_size, request.page_token)
        return pb.ListImagesResponse(
            images=[image_to_proto(r) for r in page.images], next_page_token=page.next_page_token
        )

    @override
    async def DeleteImage(self, request: pb.DeleteImageRequest, context: Context) -> pb.DeleteImageResponse:
        return pb.DeleteImageResponse(blob_removed=await self.store.delete(request.image_id))
