"""The contract's status mapping and error body shape, end to end from a gRPC status to the HTTP response."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from mesh.services.image_processing.registry import MAX_PIPELINE_STEPS
from tests.gateway.fakes import strip_png
from tests.gateway.harness import FakeMesh, GatewayFactory, build_gateway, close_gateway, serve_app

EXPECTED_STATUS = {
    "INVALID_ARGUMENT": (400, "INVALID_ARGUMENT"),
    "UNAUTHENTICATED": (401, "UNAUTHENTICATED"),
    "PERMISSION_DENIED": (403, "PERMISSION_DENIED"),
    "NOT_FOUND": (404, "NOT_FOUND"),
    "ALREADY_EXISTS": (409, "ALREADY_EXISTS"),
    "ABORTED": (409, "ABORTED"),
    "FAILED_PRECONDITION": (409, "FAILED_PRECONDITION"),
    "RESOURCE_EXHAUSTED": (429, "RESOURCE_EXHAUSTED"),
    "PAYLOAD_TOO_LARGE": (413, "RESOURCE_EXHAUSTED"),
    "UNSUPPORTED_MEDIA_TYPE": (415, "INVALID_ARGUMENT"),
    "UNIMPLEMENTED": (501, "UNIMPLEMENTED"),
    "UNAVAILABLE": (503, "UNAVAILABLE"),
    "DEADLINE_EXCEEDED": (504, "DEADLINE_EXCEEDED"),
    "INTERNAL": (500, "INTERNAL"),
}


def assert_error_shape(body: object, code: str) -> dict[str, Any]:
    """The body is exactly ``{"error": {"code", "message", "details"}}`` with an ErrorInfo detail."""
    assert isinstance(body, dict)
    assert set(body) == {"error"}
    error = body["error"]
    assert set(error) == {"code", "message", "details"}
    assert error["code"] == code
    assert isinstance(error["message"], str)
    assert error["message"]
    assert any(d.get("type") == "ErrorInfo" for d in error["details"])
    return error  # type: ignore[no-any-return]


@pytest.mark.parametrize(("raised", "expected"), EXPECTED_STATUS.items())
async def test_grpc_status_maps_to_contract_http_status(
    client: httpx.AsyncClient, raised: str, expected: tuple[int, str]
) -> None:
    """Each gRPC status a service returns becomes the contract's HTTP status with the error body shape."""
    image = await client.post(
        "/v1/process", json={"image": "aGVsbG8=", "pipeline": [{"filter": f"raise:{raised}"}]}
    )
    status, code = expected
    assert image.status_code == status, image.text
    error = assert_error_shape(image.json(), code)
    assert "fake failure" in str(error["message"])
    violations = [d for d in error["details"] if d["type"] == "BadRequest"]
    assert violations
    assert violations[0]["field_violations"][0]["field"] == "pipeline"


async def test_resource_exhausted_with_retry_info_sets_retry_after(client: httpx.AsyncClient) -> None:
    """A 429 from a service carries Retry-After when the service sent RetryInfo (rate limit is per route)."""
    response = await client.post(
        "/v1/process", json={"image": "aGVsbG8=", "pipeline": [{"filter": "raise:RESOURCE_EXHAUSTED"}]}
    )
    assert response.status_code == 429
    # The fake sends no RetryInfo, so no Retry-After: the header only appears when there is a delay to state.
    assert "retry-after" not in response.headers


async def test_unknown_route_is_404_in_error_shape(client: httpx.AsyncClient) -> None:
    """An unknown path is 404 with the same JSON error shape, not Starlette's plain text; its message names the
    request and where the routes are listed."""
    response = await client.get("/v1/nothing-here")
    assert response.status_code == 404
    assert_error_shape(response.json(), "NOT_FOUND")
    error = response.json()["error"]
    assert error["message"] == (
        "no route GET /v1/nothing-here; the API's routes are listed at /docs and /openapi.json"
    )
    assert error["details"][0]["reason"] == "NO_SUCH_ROUTE"


async def test_wrong_method_is_405_in_error_shape(client: httpx.AsyncClient) -> None:
    """A known path with an unsupported method is 405 in the error shape, its message naming the methods the
    path allows, as the Allow header does."""
    response = await client.put("/v1/images")
    assert response.status_code == 405
    error = assert_error_shape(response.json(), "UNIMPLEMENTED")
    assert error["message"] == "PUT is not allowed on /v1/images; it allows GET, HEAD, POST"
    assert response.headers["allow"] == "GET, HEAD, POST"


async def test_head_answers_as_get_without_a_body(client: httpx.AsyncClient) -> None:
    """HEAD of any GET route has the GET's status and headers and no body (RFC 9110), where every one was 405;
    HEAD of a path without GET is 405 naming HEAD."""
    for path in ("/healthz", "/v1/images", "/openapi.json", "/"):
        get, head = await client.get(path), await client.head(path)
        assert (head.status_code, head.content) == (get.status_code, b""), path
        assert head.headers["content-type"] == get.headers["content-type"], path
        assert head.headers["content-length"] == get.headers["content-length"], path
    refused = await client.head("/v1/jobs/00000000-0000-0000-0000-000000000000:cancel")
    assert refused.status_code == 405
    assert refused.headers["allow"] == "POST"


async def test_head_over_real_http_keeps_the_connection_for_the_next_request(mesh: FakeMesh) -> None:
    """Served by uvicorn, a HEAD ends cleanly and the next request on the same keep-alive connection is
    answered: uvicorn framed the HEAD as the GET the route saw, waited for the Content-Length's worth of body,
    and reset the connection (the in-process transport cannot show it)."""
    app, ctx = build_gateway(mesh.gateway_settings())
    try:
        async with serve_app(app) as url, httpx.AsyncClient(base_url=url, timeout=10) as client:
            for path in ("/healthz", "/v1/images", "/openapi.json"):
                head = await client.head(path)
                assert (head.status_code, head.content) == (200, b""), path
                assert int(head.headers["content-length"]) > 0, path
                after = await client.get(path)
                assert after.status_code == 200, path
                assert len(after.content) == int(head.headers["content-length"]), path
    finally:
        await close_gateway(ctx)


async def test_validation_error_is_400_with_field_violations(client: httpx.AsyncClient) -> None:
    """FastAPI's 422 becomes 400 INVALID_ARGUMENT naming each bad field."""
    response = await client.post("/v1/jobs", json={"image_id": "x", "priority": 42, "typo": 1})
    assert response.status_code == 400
    error = assert_error_shape(response.json(), "INVALID_ARGUMENT")
    fields = {
        v["field"] for d in error["details"] if d["type"] == "BadRequest" for v in d["field_violations"]
    }
    assert {"priority", "typo"} <= fields


async def test_malformed_json_is_400(client: httpx.AsyncClient) -> None:
    """A body that is not JSON is a 400 naming the body and where the JSON breaks (it named a field "1", the
    character's offset), not a 500."""
    response = await client.post(
        "/v1/jobs", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert response.status_code == 400
    error = assert_error_shape(response.json(), "INVALID_ARGUMENT")
    assert error["message"].startswith("invalid request: body: is not valid JSON at character 1: ")


async def test_a_json_body_sent_as_another_type_is_415_saying_what_to_send(client: httpx.AsyncClient) -> None:
    """``POST /v1/jobs`` with a JSON text declared text/plain (or undeclared) is 415 "send application/json",
    as /v1/process answers; it was a 400 saying the input should be a valid dictionary."""
    for headers in ({"content-type": "text/plain"}, {}):
        response = await client.post("/v1/jobs", content=b'{"image_id": "x"}', headers=headers)
        assert response.status_code == 415
        error = assert_error_shape(response.json(), "INVALID_ARGUMENT")
        assert error["message"].endswith(": send application/json")


async def test_backend_down_is_503(make_client: GatewayFactory) -> None:
    """A service that does not answer gives 503 UNAVAILABLE (after the channel's retries)."""
    client = await make_client(image_service_address="127.0.0.1:1", rpc_timeout_seconds=6.0)
    response = await client.get("/v1/filters")
    assert response.status_code == 503
    assert_error_shape(response.json(), "UNAVAILABLE")


def violations_of(error: dict[str, Any]) -> list[dict[str, str]]:
    """The field violations of an error body's BadRequest detail."""
    return [v for d in error["details"] if d["type"] == "BadRequest" for v in d["field_violations"]]


async def test_too_many_parameters_are_a_quick_400_naming_the_field_and_the_limit(
    client: httpx.AsyncClient,
) -> None:
    """A step's ``params`` (and a prediction's ``parameters``) of more than 64 keys is one violation naming the
    field and the limit, found before any value is validated: 100 000 bad values in a 1 MB body were 400 000
    violations, a 36 MB answer after seconds of work (more keys than MAX_JSON_VALUES are refused before)."""
    many: dict[str, object] = {f"{i:x}": {} for i in range(15_000)}
    cases = {
        "/v1/jobs": (
            {"image_id": "x", "pipeline": [{"filter": "blur", "params": many}]},
            "pipeline.0.params",
        ),
        "/v1/process": (
            {"image_id": "x", "pipeline": [{"filter": "blur", "params": many}]},
            "pipeline.0.params",
        ),
        "/v1/models/strip-reader:predict": ({"image_id": "x", "parameters": many}, "parameters"),
    }
    for path, (body, field) in cases.items():
        content = json.dumps(body, separators=(",", ":")).encode()
        started = time.perf_counter()
        response = await client.post(path, content=content, headers={"content-type": "application/json"})
        assert time.perf_counter() - started < 5, path
        assert response.status_code == 400, path
        assert len(response.content) < 1000, path
        error = assert_error_shape(response.json(), "INVALID_ARGUMENT")
        assert violations_of(error) == [
            {"field": field, "description": "at most 64 parameters, got 15000"}
        ], path


async def test_a_body_of_thousands_of_bad_values_gets_a_bounded_400(client: httpx.AsyncClient) -> None:
    """2048 bad parameter values (the most steps a pipeline has, 32, of 64) give one violation each, not one per
    type a value may have, and the 400 lists 20 of them and counts the rest: a few KB, where it listed 8192."""
    step = {"filter": "blur", "params": {f"p{i}": {} for i in range(64)}}
    response = await client.post("/v1/jobs", json={"image_id": "x", "pipeline": [step] * MAX_PIPELINE_STEPS})
    assert response.status_code == 400
    assert len(response.content) < 4000
    violations = violations_of(assert_error_shape(response.json(), "INVALID_ARGUMENT"))
    assert len(violations) == 21
    assert violations[:2] == [
        {"field": "pipeline.0.params.p0", "description": "must be a boolean, a number or a string"},
        {"field": "pipeline.0.params.p1", "description": "must be a boolean, a number or a string"},
    ]
    assert violations[-1] == {"field": "body", "description": "and 2028 more problems left out here"}


async def test_a_violation_cuts_a_long_field_name(client: httpx.AsyncClient) -> None:
    """A parameter's name is the client's: one of 100 000 characters is cut in the 400, not echoed whole."""
    response = await client.post(
        "/v1/jobs", json={"image_id": "x", "pipeline": [{"filter": "blur", "params": {"k" * 100_000: {}}}]}
    )
    assert response.status_code == 400
    assert len(response.content) < 3000
    (violation,) = violations_of(response.json()["error"])
    assert violation["field"].startswith("pipeline.0.params.kkk")
    assert violation["field"].endswith("…")


MANY_VALUES = "holds more than 20000 values (object members and array items); no request needs that many"


@pytest.mark.parametrize("path", ["/v1/jobs", "/v1/process", "/v1/models/strip-reader:predict"])
async def test_a_json_body_of_more_values_than_any_request_needs_is_refused_unparsed(
    client: httpx.AsyncClient, path: str
) -> None:
    """A JSON body of 20 001 values is a 400 naming the limit, before it is parsed: pydantic builds every value
    (and an error per unknown key) first, and 36 MB of unknown keys cost 1.2 GB and 2.4 s of the event loop.
    A comma inside a string counts too, and so does one sent as part of a chunked body."""
    keys = b"{" + b",".join(b'"k%d":0' % i for i in range(20_001)) + b"}"
    in_strings = b'{"image_id":"' + b"," * 30_000 + b'"}'

    async def chunked() -> AsyncIterator[bytes]:
        for start in range(0, len(keys), 4096):
            yield keys[start : start + 4096]

    for body in (keys, in_strings, chunked()):
        response = await client.post(path, content=body, headers={"content-type": "application/json"})
        assert response.status_code == 400, response.text
        error = assert_error_shape(response.json(), "INVALID_ARGUMENT")
        assert violations_of(error) == [{"field": "body", "description": MANY_VALUES}]


async def test_a_json_body_of_as_many_values_as_allowed_is_parsed(client: httpx.AsyncClient) -> None:
    """At the limit (20 000 values) the body is parsed and judged on what it holds: unknown keys are named."""
    body = b"{" + b",".join(b'"k%d":0' % i for i in range(20_000)) + b"}"
    response = await client.post("/v1/jobs", content=body, headers={"content-type": "application/json"})
    assert response.status_code == 400
    violations = violations_of(assert_error_shape(response.json(), "INVALID_ARGUMENT"))
    assert violations[1] == {"field": "k0", "description": "Extra inputs are not permitted"}


async def test_commas_in_a_body_that_is_not_json_are_not_counted(client: httpx.AsyncClient) -> None:
    """A raw image sent to predict is bytes, whose commas (one byte in 256 of a compressed image) are not JSON
    values: a PNG followed by 30 000 of them is read."""
    response = await client.post(
        "/v1/models/strip-reader:predict",
        content=strip_png() + b"," * 30_000,
        headers={"content-type": "image/png"},
    )
    assert response.status_code == 200, response.text
