"""A prediction's ``X-Request-Id``: the client's, checked here so that a bad one is named as the header the client
sent, or one the gateway makes up. It travels to the inference service as the PredictRequest's ``request_id``
and comes back on every answer of the route, success or error: in the ``X-Request-Id`` header and, in an error's
body, in its ErrorInfo metadata (``request_id``, as the inference service names it in its own errors)."""

from __future__ import annotations

import uuid
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
    "gateway makes one up when it is absent. Sent to the model as the prediction's request_id and returned in "
    "the X-Request-Id header of every answer and in an error's ErrorInfo metadata (request_id).",
    "schema": {"type": "string", "maxLength": MAX_REQUEST_ID_CHARS},
}
RESPONSE_HEADER: dict[str, Any] = {
    HEADER: {
        "description": "The request's id (the one sent, or the one made up).",
        "schema": {"type": "string"},
    }
}


def _problem(value: str) -> str | None:
    """What is wrong with an id for a field violation, or None. ASCII only: a header's other bytes reach us as
    Latin-1 and would come back in the response header encoded otherwise."""
    problem = text_problem(value, MAX_REQUEST_ID_CHARS)
    if problem is None and not value.isascii():
        return "holds a character outside ASCII; send printable ASCII"
    return problem


async def request_id(request: Request) -> str:
    """The request's id (the header's, else a new UUID), set to come back on its every answer; INVALID_ARGUMENT
    naming the header when the client's is not printable ASCII of at most ``MAX_REQUEST_ID_CHARS``."""
    given = request.headers.get(HEADER, "")
    problem = _problem(given)
    if problem:
        raise errors.InvalidArgument(
            f"the {HEADER} header {problem}", field_violations=[errors.FieldViolation(FIELD, problem)]
        )
    chosen = given or str(uuid.uuid4())
    add_response_headers(request.scope, {HEADER: chosen})
    add_error_metadata(request.scope, {METADATA_KEY: chosen})
    return chosen


RequestId = Annotated[str, Depends(request_id)]
