"""``/v1/images``: multipart and raw uploads, 413/415/400, pagination passthrough, streamed content, delete."""

from __future__ import annotations

import asyncio
import hashlib
import io
import logging
import uuid
from collections.abc import AsyncIterator
from typing import Any

import grpc
import httpx
import numpy as np
import pytest
from PIL import Image

from mesh.file.v1 import file_service_pb2 as file_pb
from mesh.file.v1 import file_service_pb2_grpc as file_grpc
from mesh.services.file.settings import FileSettings
from mesh.services.gateway.settings import UPLOAD_FORM_HEADROOM_BYTES, GatewaySettings
from tests.gateway.fakes import FakeFileService, strip_png
from tests.gateway.harness import FakeMesh, GatewayFactory, build_gateway, close_gateway, serve_app
from tests.gateway.test_errors import assert_error_shape


def noisy_png(at_least: int) -> bytes:
    """A PNG of random pixels (incompressible) of at least ``at_least`` bytes."""
    side = int((at_least / 3) ** 0.5) + 8
    pixels = np.random.default_rng(3).integers(0, 256, (side, side, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG", compress_level=1)
    assert buffer.tell() >= at_least
    return buffer.getvalue()


async def test_multipart_upload_returns_201_with_metadata(client: httpx.AsyncClient) -> None:
    """A multipart upload in the field ``file`` gives 201, a Location and the image's metadata."""
    data = strip_png()
    response = await client.post("/v1/images", files={"file": ("strip.png", data, "image/png")})
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["sha256"] == hashlib.sha256(data).hexdigest()
    assert (body["width"], body["height"], body["format"]) == (320, 80, "PNG")
    assert body["filename"] == "strip.png"
    assert response.headers["location"] == f"/v1/images/{body['id']}"


async def test_multipart_upload_over_one_mib_arrives_whole(client: httpx.AsyncClient, mesh: FakeMesh) -> None:
    """A multipart part larger than Starlette's 1 MiB spool (kept in memory here) reaches the file service
    byte for byte."""
    data = noisy_png(1_300_000)
    response = await client.post("/v1/images", files={"file": ("big.png", data, "image/png")})
    assert response.status_code == 201, response.text
    assert response.json()["sha256"] == hashlib.sha256(data).hexdigest()
    assert mesh.fakes.files.images[response.json()["id"]].data == data


async def test_raw_upload_with_image_content_type(client: httpx.AsyncClient, mesh: FakeMesh) -> None:
    """A raw body with an image Content-Type is uploaded with that declared type and the given filename."""
    response = await client.post(
        "/v1/images?filename=raw.png",
        content=strip_png(64, 32),
        headers={"content-type": "image/png", "idempotency-key": "k-raw-1"},
    )
    assert response.status_code == 201, response.text
    assert response.json()["filename"] == "raw.png"
    sent = mesh.fakes.files.upload_metadata[-1]
    assert (sent.content_type, sent.idempotency_key) == ("image/png", "k-raw-1")


async def test_a_bad_idempotency_key_header_is_named_as_the_header(
    client: httpx.AsyncClient, mesh: FakeMesh
) -> None:
    """A control character or a key over 256 characters in ``Idempotency-Key`` is a 400 naming the header,
    before the body is read or sent on (the file service named it ``metadata.idempotency_key``)."""
    sent = len(mesh.fakes.files.upload_metadata)
    for key, words in (("a\tb", "holds the control character '\\t'"), ("k" * 257, "is 257 characters")):
        response = await client.post(
            "/v1/images",
            content=strip_png(64, 32),
            headers={"content-type": "image/png", "idempotency-key": key},
        )
        assert response.status_code == 400
        error = response.json()["error"]
        assert error["message"].startswith("the Idempotency-Key header ")
        assert words in error["message"]
        assert error["details"][1]["field_violations"][0]["field"] == "header.Idempotency-Key"
    assert len(mesh.fakes.files.upload_metadata) == sent


async def test_a_form_without_its_file_field_says_what_it_had(client: httpx.AsyncClient) -> None:
    """A form whose file is in another field names the fields it had; two files, or no boundary, say the form
    could not be read and what to send (Starlette's bare "Too many files. ..." before)."""
    png = strip_png(64, 32)
    wrong = await client.post("/v1/images", files={"image": ("a.png", png, "image/png")}, data={"note": "x"})
    assert wrong.status_code == 400
    assert wrong.json()["error"]["message"] == (
        "the multipart form has no file in the field `file`; it has `note` (text), `image` (a file)"
    )
    two = await client.post(
        "/v1/images", files=[("file", ("a.png", png, "image/png")), ("file", ("b.png", png, "image/png"))]
    )
    assert two.status_code == 400
    message = two.json()["error"]["message"]
    assert message.startswith("the multipart form could not be read (Too many files")
    assert message.endswith("send one file, in the field `file`")


async def test_same_bytes_again_are_deduplicated(client: httpx.AsyncClient) -> None:
    """Uploading the same bytes twice gives the same sha256 and says deduplicated the second time."""
    data = strip_png(100, 40)
    first = (await client.post("/v1/images", files={"file": ("a.png", data, "image/png")})).json()
    second = (await client.post("/v1/images", files={"file": ("b.png", data, "image/png")})).json()
    assert first["sha256"] == second["sha256"]
    assert second["deduplicated"] is True


async def test_octet_stream_part_is_sniffed_by_the_service(client: httpx.AsyncClient, mesh: FakeMesh) -> None:
    """A part declared application/octet-stream is passed on undeclared, so the service sniffs it."""
    response = await client.post(
        "/v1/images", files={"file": ("x.bin", strip_png(), "application/octet-stream")}
    )
    assert response.status_code == 201
    assert mesh.fakes.files.upload_metadata[-1].content_type == ""


def _jpeg() -> bytes:
    buffer = io.BytesIO()
    Image.open(io.BytesIO(strip_png(64, 32))).save(buffer, "JPEG")
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("declared", "passed_on"),
    [
        ("image/jpg", "image/jpeg"),
        ("image/pjpeg", "image/jpeg"),
        ("image/x-png", "image/png"),
        ("binary/octet-stream", ""),
        ("application/octet-stream", ""),
    ],
)
async def test_every_type_the_file_service_accepts_passes_raw_and_multipart(
    client: httpx.AsyncClient, mesh: FakeMesh, declared: str, passed_on: str
) -> None:
    """The declared types the file service normalises (aliases, and S3's ``binary/octet-stream`` for "detect
    it") are normalised the same way for a raw body and a form's part, not refused 415 by the gateway."""
    data = strip_png(64, 32) if passed_on in ("image/png", "") else _jpeg()
    raw = await client.post("/v1/images", content=data, headers={"content-type": declared})
    assert raw.status_code == 201, raw.text
    assert mesh.fakes.files.upload_metadata[-1].content_type == passed_on
    form = await client.post("/v1/images", files={"file": ("a", data, declared)})
    assert form.status_code == 201, form.text
    assert mesh.fakes.files.upload_metadata[-1].content_type == passed_on


async def test_a_raw_body_without_a_content_type_is_detected_by_the_service(
    client: httpx.AsyncClient, mesh: FakeMesh
) -> None:
    """A raw body with no Content-Type declares nothing, as ``application/octet-stream``: passed on undeclared
    and named ``upload`` (the file service adds the real type's extension)."""
    response = await client.post("/v1/images", content=strip_png(64, 32))
    assert response.status_code == 201, response.text
    sent = mesh.fakes.files.upload_metadata[-1]
    assert (sent.content_type, sent.filename) == ("", "upload")


async def test_unsupported_raw_content_type_is_415(client: httpx.AsyncClient) -> None:
    """A raw body that is not an accepted image type is 415 before anything is sent on."""
    response = await client.post("/v1/images", content=b"hello", headers={"content-type": "text/plain"})
    assert response.status_code == 415
    assert_error_shape(response.json(), "INVALID_ARGUMENT")


async def test_text_part_is_415(client: httpx.AsyncClient) -> None:
    """A multipart part declared text/plain is 415."""
    response = await client.post("/v1/images", files={"file": ("notes.txt", b"hello", "text/plain")})
    assert response.status_code == 415


async def test_text_file_named_png_is_415_from_the_service(client: httpx.AsyncClient) -> None:
    """A text file claiming to be PNG passes the gateway and is refused by the file service's sniffing: 415."""
    response = await client.post("/v1/images", files={"file": ("fake.png", b"just text", "image/png")})
    assert response.status_code == 415
    assert "PNG, JPEG or WebP" in response.json()["error"]["message"]


async def test_truncated_image_is_400(client: httpx.AsyncClient) -> None:
    """A truncated PNG is 400 with a message saying so."""
    response = await client.post("/v1/images", files={"file": ("cut.png", strip_png()[:60], "image/png")})
    assert response.status_code == 400
    assert "truncated" in response.json()["error"]["message"]


async def test_missing_file_field_is_400(client: httpx.AsyncClient) -> None:
    """A multipart form without ``file`` is 400 naming the field."""
    response = await client.post("/v1/images", files={"other": ("a.png", strip_png(), "image/png")})
    assert response.status_code == 400
    assert response.json()["error"]["details"][1]["field_violations"][0]["field"] == "file"


async def test_empty_body_is_400(client: httpx.AsyncClient) -> None:
    """An empty raw body is 400."""
    response = await client.post("/v1/images", content=b"", headers={"content-type": "image/png"})
    assert response.status_code == 400


async def test_too_large_by_content_length_is_413(make_client: GatewayFactory, mesh: FakeMesh) -> None:
    """A declared Content-Length over the limit is refused with 413 before the body is read."""
    client = await make_client(max_upload_bytes=1000)
    before = len(mesh.fakes.files.upload_metadata)
    response = await client.post(
        "/v1/images",
        content=b"\x89PNG" + b"0" * (1000 + UPLOAD_FORM_HEADROOM_BYTES),
        headers={"content-type": "image/png"},
    )
    assert response.status_code == 413
    assert_error_shape(response.json(), "RESOURCE_EXHAUSTED")
    assert len(mesh.fakes.files.upload_metadata) == before
    assert "traceparent" in response.headers


async def test_an_image_of_the_upload_limit_passes_the_gateway_in_a_multipart_form(
    make_client: GatewayFactory,
) -> None:
    """MESH_MAX_UPLOAD_BYTES means the image's size at the gateway as at the file service: an image of exactly
    that size is not refused for its form's boundaries and headers (the gateway's own default was 1 MiB larger
    than the file service's, and a value set for both refused such an image with 413)."""
    data = noisy_png(50_000)
    client = await make_client(max_upload_bytes=len(data))
    response = await client.post("/v1/images", files={"file": ("edge.png", data, "image/png")})
    assert response.status_code == 201, response.text
    assert response.json()["size_bytes"] == len(data)


def test_the_gateway_and_the_file_service_share_one_default_upload_limit() -> None:
    """One name, one default: the gateway's and the file service's MESH_MAX_UPLOAD_BYTES agree."""
    gateway = GatewaySettings.model_fields["max_upload_bytes"].default
    assert gateway == FileSettings.model_fields["max_upload_bytes"].default


async def test_too_large_streamed_body_is_413(make_client: GatewayFactory, mesh: FakeMesh) -> None:
    """A chunked body without Content-Length is counted as it arrives and refused past the limit."""
    client = await make_client(max_upload_bytes=10_000)
    # Named, so that what other tests' uploads do meanwhile on the shared fakes does not count.
    name = f"too-large-{uuid.uuid4().hex}.png"

    async def body() -> AsyncIterator[bytes]:
        for _ in range(10):
            yield b"x" * 10_000

    response = await client.post(
        f"/v1/images?filename={name}", content=body(), headers={"content-type": "image/png"}
    )
    assert response.status_code == 413
    await asyncio.sleep(0.2)  # time for a stream that was not cancelled to reach its end at the fake
    # The upload was already streaming to the file service when the limit was passed: it was cancelled.
    assert name not in [m.filename for m in mesh.fakes.files.upload_metadata]
    assert name not in [s.image.filename for s in mesh.fakes.files.images.values()]


async def test_raw_upload_is_streamed_on_byte_for_byte(client: httpx.AsyncClient, mesh: FakeMesh) -> None:
    """A raw body sent in pieces (chunked transfer) is passed to the file service as it arrives and stored
    whole."""
    data = noisy_png(300_000)

    async def body() -> AsyncIterator[bytes]:
        for start in range(0, len(data), 65_536):
            yield data[start : start + 65_536]

    response = await client.post("/v1/images", content=body(), headers={"content-type": "image/png"})
    assert response.status_code == 201, response.text
    assert response.json()["size_bytes"] == len(data)
    assert mesh.fakes.files.images[response.json()["id"]].data == data


async def test_pagination_passes_through(client: httpx.AsyncClient) -> None:
    """page_size and page_token go to the file service; next_page_token comes back and walks every image."""
    for i in range(3):
        await client.post("/v1/images", files={"file": (f"p{i}.png", strip_png(50 + i, 20), "image/png")})
    seen: list[str] = []
    token = ""
    pages = 0
    while True:
        response = await client.get("/v1/images", params={"page_size": 2, "page_token": token})
        assert response.status_code == 200
        page = response.json()
        assert len(page["images"]) <= 2
        seen.extend(i["id"] for i in page["images"])
        pages += 1
        token = page["next_page_token"]
        if not token:
            break
    assert pages >= 2
    assert len(seen) == len(set(seen)) >= 3


async def test_page_size_under_1_is_400_and_over_500_is_reduced_to_500(client: httpx.AsyncClient) -> None:
    """page_size 0 or less is a 400 naming page_size; over 500 (up to any integer) is reduced to 500, as the gRPC
    services do (AIP-158), so the listing answers (the fake file service refuses a size over 500)."""
    for size in (0, -1):
        response = await client.get("/v1/images", params={"page_size": size})
        assert response.status_code == 400
        assert "page_size" in response.json()["error"]["message"]
    for path in ("/v1/images", "/v1/jobs"):
        for size in (501, 10**30):
            response = await client.get(path, params={"page_size": size})
            assert response.status_code == 200, (path, size, response.text)


async def test_metadata_content_thumbnail_and_delete(client: httpx.AsyncClient) -> None:
    """Metadata, streamed original bytes with their type, a JPEG thumbnail; delete gives 204 then 404."""
    data = strip_png(400, 100)
    image = (await client.post("/v1/images", files={"file": ("s.png", data, "image/png")})).json()
    meta = await client.get(f"/v1/images/{image['id']}")
    assert meta.json()["sha256"] == image["sha256"]
    content = await client.get(f"/v1/images/{image['id']}/content")
    assert content.status_code == 200
    assert content.headers["content-type"] == "image/png"
    assert content.content == data
    thumb = await client.get(f"/v1/images/{image['id']}/content", params={"variant": "thumbnail"})
    assert thumb.status_code == 200
    assert thumb.content.startswith(b"\xff\xd8")
    deleted = await client.delete(f"/v1/images/{image['id']}")
    assert deleted.status_code == 204
    assert (await client.get(f"/v1/images/{image['id']}")).status_code == 404
    assert (await client.get(f"/v1/images/{image['id']}/content")).status_code == 404


async def test_content_with_a_matching_etag_is_304_without_a_body(client: httpx.AsyncClient) -> None:
    """If-None-Match holding the ETag (alone, in a list, weak, or *) is 304 with no body; another tag is 200."""
    image = (
        await client.post("/v1/images", files={"file": ("s.png", strip_png(64, 32), "image/png")})
    ).json()
    url = f"/v1/images/{image['id']}/content"
    etag = (await client.get(url)).headers["etag"]
    for held in (etag, f'"other", {etag}', f"W/{etag}", "*"):
        again = await client.get(url, headers={"If-None-Match": held})
        assert again.status_code == 304, held
        assert again.content == b""
        assert again.headers["etag"] == etag
    thumb = await client.get(url, params={"variant": "thumbnail"}, headers={"If-None-Match": etag})
    assert thumb.status_code == 200
    assert thumb.headers["etag"] != etag


async def test_head_of_the_content_gives_its_headers_without_the_bytes(client: httpx.AsyncClient) -> None:
    """``curl -I`` of an image's bytes: 200 with the download's type, length, ETag and filename, no body (405
    before); with the ETag in If-None-Match, 304."""
    data = strip_png(64, 32)
    image = (await client.post("/v1/images", files={"file": ("s.png", data, "image/png")})).json()
    url = f"/v1/images/{image['id']}/content"
    get, head = await client.get(url), await client.head(url)
    assert (head.status_code, head.content) == (200, b"")
    for name in ("content-type", "etag", "content-disposition"):
        assert head.headers[name] == get.headers[name], name
    assert head.headers.get("content-length") in (None, str(len(data)))
    assert (await client.head(url, headers={"If-None-Match": get.headers["etag"]})).status_code == 304


class _HeldDownloads(FakeFileService):
    """A file service whose download sends the metadata and a first chunk, then holds the second until
    ``release``; ``cancelled`` is set when the call is cancelled."""

    def __init__(self) -> None:
        super().__init__()
        self.release = asyncio.Event()
        self.cancelled = asyncio.Event()

    async def DownloadImage(  # noqa: N802 (the gRPC method's name)
        self, request: file_pb.DownloadImageRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[file_pb.DownloadImageResponse]:
        image = file_pb.Image(
            id=request.image_id, filename="held.png", content_type="image/png", size_bytes=12
        )
        try:
            yield file_pb.DownloadImageResponse(image=image, content_type="image/png")
            yield file_pb.DownloadImageResponse(chunk=b"first-")
            await self.release.wait()
            yield file_pb.DownloadImageResponse(chunk=b"second")
        except asyncio.CancelledError:
            self.cancelled.set()
            raise


async def test_content_is_passed_on_as_it_arrives_and_a_client_that_leaves_cancels_the_download(
    mesh: FakeMesh,
) -> None:
    """The route sends each chunk on as the file service sends it (the first reaches the client while the
    second is held back), with the image's length; a client that leaves then cancels the DownloadImage call."""
    files = _HeldDownloads()
    server = grpc.aio.server()
    file_grpc.add_FileServiceServicer_to_server(files, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    app, ctx = build_gateway(mesh.gateway_settings(file_service_address=f"127.0.0.1:{port}"))
    received = b""
    try:
        async with serve_app(app) as url, httpx.AsyncClient(base_url=url, timeout=10) as http:
            async with http.stream("GET", "/v1/images/img-1/content") as response:
                assert (response.status_code, response.headers["content-length"]) == (200, "12")
                async for chunk in response.aiter_raw():
                    received += chunk
                    if len(received) >= len(b"first-"):
                        break
            await asyncio.wait_for(files.cancelled.wait(), 10)
    finally:
        files.release.set()
        await close_gateway(ctx)
        await server.stop(None)
    assert received == b"first-"


async def test_content_of_a_file_service_that_is_down_is_503(make_client: GatewayFactory) -> None:
    """A file service that does not answer makes an image's bytes 503 UNAVAILABLE, as any other route."""
    client = await make_client(file_service_address="127.0.0.1:1")
    response = await client.get("/v1/images/img-1/content")
    assert response.status_code == 503
    assert_error_shape(response.json(), "UNAVAILABLE")


async def test_a_thumbnails_file_name_has_the_extension_of_its_type(client: httpx.AsyncClient) -> None:
    """A thumbnail is a JPEG (a PNG with alpha) whatever the original, so its download is named for its own type:
    ``photo.png``'s is ``photo.thumbnail.jpg`` (it was ``photo.png`` over JPEG bytes)."""
    buffer = io.BytesIO()
    Image.new("RGBA", (64, 32), (0, 0, 0, 0)).save(buffer, "PNG")
    for data, served, name in (
        (strip_png(64, 32), "image/jpeg", "photo.thumbnail.jpg"),
        (buffer.getvalue(), "image/png", "photo.thumbnail.png"),
    ):
        image = (await client.post("/v1/images", files={"file": ("photo.png", data, "image/png")})).json()
        thumb = await client.get(f"/v1/images/{image['id']}/content", params={"variant": "thumbnail"})
        assert thumb.headers["content-type"] == served
        assert thumb.headers["content-disposition"] == f'inline; filename="{name}"'


async def test_a_non_ascii_filename_is_kept_in_filename_star(client: httpx.AsyncClient) -> None:
    """Content-Disposition keeps an ASCII filename for every client and the real name as RFC 6266 filename*."""
    image = (
        await client.post("/v1/images", files={"file": ("Test ü.png", strip_png(64, 32), "image/png")})
    ).json()
    disposition = (await client.get(f"/v1/images/{image['id']}/content")).headers["content-disposition"]
    assert disposition == "inline; filename=\"Test _.png\"; filename*=UTF-8''Test%20%C3%BC.png"


async def test_a_client_that_leaves_mid_upload_is_a_499_and_no_error(
    mesh: FakeMesh, caplog: pytest.LogCaptureFixture
) -> None:
    """A client that closes its connection part way through a raw upload is recorded as 499, with no error
    logged (it was a 500 and an "unhandled error" with a stack), and nothing is stored."""
    app, ctx = build_gateway(mesh.gateway_settings())
    name = f"cut-{uuid.uuid4().hex}.png"
    data = noisy_png(200_000)
    try:
        with caplog.at_level(logging.INFO):
            async with serve_app(app) as url:
                host, port = url.removeprefix("http://").split(":")
                _reader, writer = await asyncio.open_connection(host, int(port))
                head = (
                    f"POST /v1/images?filename={name} HTTP/1.1\r\nHost: {host}\r\n"
                    f"Content-Type: image/png\r\nContent-Length: {len(data)}\r\n\r\n"
                )
                writer.write(head.encode() + data[: len(data) // 2])
                await writer.drain()
                await asyncio.sleep(0.2)
                writer.close()
                await writer.wait_closed()
                await asyncio.sleep(0.3)  # the access line is written as the request unwinds
    finally:
        await close_gateway(ctx)
    access = [r.msg for r in caplog.records if r.name == "mesh.services.gateway.access"]
    assert [(line["route"], line["status"]) for line in access if isinstance(line, dict)] == [
        ("/v1/images", 499)
    ]
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert name not in [s.image.filename for s in mesh.fakes.files.images.values()]
