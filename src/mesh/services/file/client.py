"""A typed client of the file service for other services (workers, gateway, image and inference).

Errors come back as :class:`~mesh.kit.errors.MeshError` subclasses, never as raw ``AioRpcError``.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterable, AsyncIterator, Mapping
from typing import Any

import grpc

from mesh.file.v1 import file_service_pb2, file_service_pb2_grpc
from mesh.kit import errors
from mesh.kit.channels import open_channel
from mesh.kit.memory_budget import SHED_RETRY_SECONDS
from mesh.kit.settings import FileServiceAddress
from mesh.services.file.settings import SERVICE_NAME

UPLOAD_CHUNK_BYTES = 1024 * 1024


async def upload_messages(
    metadata: file_service_pb2.UploadMetadata, chunks: AsyncIterable[bytes]
) -> AsyncIterator[file_service_pb2.UploadImageRequest]:
    """An upload stream: ``metadata``, each chunk as it is (one over 1 MiB in 1 MiB pieces), then ``end``
    once ``chunks`` is exhausted, so the service never stores a stream whose source failed part way."""
    yield file_service_pb2.UploadImageRequest(metadata=metadata)
    async for chunk in chunks:
        # A slice of a whole bytes object is the object itself: no copy up to 1 MiB.
        for start in range(0, len(chunk), UPLOAD_CHUNK_BYTES):
            yield file_service_pb2.UploadImageRequest(chunk=chunk[start : start + UPLOAD_CHUNK_BYTES])
    yield file_service_pb2.UploadImageRequest(end=file_service_pb2.UploadEnd())


# What grpcio's asyncio client reports when the server answered a client stream before the client had sent it
# all: a write that fails after the stream closed overwrites the server's status (grpc/grpc#36066, open in
# grpcio 1.85). The file service answers an upload early only to refuse it (busy, too large, out of order),
# before storing anything, so the lost answer is reported as one that may be retried.
_LOST_ANSWER_DETAILS = "Internal error from Core"


def _ended_early() -> errors.Unavailable:
    return errors.Unavailable(
        "the file service ended the upload before it was sent whole, most likely because it was busy with "
        "other uploads (gRPC lost its answer); nothing was stored, retry shortly",
        retry_after_seconds=SHED_RETRY_SECONDS,
    )


def _answer_lost(error: grpc.RpcError) -> bool:
    call: Any = error  # AioRpcError has code() and details()
    return bool(call.code() == grpc.StatusCode.INTERNAL and call.details() == _LOST_ANSWER_DETAILS)


DownloadCall = grpc.aio.UnaryStreamCall[
    file_service_pb2.DownloadImageRequest, file_service_pb2.DownloadImageResponse
]


class ImageDownload:
    """A download under way: the image's metadata and the content type of its bytes (the stream's first
    message), then the bytes from :meth:`chunks`. Its call is cancelled once :meth:`chunks` stops, or by
    :meth:`cancel` when the bytes are not wanted."""

    def __init__(self, call: DownloadCall, image: file_service_pb2.Image, content_type: str) -> None:
        self._call = call
        self.image = image
        self.content_type = content_type

    async def chunks(self) -> AsyncGenerator[bytes, None]:
        """The bytes, chunk by chunk as they arrive (none held back); a failure is a MeshError."""
        try:
            with errors.rpc_errors():
                # read(), as for the first message: gRPC refuses a call read both ways. It ends with EOF.
                while isinstance(part := await self._call.read(), file_service_pb2.DownloadImageResponse):
                    if part.chunk:
                        yield part.chunk
        finally:
            self._call.cancel()

    def cancel(self) -> None:
        """Stop the download (a no-op once it ended)."""
        self._call.cancel()


class FileClient:
    """Upload, download and look up images in the file service."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        self._channel = channel
        self._stub = file_service_pb2_grpc.FileServiceStub(channel)

    @classmethod
    def connect(cls, settings: FileServiceAddress) -> FileClient:
        """A client on a new channel to ``settings.file_service_address``."""
        channel = open_channel(
            settings.file_service_address,
            settings,
            service=SERVICE_NAME,
            streaming_methods=("UploadImage", "DownloadImage"),
        )
        return cls(channel)

    async def close(self) -> None:
        """Close the channel."""
        await self._channel.close(None)

    async def __aenter__(self) -> FileClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def upload(
        self,
        data: bytes | AsyncIterable[bytes],
        *,
        filename: str,
        content_type: str = "",
        labels: Mapping[str, str] | None = None,
        idempotency_key: str = "",
        sha256: str = "",
        timeout: float | None = None,
    ) -> file_service_pb2.UploadImageResponse:
        """Upload ``data``: the file's bytes, or its chunks passed on while they arrive (each as it is, one over
        1 MiB in 1 MiB pieces). When the chunks' source fails, the upload is cancelled, nothing is stored and
        the source's error is raised."""
        chunks = _one(data) if isinstance(data, bytes) else data
        metadata = _metadata(filename, content_type, labels, idempotency_key, sha256)
        failed: list[Exception] = []
        sent_whole: list[bool] = []

        async def parts() -> AsyncIterator[file_service_pb2.UploadImageRequest]:
            try:
                async for part in upload_messages(metadata, chunks):
                    yield part
            except Exception as exc:
                failed.append(exc)
                raise
            sent_whole.append(True)

        try:
            response: file_service_pb2.UploadImageResponse = await self._stub.UploadImage(
                parts(), timeout=timeout
            )
        except (asyncio.CancelledError, grpc.RpcError) as error:
            # gRPC cancels the call when the request iterator fails and reports only the cancellation:
            # the caller gets the iterator's own error (a client that went away, a body over the limit).
            if failed:
                raise failed[0] from None
            if isinstance(error, grpc.RpcError):
                if not sent_whole and _answer_lost(error):
                    raise _ended_early() from None
                raise errors.from_rpc_error(error) from None
            raise
        return response

    async def download_stream(
        self,
        image_id: str,
        *,
        variant: file_service_pb2.ImageVariant.ValueType = file_service_pb2.IMAGE_VARIANT_ORIGINAL,
        timeout: float | None = None,
        chunk_size: int = 0,
    ) -> ImageDownload:
        """Start a download: the image's metadata is read now (a missing image fails here), its bytes are
        passed on as they arrive by the returned download's :meth:`~ImageDownload.chunks`. ``timeout`` bounds
        the whole call, reading included."""
        call = self._stub.DownloadImage(
            file_service_pb2.DownloadImageRequest(image_id=image_id, variant=variant, chunk_size=chunk_size),
            timeout=timeout,
        )
        with errors.rpc_errors():
            first = await call.read()
        if not isinstance(first, file_service_pb2.DownloadImageResponse) or not first.HasField("image"):
            call.cancel()
            raise errors.Internal("the file service's download did not start with the image's metadata")
        return ImageDownload(call, first.image, first.content_type)

    async def download(
        self,
        image_id: str,
        *,
        variant: file_service_pb2.ImageVariant.ValueType = file_service_pb2.IMAGE_VARIANT_ORIGINAL,
        timeout: float | None = None,
        chunk_size: int = 0,
    ) -> tuple[file_service_pb2.Image, str, bytes]:
        """The image's metadata, the content type of the bytes, and the bytes, gathered."""
        download = await self.download_stream(
            image_id, variant=variant, timeout=timeout, chunk_size=chunk_size
        )
        data = b"".join([chunk async for chunk in download.chunks()])
        return download.image, download.content_type, data

    async def get(self, image_id: str, *, timeout: float | None = None) -> file_service_pb2.Image:
        """One image's metadata."""
        with errors.rpc_errors():
            response: file_service_pb2.GetImageResponse = await self._stub.GetImage(
                file_service_pb2.GetImageRequest(image_id=image_id), timeout=timeout
            )
        return response.image

    async def create(
        self,
        data: bytes,
        *,
        filename: str,
        content_type: str = "",
        labels: Mapping[str, str] | None = None,
        idempotency_key: str = "",
        sha256: str = "",
        timeout: float | None = None,
    ) -> file_service_pb2.CreateImageResponse:
        """Upload a small image in one unary call."""
        request = file_service_pb2.CreateImageRequest(
            metadata=_metadata(filename, content_type, labels, idempotency_key, sha256), data=data
        )
        with errors.rpc_errors():
            response: file_service_pb2.CreateImageResponse = await self._stub.CreateImage(
                request, timeout=timeout
            )
        return response

    async def list(
        self, *, page_size: int = 0, page_token: str = "", timeout: float | None = None
    ) -> file_service_pb2.ListImagesResponse:
        """One page of images, newest first; pass ``next_page_token`` back for the next."""
        with errors.rpc_errors():
            response: file_service_pb2.ListImagesResponse = await self._stub.ListImages(
                file_service_pb2.ListImagesRequest(page_size=page_size, page_token=page_token),
                timeout=timeout,
            )
        return response

    async def delete(self, image_id: str, *, timeout: float | None = None) -> bool:
        """Delete an image; True when its blob was removed (no other image used the same bytes)."""
        with errors.rpc_errors():
            response: file_service_pb2.DeleteImageResponse = await self._stub.DeleteImage(
                file_service_pb2.DeleteImageRequest(image_id=image_id), timeout=timeout
            )
        return response.blob_removed


def _metadata(
    filename: str, content_type: str, labels: Mapping[str, str] | None, idempotency_key: str, sha256: str
) -> file_service_pb2.UploadMetadata:
    """The metadata that opens an upload, streamed or unary."""
    return file_service_pb2.UploadMetadata(
        filename=filename,
        content_type=content_type,
        sha256=sha256,
        labels=dict(labels or {}),
        idempotency_key=idempotency_key,
    )


async def _one(data: bytes) -> AsyncIterator[bytes]:
    yield data
