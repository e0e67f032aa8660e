"""The OpenAPI document: valid, complete against the contract's REST table, exact about errors and auth,
and a bounded schemathesis run against it (fake backends) that finds no server error."""

from __future__ import annotations

import asyncio
import shutil
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.gateway.harness import FakeMesh, GatewayFactory, build_gateway, close_gateway, serve_app
from tests.gateway.test_auth import MemoryKeys

CONTRACT_OPERATIONS = {
    ("get", "/healthz"),
    ("get", "/readyz"),
    ("get", "/v1/health"),
    ("post", "/v1/images"),
    ("get", "/v1/images"),
    ("get", "/v1/images/{image_id}"),
    ("get", "/v1/images/{image_id}/content"),
    ("delete", "/v1/images/{image_id}"),
    ("get", "/v1/filters"),
    ("post", "/v1/process"),
    ("get", "/v1/models"),
    ("get", "/v1/models/{name}"),
    ("post", "/v1/models/{name}:predict"),
    ("post", "/v1/jobs"),
    ("get", "/v1/jobs"),
    ("get", "/v1/jobs/{job_id}"),
    ("post", "/v1/jobs/{job_id}:cancel"),
    ("post", "/v1/jobs/{job_id}:retry"),
    ("get", "/v1/jobs/{job_id}/events"),
}
SCHEMATHESIS = Path(sys.executable).with_name("st")


async def _document(client: httpx.AsyncClient) -> dict[str, Any]:
    response = await client.get("/openapi.json")
    assert response.status_code == 200
    document: dict[str, Any] = response.json()
    return document


def _refs(node: object) -> list[str]:
    if isinstance(node, dict):
        found = [node["$ref"]] if isinstance(node.get("$ref"), str) else []
        return found + [r for value in node.values() for r in _refs(value)]
    if isinstance(node, list):
        return [r for value in node for r in _refs(value)]
    return []


async def test_document_is_valid_and_covers_the_contract(client: httpx.AsyncClient) -> None:
    """The document is OpenAPI 3.1 whose every $ref resolves, every operation documents its responses,
    and it has every operation of the contract's REST table (schemathesis below checks it deeper)."""
    document = await _document(client)
    assert document["openapi"].startswith("3.1")
    schemas = document["components"]["schemas"]
    for ref in _refs(document):
        assert ref.startswith("#/components/schemas/")
        assert ref.removeprefix("#/components/schemas/") in schemas, ref
    for item in document["paths"].values():
        for operation in item.values():
            assert operation["responses"]
            assert operation.get("summary") or operation.get("description")
    operations = {(method, path) for path, item in document["paths"].items() for method in item}
    assert operations >= CONTRACT_OPERATIONS
    assert (await client.get("/docs")).status_code == 200


async def test_what_the_routes_read_beyond_their_schema_is_documented(client: httpx.AsyncClient) -> None:
    """Parameters the upload and the submit read themselves (a raw body's filename, Idempotency-Key) and the
    download's 304 are in the document, so that a client generated from it can send and expect them."""
    paths = (await _document(client))["paths"]
    upload = {(p["in"], p["name"]) for p in paths["/v1/images"]["post"]["parameters"]}
    assert upload == {("query", "filename"), ("header", "Idempotency-Key")}
    submit = {(p["in"], p["name"]) for p in paths["/v1/jobs"]["post"]["parameters"]}
    assert submit == {("header", "Idempotency-Key")}
    assert "304" in paths["/v1/images/{image_id}/content"]["get"]["responses"]


async def test_errors_are_documented_as_400_with_the_error_body_never_422(client: httpx.AsyncClient) -> None:
    """Validation failures are documented as 400 with the error schema; FastAPI's 422 is gone."""
    document = await _document(client)
    for path, item in document["paths"].items():
        for operation in item.values():
            assert "422" not in operation["responses"], path
    submit = document["paths"]["/v1/jobs"]["post"]["responses"]
    assert submit["400"]["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorResponse")
    assert "HTTPValidationError" not in document["components"]["schemas"]


async def test_security_matches_the_auth_mode(make_client: GatewayFactory) -> None:
    """With auth off no operation demands credentials; with jwt only the bearer scheme is listed."""
    off = await _document(await make_client())
    assert "securitySchemes" not in off.get("components", {})
    assert all("security" not in op for item in off["paths"].values() for op in item.values())
    jwt_mode = await _document(await make_client(auth_mode="jwt", jwt_secret="s" * 32))
    # AccessTokenQuery: the bearer token in the event stream's query (below).
    assert set(jwt_mode["components"]["securitySchemes"]) == {"HTTPBearer", "AccessTokenQuery"}
    assert jwt_mode["paths"]["/v1/models"]["get"]["security"] == [{"HTTPBearer": []}]
    # Paths whose parameter has a convertor ({job_id:name}) are matched by their template too.
    assert jwt_mode["paths"]["/v1/jobs/{job_id}"]["get"]["security"] == [{"HTTPBearer": []}]
    assert jwt_mode["paths"]["/v1/models/{name}"]["get"]["security"] == [{"HTTPBearer": []}]
    assert "security" not in jwt_mode["paths"]["/healthz"]["get"]


async def test_the_event_streams_query_credentials_are_documented(make_client: GatewayFactory) -> None:
    """The job event stream also takes ``?api_key=`` / ``?access_token=`` (a browser's EventSource cannot set
    headers): the document lists them as apiKey-in-query schemes on that route alone, in the modes that take
    them, where a client generated from it knew only the header, which EventSource cannot send."""
    events, job = "/v1/jobs/{job_id}/events", "/v1/jobs/{job_id}"
    api_key = await _document(await make_client(keys=MemoryKeys({}), auth_mode="api_key"))
    assert api_key["paths"][events]["get"]["security"] == [{"APIKeyHeader": []}, {"APIKeyQuery": []}]
    assert api_key["paths"][job]["get"]["security"] == [{"APIKeyHeader": []}]
    in_query = api_key["components"]["securitySchemes"]["APIKeyQuery"]
    assert (in_query["type"], in_query["in"], in_query["name"]) == ("apiKey", "query", "api_key")
    jwt_mode = await _document(await make_client(auth_mode="jwt", jwt_secret="s" * 32))
    assert jwt_mode["paths"][events]["get"]["security"] == [{"HTTPBearer": []}, {"AccessTokenQuery": []}]
    token = jwt_mode["components"]["securitySchemes"]["AccessTokenQuery"]
    assert (token["type"], token["in"], token["name"]) == ("apiKey", "query", "access_token")
    both = await _document(await make_client(keys=MemoryKeys({}), auth_mode="any", jwt_secret="s" * 32))
    assert {name for option in both["paths"][events]["get"]["security"] for name in option} == {
        "APIKeyHeader",
        "HTTPBearer",
        "APIKeyQuery",
        "AccessTokenQuery",
    }


@pytest.mark.timeout(90)
async def test_schemathesis_finds_no_server_error(mesh: FakeMesh, tmp_path: Path) -> None:
    """A bounded property-based run (about 25 s) of every operation: no 5xx, documented statuses,
    content types and response bodies that match their schemas."""
    assert SCHEMATHESIS.exists() or shutil.which("st"), "schemathesis is pinned in requirements-dev.lock"
    app, ctx = build_gateway(mesh.gateway_settings(rate_limit_enabled=False))
    try:
        async with serve_app(app) as url:
            process = await asyncio.create_subprocess_exec(
                str(SCHEMATHESIS),
                "run",
                f"{url}/openapi.json",
                "--checks",
                "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance",
                "--max-examples",
                "8",
                "--max-time",
                "25",
                "--seed",
                "1",
                "--no-color",
                cwd=tmp_path,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
            )
            output, _ = await process.communicate()
    finally:
        await close_gateway(ctx)
    text = output.decode(errors="replace")
    assert process.returncode == 0, text[-6000:]
    assert "Tested: 19" in text, text[-3000:]


async def test_docs_viewer_works_offline(client: httpx.AsyncClient) -> None:
    """/docs loads Swagger UI from the gateway's own vendored files, never from a CDN."""
    page = (await client.get("/docs")).text
    assert "/static/vendor/swagger-ui/swagger-ui-bundle.js" in page
    assert "cdn" not in page.lower()
    script = await client.get("/static/vendor/swagger-ui/swagger-ui-bundle.js")
    assert script.status_code == 200
    assert len(script.content) > 100_000
