"""Uploads waiting for a slot of those received at once are bounded: past MESH_MAX_WAITING_UPLOADS, an upload is
turned away at once, unread, with RESOURCE_EXHAUSTED and a retry delay, while the others are stored."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from prometheus_client import REGISTRY

from mesh.file.v1 import file_service_pb2 as pb
from mesh.file.v1 import file_service_pb2_grpc
from mesh.kit import errors
from mesh.kit.memory_budget import SHED_RETRY_SECONDS
from mesh.kit.settings import FileServiceAddress
from mesh.services.file.client import FileClient
from mesh.services.file.server import file_service
from mesh.services.file.settings import FileSettings
from tests.file import corpus
from tests.file.conftest import make_settings

pytestmark = pytest.mark.integration


def retry_delay(error: grpc.aio.AioRpcError) -> float | None:
    """The RetryInfo delay of a call's rich status, in seconds; None without one."""
    call: Any = error  # AioRpcError has what from_call reads (code, details, trailing metadata)
    status = rpc_status.from_call(call)
    assert status is not None, "the refusal carries no rich status"
    for detail in status.details:
        if detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            info = error_details_pb2.RetryInfo()
            detail.Unpack(info)
            return float(info.retry_delay.ToTimedelta().total_seconds())
    return None


async def waiting_uploads(count: int) -> None:
    """Return once ``count`` uploads wait for a slot (``mesh_file_uploads_waiting``)."""
    async with asyncio.timeout(10):
        while REGISTRY.get_sample_value("mesh_file_uploads_waiting") != count:
            await asyncio.sleep(0.02)


async def test_an_upload_past_the_waiting_limit_is_refused_unread_and_the_others_are_stored(
    database_url: str, tmp_path: Path
) -> None:
    """With one upload received at once and one waiting (MESH_MAX_WAITING_UPLOADS 1), a third is answered
    RESOURCE_EXHAUSTED with RetryInfo while its stream is still open (nothing of it read); the first two are
    stored once the held one ends. Waiting uploads were unbounded: each cost the service memory, and a burst of
    them took it past its limit."""
    settings = make_settings(database_url, tmp_path, max_concurrent_uploads=1, max_waiting_uploads=1)
    release = asyncio.Event()
    never = asyncio.Event()
    files = [corpus.noise_png(40, 30, seed=uuid.uuid4().int % 2**32) for _ in range(2)]

    async def stream(index: int, hold: asyncio.Event | None) -> AsyncIterator[pb.UploadImageRequest]:
        yield pb.UploadImageRequest(metadata=pb.UploadMetadata(filename=f"upload-{index}.png"))
        if hold is not None:
            await hold.wait()
        yield pb.UploadImageRequest(chunk=files[index] if index < len(files) else b"\x89PNG")
        yield pb.UploadImageRequest(end=pb.UploadEnd())

    async with file_service(settings) as runtime:
        served = asyncio.create_task(runtime.run())
        await asyncio.wait_for(runtime.started.wait(), 30)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{runtime.grpc_port}") as channel:
            stub = file_service_pb2_grpc.FileServiceStub(channel)
            # Either of the two may take the slot; both are held, so it keeps it and the other waits (one that
            # was not held could end, and hand the slot on, leaving none waiting when the third arrives).
            first = asyncio.ensure_future(stub.UploadImage(stream(0, release), timeout=30))
            second = asyncio.ensure_future(stub.UploadImage(stream(1, release), timeout=30))
            await waiting_uploads(1)
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                # Its stream never ends: only a refusal before reading it answers within the timeout.
                await asyncio.wait_for(stub.UploadImage(stream(2, never), timeout=30), 5)
            assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "busy" in (refused.value.details() or "")
            assert "retry" in (refused.value.details() or "")
            assert retry_delay(refused.value) == SHED_RETRY_SECONDS
            release.set()
            stored = await asyncio.wait_for(asyncio.gather(first, second), 20)
            assert [response.image.filename for response in stored] == ["upload-0.png", "upload-1.png"]
            for response, data in zip(stored, files, strict=True):
                assert response.image.size_bytes == len(data)
                got = await stub.GetImage(pb.GetImageRequest(image_id=response.image.id), timeout=10)
                assert got.image.sha256 == response.image.sha256
        runtime.stopping.set()
        await asyncio.wait_for(served, 15)


def test_the_waiting_limit_is_read_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """MESH_MAX_WAITING_UPLOADS sets the bound (0: none may wait); 256 by default; a negative one is refused."""
    monkeypatch.delenv("MESH_MAX_WAITING_UPLOADS", raising=False)
    assert FileSettings().max_waiting_uploads == 256
    monkeypatch.setenv("MESH_MAX_WAITING_UPLOADS", "0")
    assert FileSettings().max_waiting_uploads == 0
    monkeypatch.setenv("MESH_MAX_WAITING_UPLOADS", "-1")
    with pytest.raises(ValueError, match="max_waiting_uploads"):
        FileSettings()


async def test_a_busy_refusal_reaches_the_file_client_as_one_to_retry_even_while_it_is_still_sending(
    database_url: str, tmp_path: Path
) -> None:
    """An upload refused while its client is still writing (8 MiB in 1 MiB chunks, none allowed to wait) is
    reported to FileClient's caller as RESOURCE_EXHAUSTED or UNAVAILABLE with a retry delay, never INTERNAL:
    grpcio's asyncio client lets the failed write overwrite the server's early answer with 'Internal error from
    Core' (grpc/grpc#36066), which the gateway answered as a 500."""
    settings = make_settings(database_url, tmp_path, max_concurrent_uploads=1, max_waiting_uploads=0)
    release = asyncio.Event()
    big = corpus.noise_png(1700, 1700, seed=uuid.uuid4().int % 2**32)  # about 8 MiB

    async def held() -> AsyncIterator[bytes]:
        await release.wait()
        yield corpus.noise_png(40, 30, seed=uuid.uuid4().int % 2**32)

    async with file_service(settings) as runtime:
        served = asyncio.create_task(runtime.run())
        await asyncio.wait_for(runtime.started.wait(), 30)
        client = FileClient.connect(FileServiceAddress(file_service_address=f"127.0.0.1:{runtime.grpc_port}"))
        try:
            holder = asyncio.ensure_future(client.upload(held(), filename="held.png", timeout=30))
            async with asyncio.timeout(10):
                while REGISTRY.get_sample_value("mesh_file_uploads_receiving") != 1:
                    await asyncio.sleep(0.02)
            # Many at once, so that the service turns most of them away while their writes are under way.
            refusals = await asyncio.gather(
                *(client.upload(big, filename="big.png", timeout=30) for _ in range(12)),
                return_exceptions=True,
            )
            assert all(isinstance(refusal, errors.MeshError) for refusal in refusals), refusals
            codes = {refusal.code for refusal in refusals if isinstance(refusal, errors.MeshError)}
            assert codes <= {grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNAVAILABLE}, refusals
            assert all(
                refusal.retry_after_seconds for refusal in refusals if isinstance(refusal, errors.MeshError)
            )
            release.set()
            assert (await asyncio.wait_for(holder, 20)).image.filename == "held.png"
        finally:
            await client.close()
            runtime.stopping.set()
            await asyncio.wait_for(served, 15)
