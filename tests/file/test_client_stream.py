"""``FileClient.download_stream``: the image's metadata first, then its bytes chunk by chunk as the file service
sends them, with the file service's errors as MeshErrors; ``download`` gathers the same stream.

The file service here is a scripted one (no database): each image id names how its download goes.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest

from mesh.file.v1 import file_service_pb2 as pb
from mesh.file.v1 import file_service_pb2_grpc as pb_grpc
from mesh.kit import errors
from mesh.kit.settings import FileServiceAddress
from mesh.services.file.client import FileClient

IMAGE = pb.Image(id="img-1", filename="a.png", content_type="image/png", size_bytes=6)


class ScriptedDownloads(pb_grpc.FileServiceServicer):
    """DownloadImage by image id: ``held`` sends the metadata and one chunk, then waits for ``release``
    before the second; ``missing`` is NOT_FOUND; ``headless`` starts with a chunk; ``empty`` sends nothing;
    ``cut`` fails UNAVAILABLE after its first chunk. ``ended`` is set when a call's stream stops, whatever the
    reason."""

    def __init__(self) -> None:
        self.first_sent = asyncio.Event()
        self.release = asyncio.Event()
        self.ended = asyncio.Event()
        self.cancelled = False

    async def DownloadImage(  # noqa: N802 (gRPC method name)
        self, request: pb.DownloadImageRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[pb.DownloadImageResponse]:
        try:
            if request.image_id == "missing":
                await context.abort(grpc.StatusCode.NOT_FOUND, "image missing not found")
            if request.image_id == "headless":
                yield pb.DownloadImageResponse(chunk=b"abc")
                return
            if request.image_id == "empty":
                return
            yield pb.DownloadImageResponse(image=IMAGE, content_type="image/png")
            yield pb.DownloadImageResponse(chunk=b"abc")
            self.first_sent.set()
            if request.image_id == "cut":
                await context.abort(grpc.StatusCode.UNAVAILABLE, "the file service is stopping")
            await self.release.wait()
            yield pb.DownloadImageResponse(chunk=b"def")
        except asyncio.CancelledError:
            self.cancelled = True
            raise
        finally:
            self.ended.set()


@pytest.fixture
async def scripted() -> AsyncIterator[tuple[ScriptedDownloads, FileClient]]:
    """A scripted file service and a client of it on a kit channel."""
    # Only DownloadImage is called; the other methods stay abstract.
    downloads = ScriptedDownloads()  # type: ignore[abstract]
    server = grpc.aio.server()
    pb_grpc.add_FileServiceServicer_to_server(downloads, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    client = FileClient.connect(FileServiceAddress(file_service_address=f"127.0.0.1:{port}"))
    yield downloads, client
    downloads.release.set()
    await client.close()
    await server.stop(None)


async def test_chunks_arrive_in_order_as_they_are_sent_not_gathered(
    scripted: tuple[ScriptedDownloads, FileClient],
) -> None:
    """The metadata comes first, then the first chunk while the service still holds back the second: the
    bytes are passed on as they arrive, in order, not gathered until the stream ends."""
    downloads, client = scripted
    download = await client.download_stream("held")
    assert (download.image, download.content_type) == (IMAGE, "image/png")
    chunks = download.chunks()
    assert await asyncio.wait_for(anext(chunks), 10) == b"abc"
    assert not downloads.release.is_set()  # the second chunk is not sent yet
    downloads.release.set()
    assert [chunk async for chunk in chunks] == [b"def"]


async def test_a_missing_image_is_not_found_before_any_chunk(
    scripted: tuple[ScriptedDownloads, FileClient],
) -> None:
    """NOT_FOUND from the service is the mesh's NotFound, raised when the download starts."""
    _, client = scripted
    with pytest.raises(errors.NotFound, match="image missing not found"):
        await client.download_stream("missing")


@pytest.mark.parametrize("image_id", ["headless", "empty"])
async def test_a_stream_that_does_not_start_with_the_metadata_is_internal(
    scripted: tuple[ScriptedDownloads, FileClient], image_id: str
) -> None:
    """A stream whose first message is a chunk, or that has none, is INTERNAL saying so, for a gathered
    download too (which returned empty metadata with the bytes)."""
    _, client = scripted
    with pytest.raises(errors.Internal, match="did not start with the image's metadata"):
        await client.download(image_id)
    with pytest.raises(errors.Internal, match="did not start with the image's metadata"):
        await client.download_stream(image_id)


async def test_a_failure_after_the_first_chunk_is_a_mesh_error(
    scripted: tuple[ScriptedDownloads, FileClient],
) -> None:
    """A stream cut by the service part way raises its status as a MeshError, not a raw gRPC error."""
    _, client = scripted
    download = await client.download_stream("cut")
    received = []
    with pytest.raises(errors.Unavailable):
        async for chunk in download.chunks():
            received.append(chunk)
    assert received == [b"abc"]


async def test_leaving_the_chunks_early_cancels_the_call(
    scripted: tuple[ScriptedDownloads, FileClient],
) -> None:
    """A reader that stops after the first chunk (a client that went away) cancels the download at the file
    service, which would otherwise go on sending to nobody."""
    downloads, client = scripted
    download = await client.download_stream("held")
    chunks = download.chunks()
    assert await anext(chunks) == b"abc"
    await chunks.aclose()
    await asyncio.wait_for(downloads.ended.wait(), 10)
    assert downloads.cancelled


async def test_cancel_stops_a_download_whose_bytes_are_not_wanted(
    scripted: tuple[ScriptedDownloads, FileClient],
) -> None:
    """``cancel`` after the metadata (a 304) ends the call at the file service without reading the bytes."""
    downloads, client = scripted
    download = await client.download_stream("held")
    await asyncio.wait_for(downloads.first_sent.wait(), 10)
    download.cancel()
    await asyncio.wait_for(downloads.ended.wait(), 10)
    assert downloads.cancelled


async def test_download_gathers_the_stream(scripted: tuple[ScriptedDownloads, FileClient]) -> None:
    """``download`` is the same stream gathered: metadata, type, and every chunk joined."""
    downloads, client = scripted
    downloads.release.set()
    assert await client.download("held") == (IMAGE, "image/png", b"abcdef")
