"""A prediction's ``X-Request-Id``: the client's, checked here so that a bad one is named as the header the client
sent, or one the gateway makes up. It travels to the inference service as the PredictRequest's ``request_id``
and comes back on the route's answers, success or error: in the ``X-Request-Id`` header and, in an error's
body, in its ErrorInfo metadata (``request_id``, as the inference service names it in its own errors).

Every answer given once the route has started carries it (a 401 or 429, a bad body or query, a body found too
large while it is read, the safety net's 500). Two answers do not, as no id is taken for them: the 400 that
refuses the header itself (a bad value, or the header sent more than once), and the 413 that
``middleware.BodyLimit`` gives by Content-Length before the route runs (nothing of the request is read then)."""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from typing import Annotated, Any

from fastapi import Depends, Request

from mesh.kit import errors
from mesh.kit.text_fields import text_problem
from mesh.services.gateway.http_errors import add_error_metadata
from mesh.services.gateway.middleware import add_response_headers

HEADER = "X-Request-Id"
FIELD = f"header.{HEADER}"
MAX_REQUEST_ID_CHARS = 128
"""Longer than any id a tracing or proxy layer makes (a UUID is 36), short enough to echo in every answer."""
METADATA_KEY = "request_id"
"""The ErrorInfo metadata key of the id: the inference service's (``predictor.REQUEST_ID_KEY``), so that an
error body names it in one place whichever side failed."""
OPENAPI_PARAMETER: dict[str, Any] = {
    "name": HEADER,
    "in": "header",
    "required": False,
    "description": f"The request's id (printable ASCII, at most {MAX_REQUEST_ID_CHARS} characters); the "
    "gateway makes one up when it is absent; send it once. Sent to the model as the prediction's request_id "
    "and returned in the X-Request-Id header of the answer and in an error's ErrorInfo metadata (request_id), "
    "except on a 400 that refuses this header and on a 413 refused by Content-Length before the body is read.",
    "schema": {"type": "string", "maxLength": MAX_REQUEST_ID_CHARS},
}
RESPONSE_HEADER: dict[str, Any] = {
    HEADER: {
        "description": "The request's id (the one sent, or the one made up).",
        "schema": {"type": "string"},
    }
}
ERROR_RESPONSE_HEADER: dict[str, Any] = {
    HEADER: {
        "description": "The request's id (the one sent, or the one made up), also in the ErrorInfo metadata "
        "(request_id); absent from a 400 refusing this header and from a 413 refused by Content-Length.",
        "schema": {"type": "string"},
    }
}


def with_request_id_header(
    responses: Mapping[int | str, dict[str, object]],
) -> dict[int | str, dict[str, object]]:
    """``responses`` (a route's OpenAPI answers) with the X-Request-Id header declared on each: the 200's
    (``RESPONSE_HEADER``) where 200 is listed, the errors' (``ERROR_RESPONSE_HEADER``) on the rest."""
    return {
        code: {**spec, "headers": RESPONSE_HEADER if code in (200, "200") else ERROR_RESPONSE_HEADER}
        for code, spec in responses.items()
    }


def _problem(value: str) -> str | None:
    """What is wrong with an id for a field violation, or None. ASCII only: a header's other bytes reach us as
    Latin-1 and would come back in the response header encoded otherwise."""
    problem = text_problem(value, MAX_REQUEST_ID_CHARS)
    if problem is None and not value.isascii():
        return "holds a character outside ASCII; send printable ASCII"
    return problem


def _refusal(problem: str) -> errors.InvalidArgument:
    """The 400 for a header that ``problem`` says is wrong, naming it as the field."""
    return errors.InvalidArgument(
        f"the {HEADER} header {problem}", field_violations=[errors.FieldViolation(FIELD, problem)]
    )


def _given(request: Request) -> str:
    """The client's id ("" when it sent none); INVALID_ARGUMENT naming the header when it sent several, of
    which taking the first without a word would return an id the client may not be looking for."""
    given = request.headers.getlist(HEADER)
    if len(given) > 1:
        raise _refusal(f"is sent {len(given)} times; send one {HEADER}")
    return given[0] if given else ""


async def request_id(request: Request) -> str:
    """The request's id (the header's, else a new UUID), set to come back on its answers (see the module's
    words for the two that cannot); INVALID_ARGUMENT naming the header when the client's is not printable ASCII
    of at most ``MAX_REQUEST_ID_CHARS``, or was sent more than once."""
    given = _given(request)
    problem = _problem(given)
    if problem:
        raise _refusal(problem)
    chosen = given or str(uuid.uuid4())
    add_response_headers(request.scope, {HEADER: chosen})
    add_error_metadata(request.scope, {METADATA_KEY: chosen})
    return chosen


RequestId = Annotated[str, Depends(request_id)]
