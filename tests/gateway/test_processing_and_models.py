"""``/v1/filters``, ``/v1/process`` and ``/v1/models`` (including the ``:predict`` colon route)."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import logging
from collections.abc import AsyncIterator

import httpx
import pytest
from PIL import Image

from mesh.common.v1 import image_pb2
from mesh.services.gateway import convert
from tests.gateway.fakes import strip_png
from tests.gateway.harness import FakeMesh, build_gateway, close_gateway, serve_app


async def test_filters_list_params_and_devices(client: httpx.AsyncClient) -> None:
    """Filters come with typed parameters (type, default, min, max, options) and devices."""
    body = (await client.get("/v1/filters")).json()
    assert body["device"] == "cpu"
    blur = next(f for f in body["filters"] if f["name"] == "gaussian_blur")
    sigma = next(p for p in blur["params"] if p["name"] == "sigma")
    assert (sigma["type"], sigma["default"], sigma["min"], sigma["max"]) == ("float", 1.0, 0.1, 10.0)
    border = next(p for p in blur["params"] if p["name"] == "border")
    assert (border["type"], border["options"], border["min"]) == ("enum", ["reflect", "constant"], None)
    gray = next(f for f in body["filters"] if f["name"] == "grayscale")
    assert gray["devices"] == ["cpu", "gpu"]


async def test_process_inline_image_returns_json_with_base64(
    client: httpx.AsyncClient, mesh: FakeMesh
) -> None:
    """An inline base64 image is processed; JSON carries the output as base64 with its size and type."""
    payload = {
        "image": base64.b64encode(strip_png()).decode(),
        "pipeline": [
            {"filter": "grayscale"},
            {"filter": "gaussian_blur", "params": {"sigma": 2, "border": "reflect"}},
        ],
        "output_format": "jpeg",
        "quality": 80,
    }
    response = await client.post("/v1/process", json=payload)
    assert response.status_code == 200, response.text
    body = response.json()
    assert (body["content_type"], body["width"], body["height"], body["channels"]) == (
        "image/jpeg",
        320,
        80,
        1,
    )
    assert [t["filter"] for t in body["timings"]] == ["grayscale", "gaussian_blur"]
    with Image.open(io.BytesIO(base64.b64decode(body["image"]))) as out:
        assert out.format == "JPEG"
    sent = mesh.fakes.image.last_request
    assert sent is not None
    assert sent.output.format == image_pb2.IMAGE_FORMAT_JPEG
    assert sent.output.quality == 80
    assert sent.pipeline[1].params["sigma"].int_value == 2
    assert sent.pipeline[1].params["border"].string_value == "reflect"


async def test_an_integer_beyond_int64_travels_as_a_number_not_a_500(
    client: httpx.AsyncClient, mesh: FakeMesh
) -> None:
    """A parameter integer that protobuf's int64 cannot hold reaches the service as a number, which judges it
    against the parameter's range; it was a 500 for /v1/process, /v1/jobs and :predict alike."""
    huge = 10**23
    processed = await client.post(
        "/v1/process",
        json={
            "image": base64.b64encode(strip_png()).decode(),
            "pipeline": [{"filter": "gaussian_blur", "params": {"sigma": huge, "ksize": -huge, "border": 5}}],
        },
    )
    assert processed.status_code == 200, processed.text
    sent = mesh.fakes.image.last_request
    assert sent is not None
    params = sent.pipeline[0].params
    assert (params["sigma"].number_value, params["ksize"].number_value) == (1e23, -1e23)
    assert params["border"].int_value == 5
    image = (await client.post("/v1/images", files={"file": ("s.png", strip_png(), "image/png")})).json()
    job = await client.post(
        "/v1/jobs",
        json={"image_id": image["id"], "pipeline": [{"filter": "resize", "params": {"width": huge}}]},
    )
    assert job.status_code == 202, job.text
    predicted = await client.post(
        "/v1/models/strip-reader:predict",
        json={"image": base64.b64encode(strip_png(200, 50)).decode(), "parameters": {"min_confidence": huge}},
    )
    assert predicted.status_code == 200, predicted.text
    predict = mesh.fakes.inference.last_request
    assert predict is not None
    assert predict.parameters["min_confidence"].number_value == 1e23


async def test_process_stored_image_returns_raw_bytes_for_image_accept(client: httpx.AsyncClient) -> None:
    """With ``Accept: image/png`` the body is the PNG itself, with size and device headers."""
    image = (await client.post("/v1/images", files={"file": ("p.png", strip_png(), "image/png")})).json()
    response = await client.post(
        "/v1/process",
        json={"image_id": image["id"], "pipeline": [{"filter": "grayscale"}]},
        headers={"accept": "image/png"},
    )
    assert response.status_code == 200
    assert response.headers["content-type"] == "image/png"
    assert response.content.startswith(b"\x89PNG")
    assert (response.headers["x-image-width"], response.headers["x-device"]) == ("320", "cpu")


@pytest.mark.parametrize(
    ("accept", "body_format", "answer"),
    [
        ("image/webp", None, "image/webp"),  # was PNG: the type asked for, when the body names none
        ("image/jpeg;q=0.5, image/webp", None, "image/webp"),
        ("image/*", "jpeg", "image/jpeg"),
        ("image/webp, image/png", "png", "image/png"),
        ("application/json, image/png", None, "application/json"),
        ("text/html", None, "application/json"),
        ("image/webp", "png", 406),  # contradicts output_format
        ("image/gif", None, 406),  # no image this route makes
    ],
)
async def test_process_answers_in_the_format_accept_asks_for(
    client: httpx.AsyncClient, mesh: FakeMesh, accept: str, body_format: str | None, answer: str | int
) -> None:
    """Accept picks JSON or image bytes and, for bytes, their format; a conflict with output_format, or only
    image types the mesh cannot make, is 406 in the error shape."""
    body: dict[str, object] = {"image": base64.b64encode(strip_png()).decode(), "pipeline": []}
    if body_format is not None:
        body["output_format"] = body_format
    response = await client.post("/v1/process", json=body, headers={"accept": accept})
    if answer == 406:
        assert response.status_code == 406, response.text
        assert "Accept asks for" in response.json()["error"]["message"]
        return
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == answer
    if answer != "application/json":
        sent = mesh.fakes.image.last_request
        assert sent is not None
        assert convert.CONTENT_TYPES[sent.output.format] == answer


async def test_process_input_rules(client: httpx.AsyncClient) -> None:
    """Neither or both of image_id and image is 400; invalid base64 is 400; an unknown filter is 400."""
    inline = base64.b64encode(strip_png()).decode()
    assert (await client.post("/v1/process", json={"pipeline": []})).status_code == 400
    both = await client.post("/v1/process", json={"image_id": "x", "image": inline})
    assert both.status_code == 400
    bad = await client.post("/v1/process", json={"image": "%%% not base64"})
    assert bad.status_code == 400
    assert bad.json()["error"]["details"][1]["field_violations"][0]["field"] == "image"
    unknown = await client.post(
        "/v1/process", json={"image": inline, "pipeline": [{"filter": "sharpen9000"}]}
    )
    assert unknown.status_code == 400
    assert "sharpen9000" in unknown.json()["error"]["message"]


async def test_process_body_is_json_only_and_takes_either_base64_alphabet(
    client: httpx.AsyncClient, mesh: FakeMesh
) -> None:
    """A non-JSON body is 415 naming what to send; standard and URL-safe base64 decode to the same image,
    which reaches the image service byte for byte."""
    png = strip_png()
    wrong = await client.post("/v1/process", content=b"{}", headers={"content-type": "text/plain"})
    assert wrong.status_code == 415
    assert "application/json" in wrong.json()["error"]["message"]
    for encode in (base64.b64encode, base64.urlsafe_b64encode):
        response = await client.post("/v1/process", json={"image": encode(png).decode()})
        assert response.status_code == 200, response.text
        assert mesh.fakes.image.last_request is not None
        assert mesh.fakes.image.last_request.input.encoded.data == png


async def test_process_request_body_is_documented(client: httpx.AsyncClient) -> None:
    """/v1/process documents its JSON body (parsed by the route itself) as ProcessIn, whose inline image
    is a base64 string."""
    document = (await client.get("/openapi.json")).json()
    body = document["paths"]["/v1/process"]["post"]["requestBody"]
    assert body["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/ProcessIn"}
    image = document["components"]["schemas"]["ProcessIn"]["properties"]["image"]
    assert (image["type"], image["contentEncoding"]) == ("string", "base64")


async def test_models_list_and_detail(client: httpx.AsyncClient) -> None:
    """Models with versions and readiness; one model's inputs, outputs and parameters; unknown is 404."""
    models = (await client.get("/v1/models")).json()["models"]
    assert [m["name"] for m in models] == ["strip-reader"]
    assert models[0]["ready"] is True
    detail = (await client.get("/v1/models/strip-reader")).json()
    assert detail["ready"] is True
    assert detail["inputs"][0]["shape"] == [-1, -1, 3]
    assert detail["parameters"] == {"min_confidence": 0.5}
    assert (await client.get("/v1/models/nope")).status_code == 404


async def test_predict_colon_route(client: httpx.AsyncClient) -> None:
    """POST /v1/models/{name}:predict runs the model on a stored or inline image; GET of it is not predict."""
    image = (await client.post("/v1/images", files={"file": ("p.png", strip_png(), "image/png")})).json()
    by_id = await client.post("/v1/models/strip-reader:predict", json={"image_id": image["id"]})
    assert by_id.status_code == 200, by_id.text
    reading = by_id.json()["strip_reading"]
    assert reading["verdict"] == "POSITIVE"
    assert reading["control_line"]["center_x"] > reading["test_line"]["center_x"]
    inline = await client.post(
        "/v1/models/strip-reader:predict", json={"image": base64.b64encode(strip_png(200, 50)).decode()}
    )
    assert inline.json()["strip_reading"]["window"]["length"] == 200
    assert (await client.post("/v1/models/other:predict", json={"image_id": image["id"]})).status_code == 404
    # The custom method's path is not a model's (the name holds no ':'): 405, allowing only POST.
    got = await client.get("/v1/models/strip-reader:predict")
    assert (got.status_code, got.headers["allow"]) == (405, "POST")


async def test_predict_takes_raw_image_bytes(client: httpx.AsyncClient, mesh: FakeMesh) -> None:
    """:predict also takes the raw image (no base64), with version from the query; other types are 415
    and a bad JSON body is still a 400 naming the field."""
    response = await client.post(
        "/v1/models/strip-reader:predict?precheck_only=true",
        content=strip_png(240, 60),
        headers={"content-type": "image/png"},
    )
    assert response.status_code == 200, response.text
    assert response.json()["strip_reading"]["window"]["length"] == 240
    text = await client.post(
        "/v1/models/strip-reader:predict", content=b"hi", headers={"content-type": "text/plain"}
    )
    assert text.status_code == 415
    bad = await client.post("/v1/models/strip-reader:predict", json={"image_id": "x", "precheck_only": "yes"})
    assert bad.status_code == 400
    assert "precheck_only" in bad.json()["error"]["message"]


@pytest.mark.parametrize("content_type", ["image/jpg", "IMAGE/PNG; q=1", "application/octet-stream", None])
async def test_predict_takes_a_raw_image_typed_as_uploads_are(
    client: httpx.AsyncClient, content_type: str | None
) -> None:
    """A raw predict body is typed as an upload is: an alias, or no type to have the service read the format
    from the bytes; it was 415 for anything but the three exact image types."""
    headers = {"content-type": content_type} if content_type else {}
    response = await client.post(
        "/v1/models/strip-reader:predict?precheck_only=true", content=strip_png(240, 60), headers=headers
    )
    assert response.status_code == 200, response.text


async def test_predict_forwards_a_chunked_raw_body_byte_for_byte(
    client: httpx.AsyncClient, mesh: FakeMesh
) -> None:
    """A raw image sent in pieces (chunked transfer) reaches the model as the same bytes, with the model,
    version, pre-check flag and a request id: the gateway splices the chunks into the serialised request."""
    png = strip_png(300, 80)
    pieces = [png[:7], png[7:1000], png[1000:]]

    async def body() -> AsyncIterator[bytes]:
        for piece in pieces:
            yield piece

    response = await client.post(
        "/v1/models/strip-reader:predict?version=1&precheck_only=true",
        content=body(),
        headers={"content-type": "image/png"},
    )
    assert response.status_code == 200, response.text
    sent = mesh.fakes.inference.last_request
    assert sent is not None
    assert sent.input.encoded.data == png
    assert (sent.model_name, sent.model_version, sent.precheck_only) == ("strip-reader", "1", True)
    assert sent.request_id


async def test_predict_forwards_an_inline_json_image_with_its_parameters(
    client: httpx.AsyncClient, mesh: FakeMesh
) -> None:
    """A base64 image in JSON reaches the model decoded, beside the parameters and version of the body."""
    png = strip_png(200, 50)
    response = await client.post(
        "/v1/models/strip-reader:predict",
        json={"image": base64.b64encode(png).decode(), "version": "1", "parameters": {"min_confidence": 0.7}},
    )
    assert response.status_code == 200, response.text
    sent = mesh.fakes.inference.last_request
    assert sent is not None
    assert sent.input.encoded.data == png
    assert sent.model_version == "1"
    assert sent.parameters["min_confidence"].number_value == 0.7


async def test_predict_takes_version_and_precheck_from_the_query_with_a_json_body_too(
    client: httpx.AsyncClient, mesh: FakeMesh
) -> None:
    """With a JSON body, ``?version=`` and ``?precheck_only=`` are honoured, not dropped; a version given in the
    query and another in the body is a 400 naming ``version``."""
    body = {"image": base64.b64encode(strip_png(200, 50)).decode()}
    response = await client.post("/v1/models/strip-reader:predict?version=1&precheck_only=true", json=body)
    assert response.status_code == 200, response.text
    sent = mesh.fakes.inference.last_request
    assert sent is not None
    assert (sent.model_version, sent.precheck_only) == ("1", True)
    agreeing = await client.post("/v1/models/strip-reader:predict?version=1", json={**body, "version": "1"})
    assert agreeing.status_code == 200, agreeing.text
    clash = await client.post("/v1/models/strip-reader:predict?version=2", json={**body, "version": "1"})
    assert clash.status_code == 400
    error = clash.json()["error"]
    assert "'2'" in error["message"]
    assert "'1'" in error["message"]
    violations = next(d for d in error["details"] if d["type"] == "BadRequest")["field_violations"]
    assert [v["field"] for v in violations] == ["version"]


async def test_predict_needs_exactly_one_image_source(client: httpx.AsyncClient) -> None:
    """Both an image id and inline bytes, or neither, is a 400 naming image_id; an empty raw body is a 400."""
    both = await client.post(
        "/v1/models/strip-reader:predict", json={"image_id": "abc", "image": base64.b64encode(b"x").decode()}
    )
    neither = await client.post("/v1/models/strip-reader:predict", json={})
    empty = await client.post(
        "/v1/models/strip-reader:predict", content=b"", headers={"content-type": "image/png"}
    )
    for response in (both, neither, empty):
        assert response.status_code == 400, response.text
    assert "image_id" in both.json()["error"]["message"]
    assert "image_id" in neither.json()["error"]["message"]
    assert "empty" in empty.json()["error"]["message"]


async def _post_then_leave(url: str, path: str, body: bytes, after: float) -> None:
    """Send a request over a raw connection and close it before any answer."""
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    writer.write(head.encode() + body)
    await writer.drain()
    await asyncio.sleep(after)
    assert not reader.at_eof()  # no answer yet: the work was still running
    writer.close()
    await writer.wait_closed()


async def test_a_client_that_leaves_cancels_the_work_and_is_logged_as_499(
    mesh: FakeMesh, caplog: pytest.LogCaptureFixture
) -> None:
    """A client that closes its connection while /v1/process runs cancels the gRPC call (the image service
    sees it cancelled) and is recorded as 499; the pipeline ran to its end and a 200 was logged for nobody."""
    app, ctx = build_gateway(mesh.gateway_settings())
    image_id = mesh.fakes.files.store(strip_png()).id
    body = json.dumps({"image_id": image_id, "pipeline": [{"filter": "sleep:5"}]}).encode()
    before = mesh.fakes.image.cancelled
    try:
        with caplog.at_level(logging.INFO, logger="mesh.services.gateway.access"):
            async with serve_app(app) as url:
                await _post_then_leave(url, "/v1/process", body, after=0.3)
                for _ in range(100):
                    if mesh.fakes.image.cancelled > before:
                        break
                    await asyncio.sleep(0.02)
                await asyncio.sleep(0.1)  # the access line is written as the request unwinds
    finally:
        await close_gateway(ctx)
    assert mesh.fakes.image.cancelled == before + 1
    lines = [r.msg for r in caplog.records if r.name == "mesh.services.gateway.access"]
    assert [(line["route"], line["status"]) for line in lines if isinstance(line, dict)] == [
        ("/v1/process", 499)
    ]
