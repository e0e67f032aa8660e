"""The REST contract where a reviewer found the gateway off it: the static files' 405, refused CORS preflights,
and the job states and history of the JSON and the document."""

from __future__ import annotations

import uuid
from typing import Any, get_args

import httpx
import pytest

from mesh.queue.v1 import job_pb2
from mesh.services.gateway import convert, schemas
from tests.gateway.fakes import FakeJob
from tests.gateway.harness import FakeMesh, GatewayFactory
from tests.gateway.test_errors import assert_error_shape

ORIGIN = "https://app.example"


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", "/static/app.js"),
        ("PUT", "/static/style.css"),
        ("DELETE", "/static/vendor/swagger-ui/swagger-ui.css"),
        # Routes beside the Mount keep theirs.
        ("POST", "/docs"),
        ("POST", "/openapi.json"),
    ],
)
async def test_static_files_and_pages_refuse_other_methods_naming_get_and_head(
    client: httpx.AsyncClient, method: str, path: str
) -> None:
    """A static file's 405 lists GET and HEAD in Allow and in its message (RFC 9110), where both were empty: the
    static files' Mount moved its prefix into the scope, and the route match saw ``/app.js``. /docs and
    /openapi.json keep theirs."""
    response = await client.request(method, path)
    assert response.status_code == 405
    error = assert_error_shape(response.json(), "UNIMPLEMENTED")
    assert error["message"] == f"{method} is not allowed on {path}; it allows GET, HEAD"
    assert response.headers["allow"] == "GET, HEAD"


async def _preflight(client: httpx.AsyncClient, origin: str, method: str, **more: str) -> httpx.Response:
    return await client.options(
        "/v1/jobs", headers={"Origin": origin, "Access-Control-Request-Method": method, **more}
    )


def _violations(error: dict[str, Any]) -> dict[str, str]:
    bad = next(d for d in error["details"] if d["type"] == "BadRequest")
    return {v["field"]: v["description"] for v in bad["field_violations"]}


async def test_a_refused_preflight_is_the_contract_error_saying_what_is_refused(
    make_client: GatewayFactory,
) -> None:
    """A preflight from an origin off the allowlist is 400 in the contract's error body naming the origin (not
    the allowlist), with the preflight's, the trace's and the security headers; it was Starlette's plain text
    "Disallowed CORS origin"."""
    client = await make_client(cors_origins=[ORIGIN])
    response = await _preflight(client, "https://evil.example", "POST")
    assert response.status_code == 400
    assert response.headers["content-type"] == "application/json"
    error = assert_error_shape(response.json(), "INVALID_ARGUMENT")
    assert _violations(error) == {"Origin": "https://evil.example is not an origin allowed to call this API"}
    assert "https://evil.example" in error["message"]
    assert ORIGIN not in response.text
    assert "access-control-allow-origin" not in response.headers
    assert response.headers["access-control-allow-methods"] == "GET, POST, DELETE"
    assert "traceparent" in response.headers
    assert response.headers["x-content-type-options"] == "nosniff"
    assert response.headers["x-frame-options"] == "DENY"


async def test_a_refused_method_or_header_names_what_is_allowed(make_client: GatewayFactory) -> None:
    """From an allowed origin, a refused method or header is named with what the API allows, in a body the page
    may read (it carries Access-Control-Allow-Origin); an allowed preflight is still 200."""
    client = await make_client(cors_origins=[ORIGIN])
    method = await _preflight(client, ORIGIN, "PUT")
    assert method.status_code == 400
    assert method.headers["access-control-allow-origin"] == ORIGIN
    error = assert_error_shape(method.json(), "INVALID_ARGUMENT")
    assert _violations(error) == {
        "Access-Control-Request-Method": "PUT is not allowed; allowed: GET, POST, DELETE"
    }
    header = await _preflight(
        client, ORIGIN, "POST", **{"Access-Control-Request-Headers": "X-Foo, content-type"}
    )
    assert header.status_code == 400
    description = _violations(assert_error_shape(header.json(), "INVALID_ARGUMENT"))[
        "Access-Control-Request-Headers"
    ]
    assert description.startswith("not allowed: X-Foo; allowed: ")
    assert "Idempotency-Key" in description
    allowed = await _preflight(client, ORIGIN, "POST", **{"Access-Control-Request-Headers": "content-type"})
    assert allowed.status_code == 200


async def test_the_document_declares_job_states_as_an_enum(client: httpx.AsyncClient) -> None:
    """A job's state, a transition's states and the list's filter are the contract's states (an enum); from_state
    is nullable, said to be null for the first transition; history says where it is filled. The enum is every
    state the queue has (less UNSPECIFIED)."""
    states = [convert.job_state(v) for v in job_pb2.JobState.values() if v != job_pb2.JOB_STATE_UNSPECIFIED]
    assert sorted(get_args(schemas.JobStateName)) == sorted(states)
    document = (await client.get("/openapi.json")).json()
    models = document["components"]["schemas"]
    contract = set(get_args(schemas.JobStateName))
    transition = models["JobTransitionOut"]["properties"]
    assert set(models["JobOut"]["properties"]["state"]["enum"]) == contract
    assert set(transition["to_state"]["enum"]) == contract
    assert transition["from_state"]["anyOf"] == [
        {"type": "string", "enum": list(get_args(schemas.JobStateName))},
        {"type": "null"},
    ]
    assert "null for the job's first transition" in transition["from_state"]["description"]
    history = models["JobOut"]["properties"]["history"]["description"]
    assert "GET /v1/jobs/{job_id}" in history
    assert "empty in the list's and the submit's answers" in history
    (state,) = [p for p in document["paths"]["/v1/jobs"]["get"]["parameters"] if p["name"] == "state"]
    assert set(state["schema"]["anyOf"][0]["enum"]) == contract


async def test_a_jobs_first_transition_comes_from_null(client: httpx.AsyncClient, mesh: FakeMesh) -> None:
    """The queue's first transition (from UNSPECIFIED, at submission) reads ``from_state: null`` in the JSON,
    never "UNSPECIFIED", which is no state of the contract."""
    job = job_pb2.Job(
        id=str(uuid.uuid4()),
        state=job_pb2.JOB_STATE_RUNNING,
        attempt=1,
        history=[
            job_pb2.JobTransition(
                from_state=job_pb2.JOB_STATE_UNSPECIFIED, to_state=job_pb2.JOB_STATE_QUEUED, attempt=1
            ),
            job_pb2.JobTransition(
                from_state=job_pb2.JOB_STATE_QUEUED, to_state=job_pb2.JOB_STATE_RUNNING, attempt=1
            ),
        ],
    )
    # Looked up by id only (not listed), and never run: the other tests' queue is left as it was.
    mesh.fakes.queue.jobs[job.id] = FakeJob(job)
    try:
        response = await client.get(f"/v1/jobs/{job.id}")
    finally:
        del mesh.fakes.queue.jobs[job.id]
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["state"] == "RUNNING"
    assert [(t["from_state"], t["to_state"]) for t in body["history"]] == [
        (None, "QUEUED"),
        ("QUEUED", "RUNNING"),
    ]
