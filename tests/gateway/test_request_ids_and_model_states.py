"""A prediction's ``X-Request-Id`` (taken, checked, passed to the model, returned on its answers), the
per-version readiness of ``/v1/models``, and a prediction's batch size (``request_ids``, ``routes/models``)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest

from mesh.services.gateway import convert
from mesh.services.gateway.request_ids import HEADER, MAX_REQUEST_ID_CHARS, METADATA_KEY
from mesh.services.inference.predictor import REQUEST_ID_KEY
from tests.gateway.fakes import strip_png
from tests.gateway.harness import FakeMesh, GatewayFactory

PREDICT = "/v1/models/strip-reader:predict"
RAW_PNG = {"content-type": "image/png"}


def _error_request_id(response: httpx.Response) -> str | None:
    """The request id an error body names in its ErrorInfo metadata."""
    [info] = [d for d in response.json()["error"]["details"] if d["type"] == "ErrorInfo"]
    value = info["metadata"].get(METADATA_KEY)
    return None if value is None else str(value)


async def test_the_clients_request_id_reaches_the_model_and_comes_back(
    client: httpx.AsyncClient, mesh: FakeMesh
) -> None:
    """A client's X-Request-Id is the prediction's request_id and comes back in the header and the body; the
    gateway made up an id of its own that only a 200's body showed."""
    response = await client.post(PREDICT, content=strip_png(), headers={**RAW_PNG, HEADER: "client-id-1"})
    assert response.status_code == 200, response.text
    assert response.headers[HEADER] == "client-id-1"
    assert response.json()["request_id"] == "client-id-1"
    sent = mesh.fakes.inference.last_request
    assert sent is not None
    assert sent.request_id == "client-id-1"


async def test_a_request_without_an_id_gets_one_in_the_header_and_the_body(
    client: httpx.AsyncClient, mesh: FakeMesh
) -> None:
    """Without X-Request-Id the gateway's own id goes to the model and comes back in the header too."""
    response = await client.post(PREDICT, content=strip_png(), headers=RAW_PNG)
    assert response.status_code == 200, response.text
    made_up = response.headers[HEADER]
    assert len(made_up) == 36
    assert response.json()["request_id"] == made_up
    sent = mesh.fakes.inference.last_request
    assert sent is not None
    assert sent.request_id == made_up


async def test_every_error_of_a_prediction_names_its_request_id(client: httpx.AsyncClient) -> None:
    """An error, whether the model's service (unknown model), the route (a bad body) or request validation (a
    bad query) refused it, carries the id in the X-Request-Id header and in its ErrorInfo metadata."""
    unknown = await client.post(
        "/v1/models/nope:predict", content=strip_png(), headers={**RAW_PNG, HEADER: "e-1"}
    )
    bad_body = await client.post(
        PREDICT, json={"image_id": "x", "precheck_only": "yes"}, headers={HEADER: "e-2"}
    )
    bad_query = await client.post(
        f"{PREDICT}?version={'9' * 101}", content=strip_png(), headers={**RAW_PNG, HEADER: "e-3"}
    )
    for response, status, request_id in (
        (unknown, 404, "e-1"),
        (bad_body, 400, "e-2"),
        (bad_query, 400, "e-3"),
    ):
        assert response.status_code == status, response.text
        assert response.headers[HEADER] == request_id
        assert _error_request_id(response) == request_id
    made_up = await client.post("/v1/models/nope:predict", content=strip_png(), headers=RAW_PNG)
    assert _error_request_id(made_up) == made_up.headers[HEADER]


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ("x" * (MAX_REQUEST_ID_CHARS + 1), f"at most {MAX_REQUEST_ID_CHARS}"),
        ("tab\there", "control character"),
        ("caf\u00e9", "outside ASCII"),
    ],
)
async def test_a_bad_request_id_is_400_naming_the_header(
    client: httpx.AsyncClient, mesh: FakeMesh, value: str, problem: str
) -> None:
    """An X-Request-Id longer than 128 characters, or not printable ASCII, is refused before the model runs, and
    the refusal names the header."""
    mesh.fakes.inference.last_request = None
    headers = [(b"content-type", b"image/png"), (HEADER.encode(), value.encode("latin-1"))]
    response = await client.post(PREDICT, content=strip_png(), headers=headers)
    assert response.status_code == 400, response.text
    [bad_request] = [d for d in response.json()["error"]["details"] if d["type"] == "BadRequest"]
    [violation] = bad_request["field_violations"]
    assert violation["field"] == f"header.{HEADER}"
    assert problem in violation["description"]
    assert mesh.fakes.inference.last_request is None
    assert (
        await client.post(PREDICT, content=strip_png(), headers={**RAW_PNG, HEADER: "x" * 128})
    ).is_success


async def test_the_safety_nets_500_names_the_request_id_in_its_body(
    client: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bug's 500 (SafetyNet) names the id in its ErrorInfo metadata as well as in the header; it had the
    header only."""

    def bug(_: object) -> object:
        raise RuntimeError("bug")

    monkeypatch.setattr(convert, "prediction", bug)
    response = await client.post(PREDICT, content=strip_png(), headers={**RAW_PNG, HEADER: "bug-1"})
    assert response.status_code == 500, response.text
    assert response.headers[HEADER] == "bug-1"
    assert _error_request_id(response) == "bug-1"


async def test_a_body_found_too_large_while_read_names_the_request_id(make_client: GatewayFactory) -> None:
    """A chunked body (no Content-Length) that grows past the limit is refused 413 naming the id in its
    ErrorInfo metadata as well as in the header; it had the header only."""
    client = await make_client(max_json_bytes=1024)

    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(4):
            yield b"\0" * 512

    response = await client.post(PREDICT, content=chunks(), headers={**RAW_PNG, HEADER: "big-2"})
    assert response.status_code == 413, response.text
    assert response.headers[HEADER] == "big-2"
    assert _error_request_id(response) == "big-2"


async def test_a_413_by_content_length_carries_no_request_id_as_documented(
    make_client: GatewayFactory,
) -> None:
    """A body refused by its Content-Length before the route runs carries no id (none was taken): the one
    answer besides the header's own 400 that the gateway's description, the parameter's and the error
    responses' header declare as without one."""
    client = await make_client(max_json_bytes=1024)
    response = await client.post(PREDICT, content=b"\0" * 2048, headers={**RAW_PNG, HEADER: "big-1"})
    assert response.status_code == 413, response.text
    assert HEADER not in response.headers
    assert _error_request_id(response) is None
    document = (await client.get("/openapi.json")).json()
    operation = document["paths"]["/v1/models/{name}:predict"]["post"]
    [parameter] = [p for p in operation["parameters"] if p["in"] == "header"]
    for said in (
        document["info"]["description"],
        parameter["description"],
        operation["responses"]["413"]["headers"][HEADER]["description"],
    ):
        assert "413 refused by Content-Length" in said.replace("\n", " "), said


async def test_several_request_ids_are_400_naming_the_header(
    client: httpx.AsyncClient, mesh: FakeMesh
) -> None:
    """X-Request-Id sent twice is refused 400 naming the header ("send one X-Request-Id"), before the model
    runs; the first was taken without a word."""
    mesh.fakes.inference.last_request = None
    headers = [(b"content-type", b"image/png"), (HEADER.encode(), b"first"), (HEADER.encode(), b"second")]
    response = await client.post(PREDICT, content=strip_png(), headers=headers)
    assert response.status_code == 400, response.text
    [bad_request] = [d for d in response.json()["error"]["details"] if d["type"] == "BadRequest"]
    [violation] = bad_request["field_violations"]
    assert violation["field"] == f"header.{HEADER}"
    assert f"send one {HEADER}" in violation["description"]
    assert mesh.fakes.inference.last_request is None


async def test_the_gateway_names_the_id_under_the_inference_services_key() -> None:
    """One key for the id in ErrorInfo, whichever side failed: the gateway's is the inference service's."""
    assert METADATA_KEY == REQUEST_ID_KEY


async def test_the_document_declares_the_request_id_header(client: httpx.AsyncClient) -> None:
    """:predict documents X-Request-Id as an optional header parameter and as a header of its 200 and of its
    error responses (only the 200 declared it)."""
    operation = (await client.get("/openapi.json")).json()["paths"]["/v1/models/{name}:predict"]["post"]
    [parameter] = [p for p in operation["parameters"] if p["in"] == "header"]
    assert (parameter["name"], parameter["required"]) == (HEADER, False)
    assert parameter["schema"]["maxLength"] == MAX_REQUEST_ID_CHARS
    assert HEADER in operation["responses"]["200"]["headers"]
    for status in ("400", "401", "404", "413", "429", "500", "503", "504"):
        assert HEADER in operation["responses"][status]["headers"], status
        assert operation["responses"][status]["content"]["application/json"]["schema"]["$ref"].endswith(
            "/ErrorResponse"
        )
    assert operation["responses"]["200"]["content"]["application/json"]["schema"]["$ref"].endswith(
        "/PredictionOut"
    )


async def test_a_models_detail_lists_every_versions_state_and_the_default(client: httpx.AsyncClient) -> None:
    """GET /v1/models/{name} says which version is the default and every version's state, a version that is not
    ready with why; it showed only the described version's readiness. The list shows the states too."""
    detail = (await client.get("/v1/models/strip-reader")).json()
    assert (detail["version"], detail["default_version"], detail["ready"]) == ("1", "1", True)
    assert detail["version_status"] == [
        {"version": "1", "ready": True, "state": "READY", "reason": "ready"},
        {
            "version": "2",
            "ready": False,
            "state": "UNAVAILABLE",
            "reason": "load failed: RuntimeError: weights are corrupt",
        },
    ]
    [listed] = (await client.get("/v1/models")).json()["models"]
    assert listed["version_status"] == detail["version_status"]


async def test_a_prediction_says_how_many_requests_shared_its_compute_time(client: httpx.AsyncClient) -> None:
    """compute_seconds is the batch's time: batch_size comes with it, so that a client can divide."""
    body = (await client.post(PREDICT, content=strip_png(), headers=RAW_PNG)).json()
    assert (body["batch_size"], body["compute_seconds"]) == (1, 0.002)
